"""/v1/files through the real `openai` SDK (and raw HTTP where the SDK cannot misbehave enough)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import psutil
import pytest

from batch_gateway.store.objects import file_key
from tests.api.forms import FILE_KEYS, assert_envelope, multipart_body
from tests.helpers import chat_lines

THIRTY_DAYS = 30 * 24 * 3600


# --- upload ---------------------------------------------------------------------------------------


def test_upload_returns_a_complete_processed_file_object(server, client):
    data = chat_lines(3)
    created = client.files.create(file=("requests.jsonl", data), purpose="batch")
    raw = server.http().get(f"/v1/files/{created.id}").json()
    assert set(raw) == FILE_KEYS
    assert raw["object"] == "file" and raw["status"] == "processed" and raw["status_details"] is None
    assert raw["bytes"] == len(data) and raw["filename"] == "requests.jsonl" and raw["purpose"] == "batch"
    assert raw["expires_at"] == raw["created_at"] + THIRTY_DAYS
    assert created.id.startswith("file-")
    assert client.files.wait_for_processing(created.id).status == "processed"


def test_raw_bytes_upload_gets_the_sdk_filename_upload(client):
    created = client.files.create(file=chat_lines(1), purpose="batch")
    assert created.filename == "upload"


def test_client_path_in_filename_is_reduced_to_its_base_name(server):
    body, content_type = multipart_body(
        [("purpose", b"batch", None), ("file", chat_lines(1), "C:\\Users\\me\\input.jsonl")]
    )
    response = server.http().post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200 and response.json()["filename"] == "input.jsonl"


def test_expires_after_sets_expires_at(client):
    created = client.files.create(
        file=("a.jsonl", chat_lines(1)), purpose="batch", expires_after={"anchor": "created_at", "seconds": 7200}
    )
    assert created.expires_at == created.created_at + 7200


def test_other_purposes_never_expire_unless_asked(client):
    plain = client.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    assert plain.expires_at is None and plain.purpose == "user_data"
    timed = client.files.create(
        file=("notes.txt", b"hello"), purpose="assistants", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert timed.expires_at == timed.created_at + 3600


def test_fields_are_parsed_by_name_in_any_order_and_unknown_ones_ignored(server, client):
    data = chat_lines(2)
    body, content_type = multipart_body(
        [
            ("file", data, "late.jsonl"),
            ("something_else", b"ignored", None),
            ("expires_after[seconds]", b"4000", None),
            ("purpose", b"batch", None),
            ("expires_after[anchor]", b"created_at", None),
        ]
    )
    response = server.http().post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    created = response.json()
    assert created["bytes"] == len(data) and created["expires_at"] == created["created_at"] + 4000
    assert client.files.content(created["id"]).content == data
    # the SDK's extra_body fields arrive as extra form fields too
    assert client.files.create(file=("x.jsonl", data), purpose="batch", extra_body={"tag": "x"}).bytes == len(data)


def test_file_before_purpose_is_still_checked_as_a_batch_file(server, client):
    body, content_type = multipart_body([("file", b"id,name\n1,a\n", "table.jsonl"), ("purpose", b"batch", None)])
    response = server.http().post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert_envelope(response, 400)
    assert response.json()["error"]["message"].startswith("Invalid file format for Batch API. Must be .jsonl")
    assert server.stored_objects() == [] and client.files.list().data == []
    # the same bytes are fine for a purpose that is not batch
    body, content_type = multipart_body([("file", b"id,name\n1,a\n", "table.csv"), ("purpose", b"user_data", None)])
    assert server.http().post("/v1/files", content=body, headers={"Content-Type": content_type}).status_code == 200


FILE = ("file", b"{}\n", "a.jsonl")
BATCH = ("purpose", b"batch", None)


def expires(seconds: bytes, anchor: bytes = b"created_at") -> list[tuple[str, bytes, None]]:
    return [("expires_after[seconds]", seconds, None), ("expires_after[anchor]", anchor, None)]


@pytest.mark.parametrize(
    ("parts", "param", "code"),
    [
        ([("purpose", b"batch", None)], "file", "missing_required_parameter"),
        ([("file", b"{}\n", "a.jsonl")], "purpose", "missing_required_parameter"),
        ([("purpose", b"", None), ("file", b"{}\n", "a.jsonl")], "purpose", "missing_required_parameter"),
        ([("purpose", b"fun", None), ("file", b"{}\n", "a.jsonl")], "purpose", "invalid_value"),
        ([BATCH, *expires(b"60"), FILE], "expires_after.seconds", "invalid_value"),
        ([BATCH, *expires(b"2592001"), FILE], "expires_after.seconds", "invalid_value"),
        ([BATCH, *expires(b"soon"), FILE], "expires_after.seconds", "invalid_type"),
        ([BATCH, *expires(b"4000", b"last_used_at"), FILE], "expires_after.anchor", "invalid_value"),
        (
            [("purpose", b"batch", None), ("expires_after[seconds]", b"4000", None), ("file", b"{}\n", "a.jsonl")],
            "expires_after.anchor",
            "missing_required_parameter",
        ),
        # the same mistakes, discovered only after the file went by
        ([("file", b"{}\n", "a.jsonl"), ("purpose", b"fun", None)], "purpose", "invalid_value"),
        ([FILE, BATCH, *expires(b"1")], "expires_after.seconds", "invalid_value"),
    ],
)  # fmt: skip
def test_bad_upload_fields_are_400_and_store_nothing(server, client, parts, param, code):
    body, content_type = multipart_body(parts)
    response = server.http().post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert_envelope(response, 400, code=code, param=param)
    assert server.stored_objects() == [] and client.files.list().data == []


def test_sdk_sees_upload_errors_as_bad_request(server, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="nonsense")  # type: ignore[arg-type]
    assert caught.value.code == "invalid_value" and caught.value.param == "purpose"
    assert "Supported values are" in caught.value.body["message"]
    assert server.count("POST", "/v1/files") == 1  # a 400 is not retried


@pytest.mark.parametrize(
    ("filename", "data"),
    [
        ("table.jsonl", b"id,name\n1,a\n"),  # CSV in a .jsonl name
        ("requests.csv", b'{"custom_id": "a"}\n'),  # JSONL in a .csv name
        ("requests.jsonl", b'\n\n  ["not", "an", "object"]\n'),  # the first non-blank line must be an object
        ("requests.jsonl", b'{"custom_id": "\xff\xfe"}\n'),  # not UTF-8
        ("requests.jsonl", b'{"custom_id": "caf\xc3'),  # UTF-8 cut in the middle of a character
    ],
)
def test_non_jsonl_batch_files_are_rejected_and_nothing_is_stored(server, client, filename, data):
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=(filename, data), purpose="batch")
    assert caught.value.body["message"].startswith("Invalid file format for Batch API. Must be .jsonl")
    assert caught.value.type == "invalid_request_error"
    assert server.stored_objects() == [] and client.files.list().data == []


def test_malformed_lines_are_accepted_at_upload(client):
    data = b'{"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n{"broken json\n\n{}\n'
    for name in ("a.jsonl", "a.json", "a.txt", "A.JSONL"):
        assert client.files.create(file=(name, data), purpose="batch").bytes == len(data)


def test_batch_file_line_and_request_limits(server_factory):
    server = server_factory(max_line_bytes=100, max_requests_per_batch=3)
    client = server.client()
    line = b'{"custom_id": "' + b"x" * 60 + b'"}\n'
    assert client.files.create(file=("ok.jsonl", line * 3 + b"\n\n"), purpose="batch")  # blank lines do not count
    with pytest.raises(openai.BadRequestError, match="more than 3 requests"):
        client.files.create(file=("many.jsonl", line * 4), purpose="batch")
    long_line = b'{"custom_id": "' + b"x" * 200 + b'"}\n'
    with pytest.raises(openai.BadRequestError, match="Line 2 of the file is longer than 100 bytes"):
        client.files.create(file=("long.jsonl", line + long_line), purpose="batch")
    # limits of batch files do not apply to other purposes
    assert client.files.create(file=("long.txt", long_line * 5), purpose="user_data")
    assert len(client.files.list().data) == 2
    assert len(server.stored_objects()) == 2


def test_upload_over_the_size_limit_is_openais_400_and_nothing_is_stored(server_factory):
    limit = 64 * 1024
    server = server_factory(max_batch_file_bytes=limit)
    client = server.client(max_retries=0)
    exact = b'{"a": "' + b"x" * (limit - 10) + b'"}\n'
    assert len(exact) == limit
    assert client.files.create(file=("exact.jsonl", exact), purpose="batch").bytes == limit

    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("big.jsonl", exact + b"{}\n"), purpose="batch")
    error = caught.value.body
    assert error["message"].startswith("File is too large.") and error["type"] == "invalid_request_error"
    assert error["code"] is None and error["param"] is None
    assert len(client.files.list().data) == 1 and len(server.stored_objects()) == 1


def test_size_limits_are_per_purpose_512_mb_a_file_200_mb_a_batch_input(server_factory):
    from batch_gateway.settings import Settings

    assert (Settings().max_upload_bytes, Settings().max_batch_file_bytes) == (512 * 1024 * 1024, 200 * 1024 * 1024)
    server = server_factory(max_upload_bytes=4096, max_batch_file_bytes=1024)
    client = server.client(max_retries=0)
    two_kb = b'{"a": "' + b"x" * 2038 + b'"}\n'
    assert client.files.create(file=("notes.jsonl", two_kb), purpose="user_data").bytes == 2048
    with pytest.raises(openai.BadRequestError, match=r"File is too large\. The most a file with purpose 'batch'"):
        client.files.create(file=("in.jsonl", two_kb), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="File is too large"):
        client.files.create(file=("notes.jsonl", two_kb * 3), purpose="user_data")
    # The file before the purpose: the general limit while streaming, the batch limit once the purpose is known.
    body, content_type = multipart_body([("file", two_kb, "in.jsonl"), ("purpose", b"batch", None)])
    response = server.http().post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert_envelope(response, 400)
    assert response.json()["error"]["message"].startswith("File is too large.")
    assert [f.purpose for f in client.files.list().data] == ["user_data"] and len(server.stored_objects()) == 1


@pytest.mark.e2e
def test_oversized_upload_without_content_length_is_cut_off_while_streaming(server_factory):
    """A chunked upload announces no size: the limit is enforced on the bytes as they arrive."""
    limit = 256 * 1024
    server = server_factory(max_upload_bytes=limit, real_http=True)
    boundary = "bg-chunked-upload"
    content_type = f"multipart/form-data; boundary={boundary}"

    def body():
        yield f"--{boundary}\r\n".encode()
        yield b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'.encode()
        line = b'{"custom_id": "' + b"x" * 1000 + b'"}\n'
        for _ in range(2000):  # ~2 MB, far past the limit
            yield line
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        response = server.http().post("/v1/files", content=body(), headers={"Content-Type": content_type})
    except httpx.TransportError:
        response = None  # the server may hang up on the rest of the body before the client reads the answer
    if response is not None:
        assert_envelope(response, 400)
    assert server.stored_objects() == []
    assert server.client().files.list().data == []


def test_declared_content_length_over_the_limit_is_refused_before_reading(server_factory):
    server = server_factory(max_upload_bytes=1024)
    body, content_type = multipart_body([("purpose", b"batch", None), ("file", b"{}\n" * 2_000_000, "a.jsonl")])
    response = server.http().post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert_envelope(response, 400)
    assert response.json()["error"]["message"].startswith("File is too large.")
    assert server.stored_objects() == []


@pytest.mark.e2e
def test_large_upload_is_streamed_not_buffered(server_factory, tmp_path):
    """100 MB through the API (client and server in this process, over real HTTP: the in-process transport holds
    whole bodies) must not grow memory by anything like 100 MB."""
    size = 100 * 1024 * 1024
    server = server_factory(max_upload_bytes=size + 1024, real_http=True)
    line = b'{"custom_id": "' + b"x" * 4000 + b'"}\n'  # 4 kB lines: ~25,000 requests
    path = tmp_path / "big.jsonl"
    with path.open("wb") as out:
        for _ in range(size // len(line)):
            out.write(line)
    expected = path.stat().st_size

    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with path.open("rb") as f, server.http() as http:
            response = http.post("/v1/files", files={"file": ("big.jsonl", f)}, data={"purpose": "batch"})
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 200, response.text
    assert response.json()["bytes"] == expected
    growth = peak - baseline
    assert growth < 60 * 1024 * 1024, f"memory grew by {growth / 2**20:.0f} MiB during a 100 MiB upload"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"purpose": "batch"}'),
        ("multipart/form-data", b"no boundary"),
        ("multipart/form-data; boundary=xyz", b"garbage without any boundary"),
        (
            "multipart/form-data; boundary=xyz",
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n{}',
        ),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\nNo-Colon-Header\r\n\r\nx\r\n--xyz--\r\n"),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Disposition: attachment\r\n\r\nx\r\n--xyz--\r\n"),
    ],
)
def test_malformed_upload_bodies_are_400(server, content_type, body):
    response = server.http().post("/v1/files", content=body, headers={"Content-Type": content_type})
    assert_envelope(response, 400)
    assert server.stored_objects() == []


def test_two_file_parts_are_refused_and_nothing_is_kept(server):
    body, content_type = multipart_body(
        [("purpose", b"batch", None), ("file", b"{}\n", "a.jsonl"), ("file", b"{}\n", "b.jsonl")]
    )
    assert_envelope(
        server.http().post("/v1/files", content=body, headers={"Content-Type": content_type}), 400, param="file"
    )
    assert server.stored_objects() == []


# --- list -----------------------------------------------------------------------------------------


def test_list_files_paginates_with_the_sdk(server, client):
    ids = [client.files.create(file=(f"f{i}.jsonl", chat_lines(1)), purpose="batch").id for i in range(5)]
    other = client.files.create(file=("n.txt", b"note"), purpose="user_data").id

    everything = client.files.list()  # default limit 10,000: one page
    assert [f.id for f in everything.data] == [other, *reversed(ids)] and everything.has_more is False

    page = client.files.list(purpose="batch", limit=2)
    assert [f.id for f in page.data] == [ids[4], ids[3]] and page.has_more is True
    assert [f.id for f in client.files.list(purpose="batch", limit=2)] == list(reversed(ids))  # auto-pagination
    assert server.count("GET", "/v1/files") == 1 + 1 + 3

    assert [f.id for f in client.files.list(purpose="batch", order="asc", limit=2)] == ids
    assert [f.id for f in client.files.list(purpose="batch", order="asc", after=ids[1])] == ids[2:]

    raw = server.http().get("/v1/files", params={"purpose": "batch", "limit": 2, "order": "asc"}).json()
    assert set(raw) == {"object", "data", "first_id", "last_id", "has_more"}
    assert raw["object"] == "list" and raw["first_id"] == ids[0] and raw["last_id"] == ids[1] and raw["has_more"]
    assert set(raw["data"][0]) == FILE_KEYS


def test_deleting_every_file_while_the_sdk_pages_through_them_deletes_them_all(client):
    """The SDK asks for the next page after the last file of the one before, which the loop has deleted."""
    for i in range(5):
        client.files.create(file=(f"f{i}.jsonl", chat_lines(1)), purpose="batch")
    deleted = [client.files.delete(f.id).id for f in client.files.list(limit=2)]
    assert len(deleted) == 5 and client.files.list().data == []


def test_empty_file_list_has_null_ids(server):
    raw = server.http().get("/v1/files").json()
    assert raw == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"limit": 0}, "limit", "invalid_value"),
        ({"limit": 10_001}, "limit", "invalid_value"),
        ({"limit": "ten"}, "limit", "invalid_type"),
        ({"order": "sideways"}, "order", "invalid_value"),
    ],
)
def test_bad_file_list_parameters_are_400(server, params, param, code):
    assert_envelope(server.http().get("/v1/files", params=params), 400, param=param, code=code)


# --- retrieve, delete, content ------------------------------------------------------------------------


def test_unknown_file_is_404_everywhere(server, client):
    for call in (client.files.retrieve, client.files.delete, client.files.content):
        with pytest.raises(openai.NotFoundError) as caught:
            call("file-doesnotexist")
        assert caught.value.body["message"] == "No such File object: file-doesnotexist"
        assert caught.value.param == "id" and caught.value.type == "invalid_request_error"
        assert caught.value.request_id


def test_delete_removes_bytes_and_row(server, client):
    created = client.files.create(file=("a.jsonl", chat_lines(2)), purpose="batch")
    assert len(server.stored_objects()) == 1
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    assert server.stored_objects() == []
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_deleting_the_input_of_an_unfinished_batch_hides_it_but_keeps_its_bytes(server, client):
    created = client.files.create(file=("a.jsonl", chat_lines(2)), purpose="batch")
    batch = client.batches.create(input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h")
    stored = server.stored_objects()
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    # Gone for the user, as at OpenAI ...
    for call in (
        lambda: client.files.retrieve(created.id),
        lambda: client.files.content(created.id),
        lambda: client.files.delete(created.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert created.id not in {f.id for f in client.files.list()}
    with pytest.raises(openai.BadRequestError) as hidden:  # answered exactly as for a file that never existed
        client.batches.create(input_file_id=created.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError) as missing:
        client.batches.create(input_file_id="file-never", endpoint="/v1/chat/completions", completion_window="24h")
    assert hidden.value.body["message"] == missing.value.body["message"].replace("file-never", created.id)
    assert hidden.value.param == missing.value.param == "input_file_id"
    # ... but the runner can still read it by its key until the batch ends.
    assert server.stored_objects() == stored
    key = file_key("default", created.id)
    assert server.run(server.services.objects.get_bytes(key)) == chat_lines(2)
    assert client.batches.retrieve(batch.id).input_file_id == created.id


def test_delete_accepts_json_content_type_without_body(server, client):
    created = client.files.create(file=("a.jsonl", chat_lines(1)), purpose="batch")
    response = server.http().delete(
        f"/v1/files/{created.id}", headers={"Content-Type": "application/json", "Content-Length": "0"}
    )
    assert response.status_code == 200
    assert response.json() == {"id": created.id, "object": "file", "deleted": True}


def test_content_is_the_raw_bytes(server, client):
    data = chat_lines(2000)  # a few hundred kB, several chunks
    created = client.files.create(file=("a.jsonl", data), purpose="batch")
    content = client.files.content(created.id)
    assert content.content == data
    assert [json.loads(line)["custom_id"] for line in content.text.splitlines()][:2] == ["req-0", "req-1"]
    with client.files.with_streaming_response.content(created.id) as streamed:
        assert b"".join(streamed.iter_bytes()) == data
    with pytest.warns(DeprecationWarning):  # the SDK's deprecated str variant still works
        assert client.files.retrieve_content(created.id) == data.decode()
    raw = server.http().get(f"/v1/files/{created.id}/content", headers={"Accept": "application/binary"})
    assert raw.status_code == 200 and raw.content == data and raw.headers["x-request-id"]
    assert raw.headers["content-type"] == "application/octet-stream"


def test_content_of_a_file_whose_bytes_vanished_is_404(server, client):
    created = client.files.create(file=("a.jsonl", chat_lines(1)), purpose="batch")
    for path in server.stored_objects():
        path.unlink()
    with pytest.raises(openai.NotFoundError, match="No such File object"):
        client.files.content(created.id)
