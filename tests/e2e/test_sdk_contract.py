"""The contract an OpenAI-compatible gateway owes the `openai` SDK: every Files, Uploads and Batches call, its object's
keys, its errors (status, exception class, the four envelope fields, a request id) and its pagination, through the
real server on both backend sets."""

from __future__ import annotations

import io

import httpx
import openai
import pytest

from tests.helpers import chat_lines, wait_for

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "status_details"}
BATCH_KEYS = {
    "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window", "status", "output_file_id",
    "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
    "expired_at", "cancelling_at", "cancelled_at", "request_counts", "usage", "metadata",
}  # fmt: skip
UPLOAD_KEYS = {"id", "object", "bytes", "created_at", "expires_at", "filename", "purpose", "status", "file"}
PAGE_KEYS = {"object", "data", "first_id", "last_id", "has_more"}


def raw(gateway, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(
        method, f"{gateway.base_url}{path}", headers={"Authorization": "Bearer x"}, timeout=30, **kwargs
    )


def envelope(error: openai.APIStatusError, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    """The SDK raised the class for `status`, with OpenAI's four-field envelope and a request id."""
    assert error.status_code == status, error
    body = error.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    assert (body["error"]["param"], body["error"]["code"]) == (param, code), body
    assert error.request_id and error.response.headers["x-request-id"] == error.request_id
    return body["error"]


def test_files_calls_objects_pagination_and_errors(gateway, client):
    data = chat_lines(2)
    created = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert set(raw(gateway, "GET", f"/files/{created.id}").json()) == FILE_KEYS
    assert (created.object, created.status, created.bytes, created.purpose) == ("file", "processed", len(data), "batch")
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data
    with pytest.deprecated_call():  # older scripts still call it
        assert client.files.retrieve_content(created.id) == data.decode()

    notes = [client.files.create(file=(f"n{i}.txt", io.BytesIO(b"x")), purpose="user_data").id for i in range(4)]
    page = client.files.list(limit=2, purpose="user_data")
    assert [f.id for f in page.data] == notes[::-1][:2] and page.has_more
    listing = raw(gateway, "GET", "/files", params={"limit": 2, "purpose": "user_data"}).json()
    assert set(listing) == PAGE_KEYS and listing["object"] == "list"
    assert (listing["first_id"], listing["last_id"]) == (notes[3], notes[2])
    assert [f.id for f in client.files.list(limit=2, purpose="user_data")] == notes[::-1]  # auto-pagination
    assert [f.id for f in client.files.list(limit=3, order="asc", purpose="user_data")] == notes
    after = client.files.list(limit=10, order="asc", after=notes[1], purpose="user_data")
    assert [f.id for f in after.data] == notes[2:] and not after.has_more
    assert {f.id for f in client.files.list()} == {created.id, *notes}
    empty = raw(gateway, "GET", "/files", params={"purpose": "fine-tune"}).json()
    assert (empty["data"], empty["first_id"], empty["last_id"], empty["has_more"]) == ([], None, None, False)

    deleted = client.files.delete(notes[0])
    assert (deleted.id, deleted.object, deleted.deleted) == (notes[0], "file", True)
    for call in (
        lambda: client.files.retrieve(notes[0]),
        lambda: client.files.content(notes[0]),
        lambda: client.files.delete(notes[0]),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        envelope(caught.value, 404, param="id")

    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="nonsense")  # type: ignore[arg-type]
    envelope(caught.value, 400, param="purpose", code="invalid_value")
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("in.csv", io.BytesIO(b"a,b\n")), purpose="batch")
    assert "Must be .jsonl" in envelope(caught.value, 400)["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.list(limit=0)
    envelope(caught.value, 400, param="limit", code="invalid_value")
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.list(order="sideways")  # type: ignore[arg-type]
    envelope(caught.value, 400, param="order", code="invalid_value")
    with pytest.raises(openai.NotFoundError) as caught:
        client.get("/files/nope/unknown", cast_to=object)
    assert envelope(caught.value, 404)["message"].startswith("Invalid URL")


def test_batches_calls_objects_pagination_and_errors(gateway, client):
    file_id = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(2))), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata={"k": "v"})
    assert set(raw(gateway, "GET", f"/batches/{batch.id}").json()) == BATCH_KEYS
    assert (batch.object, batch.status, batch.metadata) == ("batch", "validating", {"k": "v"})
    done = wait_for(client, batch.id)
    assert client.batches.retrieve(batch.id).status == done.status == "completed"

    more = [client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h").id for _ in range(4)]
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == more[::-1][:2] and page.has_more
    listing = raw(gateway, "GET", "/batches", params={"limit": 2}).json()
    assert set(listing) == PAGE_KEYS and (listing["first_id"], listing["last_id"]) == (more[3], more[2])
    assert [b.id for b in client.batches.list(limit=2)] == [*more[::-1], batch.id]  # auto-pagination
    assert [b.id for b in client.batches.list(after=more[1]).data] == [more[0], batch.id]

    cancelling = client.batches.cancel(more[0])
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    assert wait_for(client, more[0]).status in ("cancelled", "completed")
    with pytest.raises(openai.ConflictError) as caught:
        client.batches.cancel(batch.id)
    envelope(caught.value, 409)
    assert caught.value.response.headers["x-should-retry"] == "false"

    for call in (lambda: client.batches.retrieve("batch_nope"), lambda: client.batches.cancel("batch_nope")):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        envelope(caught.value, 404, param="id")
    user_file = client.files.create(file=("n.txt", io.BytesIO(b"x")), purpose="user_data").id
    bad_creates = [
        (dict(input_file_id="file-nope", endpoint=CHAT), "input_file_id", "invalid_value"),
        (dict(input_file_id=user_file, endpoint=CHAT), "input_file_id", "invalid_value"),
        (dict(input_file_id=file_id, endpoint="/v1/nothing"), "endpoint", "invalid_value"),
        (dict(input_file_id=file_id, endpoint=CHAT, completion_window="48h"), "completion_window", "invalid_value"),
        (dict(input_file_id=file_id, endpoint=CHAT, metadata={"k": "v" * 513}), "metadata.k", "invalid_value"),
        (
            dict(input_file_id=file_id, endpoint=CHAT, output_expires_after={"anchor": "created_at", "seconds": 60}),
            "output_expires_after.seconds",
            "invalid_value",
        ),
    ]
    for kwargs, param, code in bad_creates:
        with pytest.raises(openai.BadRequestError) as caught:
            client.batches.create(**{"completion_window": "24h", **kwargs})
        envelope(caught.value, 400, param=param, code=code)
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.list(limit=101)
    envelope(caught.value, 400, param="limit", code="invalid_value")
    assert len(client.batches.list(limit=100).data) == 5  # nothing refused was created


def test_uploads_calls_objects_and_errors(gateway, client):
    data = chat_lines(3)
    upload = client.uploads.create(bytes=len(data), filename="in.jsonl", mime_type="text/jsonl", purpose="batch")
    assert (upload.object, upload.status, upload.file) == ("upload", "pending", None)
    part = client.uploads.parts.create(upload.id, data=data)
    assert (part.object, part.upload_id) == ("upload.part", upload.id)
    done = client.uploads.complete(upload.id, part_ids=[part.id])
    assert set(done.model_dump()) == UPLOAD_KEYS and set(done.file.model_dump()) == FILE_KEYS
    assert done.status == "completed" and client.files.retrieve(done.file.id).bytes == len(data)

    for call in (
        lambda: client.uploads.parts.create("upload_nope", data=data),
        lambda: client.uploads.complete("upload_nope", part_ids=["part_x"]),
        lambda: client.uploads.cancel("upload_nope"),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        envelope(caught.value, 404, param="upload_id")
    with pytest.raises(openai.ConflictError) as caught:
        client.uploads.parts.create(upload.id, data=data)
    envelope(caught.value, 409)
    with pytest.raises(openai.BadRequestError) as caught:
        client.uploads.create(bytes=len(data), filename="in.jsonl", mime_type="text/jsonl", purpose="nope")  # type: ignore[arg-type]
    envelope(caught.value, 400, param="purpose", code="invalid_value")
    other = client.uploads.create(bytes=len(data), filename="in.jsonl", mime_type="text/jsonl", purpose="batch")
    first = client.uploads.parts.create(other.id, data=data[:10]).id
    with pytest.raises(openai.BadRequestError) as caught:
        client.uploads.complete(other.id, part_ids=[first])
    envelope(caught.value, 400, param="part_ids", code="invalid_value")
    assert client.uploads.cancel(other.id).status == "cancelled"
