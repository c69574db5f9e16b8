"""/v1/uploads through the real `openai` SDK: create, parts, complete (order, size, md5, batch checks), cancel,
expiry, tenants; the end-to-end runs on S3 and PostgreSQL are in tests/e2e/test_uploads_e2e.py."""

from __future__ import annotations

import hashlib
import io

import openai
import pytest

from batch_gateway.api import uploads as uploads_module
from tests.api.forms import FILE_KEYS, assert_envelope, multipart_body
from tests.helpers import chat_lines

UPLOAD_KEYS = {"id", "object", "bytes", "created_at", "expires_at", "filename", "purpose", "status", "file"}
THIRTY_DAYS = 30 * 24 * 3600


def start(client, data: bytes, *, filename: str = "big.jsonl", purpose: str = "batch", **kwargs):
    return client.uploads.create(bytes=len(data), filename=filename, mime_type="text/jsonl", purpose=purpose, **kwargs)


def parts_of(client, upload_id: str, chunks: list[bytes]) -> list[str]:
    return [client.uploads.parts.create(upload_id, data=chunk).id for chunk in chunks]


def split(data: bytes, n: int) -> list[bytes]:
    size = -(-len(data) // n)
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_create_add_parts_out_of_order_and_complete_into_a_batch_file(server, client):
    data = chat_lines(30)
    upload = start(client, data)
    raw = (
        server.http()
        .post("/v1/uploads", json={"bytes": 1, "filename": "x.jsonl", "mime_type": "text/jsonl", "purpose": "batch"})
        .json()
    )
    assert set(raw) == UPLOAD_KEYS and raw["object"] == "upload" and raw["file"] is None
    assert upload.status == "pending" and upload.id.startswith("upload_")
    assert (upload.bytes, upload.filename, upload.purpose) == (len(data), "big.jsonl", "batch")
    assert upload.expires_at == upload.created_at + 3600

    chunks = split(data, 3)
    # Parts may arrive in any order (or in parallel): `part_ids` says the order.
    (third,) = parts_of(client, upload.id, [chunks[2]])
    raw_part = client.uploads.parts.with_raw_response.create(upload.id, data=chunks[0])
    assert set(raw_part.http_response.json()) == {"id", "object", "created_at", "upload_id"}
    part = raw_part.parse()
    assert (part.object, part.upload_id) == ("upload.part", upload.id) and part.id.startswith("part_")
    first, (second,) = part.id, parts_of(client, upload.id, [chunks[1]])

    done = client.uploads.complete(upload.id, part_ids=[first, second, third], md5=hashlib.md5(data).hexdigest())
    assert done.status == "completed"
    assert set(done.file.model_dump()) == FILE_KEYS
    assert (done.file.bytes, done.file.filename, done.file.purpose, done.file.status) == (
        len(data),
        "big.jsonl",
        "batch",
        "processed",
    )
    assert done.file.expires_at == done.file.created_at + THIRTY_DAYS
    assert client.files.content(done.file.id).content == data
    assert client.files.retrieve(done.file.id).id == done.file.id
    batch = client.batches.create(input_file_id=done.file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "validating"
    # Completing again (an SDK retry of a complete whose answer was lost) gives the same answer.
    again = client.uploads.complete(upload.id, part_ids=[first, second, third])
    assert (again.status, again.file.id) == ("completed", done.file.id)
    assert not [p for p in server.stored_objects() if "/uploads/" in str(p)]  # the parts are deleted


def test_upload_file_chunked_sends_every_part_and_completes(server, client, tmp_path):
    data = chat_lines(200)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(data)
    done = client.uploads.upload_file_chunked(file=path, mime_type="text/jsonl", purpose="batch", part_size=1000)
    assert done.status == "completed" and done.filename == "requests.jsonl"
    assert client.files.content(done.file.id).content == data
    assert not [p for p in server.stored_objects() if "/uploads/" in str(p)]  # every part was listed and deleted
    in_memory = client.uploads.upload_file_chunked(
        file=data,
        filename="mem.jsonl",
        bytes=len(data),
        mime_type="text/jsonl",
        purpose="batch",
        md5=hashlib.md5(data).hexdigest(),
    )
    assert client.files.content(in_memory.file.id).content == data


def test_other_purposes_skip_the_batch_checks_and_never_expire_unless_asked(client):
    data = b"\x00\x01 not jsonl at all"
    upload = start(client, data, filename="weights.bin", purpose="user_data")
    done = client.uploads.complete(upload.id, part_ids=parts_of(client, upload.id, [data]))
    assert done.file.purpose == "user_data" and done.file.expires_at is None
    timed = start(
        client, data, filename="w.bin", purpose="assistants", expires_after={"anchor": "created_at", "seconds": 7200}
    )
    done = client.uploads.complete(timed.id, part_ids=parts_of(client, timed.id, [data]))
    assert done.file.expires_at == done.file.created_at + 7200


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"filename": "a.jsonl", "mime_type": "text/jsonl", "purpose": "batch"}, "bytes", "missing_required_parameter"),
        (
            {"bytes": "10", "filename": "a.jsonl", "mime_type": "text/jsonl", "purpose": "batch"},
            "bytes",
            "invalid_type",
        ),
        ({"bytes": -1, "filename": "a.jsonl", "mime_type": "text/jsonl", "purpose": "batch"}, "bytes", "invalid_value"),
        ({"bytes": 10, "mime_type": "text/jsonl", "purpose": "batch"}, "filename", "missing_required_parameter"),
        ({"bytes": 10, "filename": "a.jsonl", "purpose": "batch"}, "mime_type", "missing_required_parameter"),
        ({"bytes": 10, "filename": "a.jsonl", "mime_type": "text/jsonl"}, "purpose", "missing_required_parameter"),
        (
            {"bytes": 10, "filename": "a.jsonl", "mime_type": "text/jsonl", "purpose": "nope"},
            "purpose",
            "invalid_value",
        ),
        (
            {
                "bytes": 10,
                "filename": "a.jsonl",
                "mime_type": "text/jsonl",
                "purpose": "batch",
                "expires_after": {"anchor": "created_at", "seconds": 60},
            },
            "expires_after.seconds",
            "invalid_value",
        ),
        ({"bytes": 10, "filename": "a.csv", "mime_type": "text/csv", "purpose": "batch"}, None, None),
    ],
)
def test_bad_create_bodies_are_400(server, body, param, code):
    response = server.http().post("/v1/uploads", json=body)
    error = assert_envelope(response, 400, code=code)
    assert error["param"] == param


def test_a_file_over_the_purpose_limit_is_refused_at_create_as_openai_does(server_factory):
    server = server_factory(max_upload_bytes=10_000, max_batch_file_bytes=1_000)
    client = server.client(max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.uploads.create(bytes=1_001, filename="a.jsonl", mime_type="text/jsonl", purpose="batch")
    error = caught.value.body
    assert error["message"].startswith("File is too large.") and error["code"] is None and error["param"] is None
    assert (
        client.uploads.create(bytes=1_001, filename="a.bin", mime_type="x/y", purpose="user_data").status == "pending"
    )
    with pytest.raises(openai.BadRequestError, match="File is too large"):
        client.uploads.create(bytes=10_001, filename="a.bin", mime_type="x/y", purpose="user_data")


def test_parts_over_twice_the_declared_size_or_the_part_limit_are_refused_and_not_kept(server, client, monkeypatch):
    data = chat_lines(5)
    upload = start(client, data)
    parts_of(client, upload.id, [data, data[:-10]])
    with pytest.raises(openai.BadRequestError, match="more than 2 times the"):
        client.uploads.parts.create(upload.id, data=data[-10:] + b"extra")
    monkeypatch.setattr(uploads_module, "PART_MAX_BYTES", 4)
    with pytest.raises(openai.BadRequestError, match="at most 4 bytes") as caught:
        client.uploads.parts.create(upload.id, data=data[-10:])
    assert caught.value.param == "data"
    assert len([p for p in server.stored_objects() if "/uploads/" in str(p)]) == 2


def test_a_part_sent_twice_leaves_room_for_the_last_and_complete_takes_the_parts_it_names(client):
    """A client that retried a part the server had stored (its answer lost) still sends the rest and completes."""
    data = chat_lines(6)
    upload = start(client, data)
    head, _again = parts_of(client, upload.id, [data[:100], data[:100]])
    (tail,) = parts_of(client, upload.id, [data[100:]])
    done = client.uploads.complete(upload.id, part_ids=[head, tail], md5=hashlib.md5(data).hexdigest())
    assert done.status == "completed" and client.files.content(done.file.id).content == data


def test_a_part_form_without_data_is_400(server, client):
    upload = start(client, b"{}\n")
    body, content_type = multipart_body([("file", b"{}\n", "a.jsonl")])
    response = server.http().post(
        f"/v1/uploads/{upload.id}/parts", content=body, headers={"Content-Type": content_type}
    )
    assert_envelope(response, 400, code="missing_required_parameter", param="data")


def test_complete_checks_part_ids_size_md5_and_the_batch_format_and_stays_pending(server, client):
    data = chat_lines(4)
    upload = start(client, data)
    head, tail = parts_of(client, upload.id, [data[:5], data[5:]])
    cases = [
        ({"part_ids": []}, "part_ids", "invalid_value"),
        ({"part_ids": "part_x"}, "part_ids", "invalid_type"),
        ({}, "part_ids", "missing_required_parameter"),
        ({"part_ids": [head, head]}, "part_ids", "invalid_value"),
        ({"part_ids": [head, "part_nope"]}, "part_ids", "invalid_value"),
        ({"part_ids": [head]}, "part_ids", "invalid_value"),  # fewer bytes than declared
        ({"part_ids": [head, tail], "md5": "abc"}, "md5", "invalid_value"),
        ({"part_ids": [head, tail], "md5": hashlib.md5(b"other").hexdigest()}, "md5", "invalid_value"),
        ({"part_ids": [tail, head]}, None, None),  # the wrong order: not JSONL from the first byte
    ]
    for body, param, code in cases:
        response = server.http().post(f"/v1/uploads/{upload.id}/complete", json=body)
        error = assert_envelope(response, 400, code=code)
        assert error["param"] == param, (body, error)
    assert not [f for f in client.files.list().data]
    # Still pending: the right order and checksum complete it.
    done = client.uploads.complete(upload.id, part_ids=[head, tail], md5=hashlib.md5(data).hexdigest().upper())
    assert client.files.content(done.file.id).content == data


def test_a_batch_upload_is_checked_like_files_create(server, client):
    bad = b"not json\n"
    upload = start(client, bad)
    with pytest.raises(openai.BadRequestError, match="Invalid file format for Batch API"):
        client.uploads.complete(upload.id, part_ids=parts_of(client, upload.id, [bad]))
    with pytest.raises(openai.BadRequestError, match=r"Must be \.jsonl"):
        start(client, bad, filename="data.csv")
    bom = b"\xef\xbb\xbf" + chat_lines(2)
    upload = start(client, bom)
    done = client.uploads.complete(upload.id, part_ids=parts_of(client, upload.id, [bom[:1], bom[1:2], bom[2:]]))
    assert done.file.bytes == len(bom)


def test_cancel_deletes_the_parts_and_ends_the_upload(server, client):
    data = chat_lines(2)
    upload = start(client, data)
    part_ids = parts_of(client, upload.id, [data])
    cancelled = client.uploads.cancel(upload.id)
    assert cancelled.status == "cancelled" and cancelled.file is None
    assert client.uploads.cancel(upload.id).status == "cancelled"  # again: the same
    assert not [p for p in server.stored_objects() if "/uploads/" in str(p)]
    for call in (
        lambda: client.uploads.parts.create(upload.id, data=data),
        lambda: client.uploads.complete(upload.id, part_ids=part_ids),
    ):
        with pytest.raises(openai.ConflictError, match="status 'cancelled'") as caught:
            call()
        assert caught.value.response.headers["x-should-retry"] == "false"
    done = start(client, data)
    client.uploads.complete(done.id, part_ids=parts_of(client, done.id, [data]))
    with pytest.raises(openai.ConflictError, match="status 'completed'"):
        client.uploads.cancel(done.id)


def test_an_upload_expires_an_hour_after_creation(server, client):
    data = chat_lines(2)
    upload = start(client, data)
    part_ids = parts_of(client, upload.id, [data])

    async def age_it() -> None:  # an hour later, before gc has run
        store = server.services.metadata
        await store._execute("UPDATE uploads SET created_at = created_at - 3600, expires_at = expires_at - 3600")

    server.run(age_it())
    for call in (
        lambda: client.uploads.parts.create(upload.id, data=data),
        lambda: client.uploads.complete(upload.id, part_ids=part_ids),
    ):
        with pytest.raises(openai.ConflictError, match="status 'expired'"):
            call()
    assert client.uploads.cancel(upload.id).status == "expired"


def test_uploads_are_tenant_scoped(server_factory):
    server = server_factory(auth="keys")
    from batch_gateway.keys import create_key

    keys = [server.run(create_key(server.services.metadata, tenant))[0] for tenant in ("alpha", "beta")]
    alpha, beta = (server.client(api_key=key) for key in keys)
    data = chat_lines(2)
    upload = start(alpha, data)
    part_id = alpha.uploads.parts.create(upload.id, data=data).id
    for call in (
        lambda: beta.uploads.parts.create(upload.id, data=data),
        lambda: beta.uploads.complete(upload.id, part_ids=[part_id]),
        lambda: beta.uploads.cancel(upload.id),
    ):
        with pytest.raises(openai.NotFoundError, match="No such Upload object"):
            call()
    done = alpha.uploads.complete(upload.id, part_ids=[part_id])
    with pytest.raises(openai.NotFoundError):
        beta.files.retrieve(done.file.id)


def test_unknown_upload_is_404_everywhere(server, client):
    for response in (
        server.http().post("/v1/uploads/upload_nope/complete", json={"part_ids": ["part_x"]}),
        server.http().post("/v1/uploads/upload_nope/cancel"),
        server.http().post("/v1/uploads/upload_nope/parts", files={"data": ("d", io.BytesIO(b"x"))}),
    ):
        assert_envelope(response, 404, param="upload_id")
