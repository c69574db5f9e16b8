"""OpenAI parity, second pass (issue #14): one test per gap, with the openai SDK against the real `serve` process, on
SQLite + local files and on PostgreSQL + S3 (the `backend` fixture runs each test on both)."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from urllib.parse import urlparse

import httpx
import openai
import psycopg
import pytest

from tests.e2e.conftest import Gateway
from tests.helpers import chat_lines, eventually, jsonl, wait_for

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
THIRTY_DAYS = 30 * 86400


def upload(client, data: bytes, name: str = "input.jsonl", purpose: str = "batch"):
    return client.files.create(file=(name, io.BytesIO(data)), purpose=purpose)


def run(client, data: bytes, endpoint: str = CHAT, **kwargs):
    batch = client.batches.create(
        input_file_id=upload(client, data).id, endpoint=endpoint, completion_window="24h", **kwargs
    )
    return wait_for(client, batch.id)


def lines(endpoint: str, bodies: list[dict], method: str = "POST") -> bytes:
    rows = [{"custom_id": f"r{i}", "method": method, "url": endpoint, "body": body} for i, body in enumerate(bodies)]
    return ("\n".join(json.dumps(row) for row in rows) + "\n").encode()


def stored_keys(gateway: Gateway, backend: dict[str, str], s3_session) -> list[str]:
    """Every object the gateway stored, as keys relative to its object store (local directory or S3 bucket)."""
    url = backend.get("BATCH_GATEWAY_OBJECT_STORE")
    if url is None:
        root = gateway.data_dir / "objects"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    parsed = urlparse(url)
    prefix = parsed.path.strip("/") + "/"
    return sorted(key.removeprefix(prefix) for key in s3_session.keys(parsed.netloc))


def execute(gateway: Gateway, backend: dict[str, str], statement: str) -> list[tuple]:
    """SQL on the gateway's own database, behind its back (`?` placeholders on both)."""
    database = backend.get("BATCH_GATEWAY_DATABASE_URL")
    if database is None:
        with sqlite3.connect(gateway.data_dir / "metadata.sqlite3") as connection:
            return connection.execute(statement).fetchall()
    with psycopg.connect(database, autocommit=True) as connection:
        cursor = connection.execute(statement)
        return cursor.fetchall() if cursor.description else []


# --- 1. the Uploads API -------------------------------------------------------------------------------------------


def test_1_upload_file_chunked_feeds_a_batch(gateway, client, backend, request, tmp_path):
    data = chat_lines(60)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(data)
    done = client.uploads.upload_file_chunked(
        file=path, mime_type="text/jsonl", purpose="batch", part_size=1500, md5=hashlib.md5(data).hexdigest()
    )
    assert done.status == "completed" and done.file.bytes == len(data) and done.file.purpose == "batch"
    assert client.files.content(done.file.id).content == data
    batch = client.batches.create(input_file_id=done.file.id, endpoint=CHAT, completion_window="24h")
    finished = wait_for(client, batch.id)
    assert finished.status == "completed" and finished.request_counts.completed == 60
    s3 = request.getfixturevalue("s3_session") if backend else None
    assert not [key for key in stored_keys(gateway, backend, s3) if "/uploads/" in key]  # the parts are gone


def test_1_cancelled_and_expired_uploads_lose_their_parts(gateway, client, backend, request):
    s3 = request.getfixturevalue("s3_session") if backend else None
    data = chat_lines(3)
    cancelled = client.uploads.create(bytes=len(data), filename="a.jsonl", mime_type="text/jsonl", purpose="batch")
    client.uploads.parts.create(cancelled.id, data=data)
    assert client.uploads.cancel(cancelled.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.uploads.parts.create(cancelled.id, data=data)

    expiring = client.uploads.create(bytes=len(data), filename="b.jsonl", mime_type="text/jsonl", purpose="batch")
    part = client.uploads.parts.create(expiring.id, data=data)
    assert [key for key in stored_keys(gateway, backend, s3) if "/uploads/" in key] == [
        f"default/uploads/{expiring.id}/{part.id}"
    ]
    # An hour later (the database says so): the upload is expired, and gc (every second here) deletes its part.
    execute(gateway, backend, f"UPDATE uploads SET expires_at = created_at - 1 WHERE id = '{expiring.id}'")
    with pytest.raises(openai.ConflictError, match="status 'expired'"):
        client.uploads.complete(expiring.id, part_ids=[part.id])
    eventually(
        lambda: not [key for key in stored_keys(gateway, backend, s3) if "/uploads/" in key],
        timeout=20,
        interval=0.2,
        what="the upload's parts to be deleted",
    )
    assert execute(gateway, backend, f"SELECT status FROM uploads WHERE id = '{expiring.id}'") == [("expired",)]
    assert client.uploads.cancel(expiring.id).status == "expired"


# --- 2. every batch endpoint of the spec --------------------------------------------------------------------------


def test_2_moderations_run_end_to_end_and_unserved_endpoints_are_refused_by_name(client):
    data = lines("/v1/moderations", [{"model": "sim-model", "input": f"text number {i}"} for i in range(5)])
    done = run(client, data, endpoint="/v1/moderations")
    assert done.status == "completed" and done.request_counts.completed == 5, done
    for line in jsonl(client.files.content(done.output_file_id).content):
        assert line["response"]["status_code"] == 200 and len(line["response"]["body"]["results"]) == 1
    file_id = upload(client, lines("/v1/images/generations", [{"model": "sim-model", "prompt": "a fox"}])).id
    for endpoint in ("/v1/images/generations", "/v1/images/edits", "/v1/videos"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
        assert caught.value.param == "endpoint" and endpoint in caught.value.message


# --- 3. validation does not depend on set-up ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["URL", "MODEL=URL", "--simulate"])
def test_3_an_unknown_model_fails_validation_in_every_upstream_mode(gateway_factory, sim, mode):
    if mode == "--simulate":
        gateway = gateway_factory(None, args=["--simulate"])
    else:
        gateway = gateway_factory(sim.url if mode == "URL" else f"sim-model={sim.url}")
    client = gateway.client()
    done = run(client, chat_lines(3, model="gpt-4o-mini"))
    assert done.status == "failed" and done.output_file_id is None
    assert [(e.code, e.param, e.line) for e in done.errors.data] == [("model_not_found", "body.model", 1)]
    assert "'gpt-4o-mini'" in done.errors.data[0].message and "sim-model" in done.errors.data[0].message
    assert run(client, chat_lines(2)).status == "completed"


# --- 4. a UTF-8 byte-order mark -----------------------------------------------------------------------------------


def test_4_a_byte_order_mark_is_accepted_and_the_batch_runs(client):
    data = b"\xef\xbb\xbf" + chat_lines(4)
    assert upload(client, data).bytes == len(data)
    done = run(client, data)
    assert done.status == "completed" and done.request_counts.completed == 4, done


# --- 5. file expiry defaults ----------------------------------------------------------------------------------------


def test_5_only_batch_inputs_expire_by_default(client):
    ok = chat_lines(3)
    rejected = lines(CHAT, [{"model": "sim-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}])
    data = ok + rejected.replace(b'"r0"', b'"bad"')  # the upstream answers 400: an error file too
    input_file = upload(client, data)
    assert input_file.expires_at == input_file.created_at + THIRTY_DAYS
    batch = client.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    done = wait_for(client, batch.id)
    assert done.output_file_id and done.error_file_id, done
    for file_id in (done.output_file_id, done.error_file_id):
        assert client.files.retrieve(file_id).expires_at is None  # kept until deleted
    assert upload(client, b"notes", "notes.txt", purpose="user_data").expires_at is None
    timed = run(client, data, extra_body={"output_expires_after": {"anchor": "created_at", "seconds": 7200}})
    for file_id in (timed.output_file_id, timed.error_file_id):
        result = client.files.retrieve(file_id)
        assert result.expires_at == result.created_at + 7200


# --- 6. per-purpose size limits -----------------------------------------------------------------------------------


def test_6_size_limits_are_per_purpose_with_openais_error(gateway_factory, sim):
    limits = {"BATCH_GATEWAY_MAX_BATCH_FILE_BYTES": "3000", "BATCH_GATEWAY_MAX_UPLOAD_BYTES": "6000"}
    client = gateway_factory(sim.url, env=limits).client(max_retries=0)
    data = chat_lines(8)
    assert 3000 < len(data) < 6000
    with pytest.raises(openai.BadRequestError) as caught:
        upload(client, data)
    assert caught.value.status_code == 400 and caught.value.code is None
    assert caught.value.body["message"].startswith("File is too large.") and caught.value.body["param"] is None
    assert upload(client, data, "data.jsonl", purpose="user_data").bytes == len(data)
    with pytest.raises(openai.BadRequestError, match="File is too large"):
        upload(client, data * 2, "data.jsonl", purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="File is too large"):
        client.uploads.create(bytes=len(data), filename="in.jsonl", mime_type="text/jsonl", purpose="batch")


# --- 7. Responses lines -------------------------------------------------------------------------------------------


def test_7_responses_lines_take_input_prompt_or_conversation(client):
    bodies = [
        {"model": "sim-model", "input": "hello", "max_output_tokens": 4},
        {"model": "sim-model", "prompt": {"id": "pmpt_123", "variables": {"city": "Oslo"}}, "max_output_tokens": 4},
        {"model": "sim-model", "conversation": "conv_123", "max_output_tokens": 4},
    ]
    done = run(client, lines("/v1/responses", bodies), endpoint="/v1/responses")
    assert done.status == "completed" and done.request_counts.completed == 3, done
    failed = run(client, lines("/v1/responses", [{"model": "sim-model"}]), endpoint="/v1/responses")
    assert [(e.code, e.param) for e in failed.errors.data] == [("invalid_request", "body.input")]


# --- 8. completion_window ------------------------------------------------------------------------------------------


def test_8_completion_window_shows_the_operators_window(gateway_factory, sim):
    client = gateway_factory(sim.url, env={"BATCH_GATEWAY_COMPLETION_WINDOW_SECONDS": "3600"}).client()
    batch = client.batches.create(
        input_file_id=upload(client, chat_lines(2)).id, endpoint=CHAT, completion_window="24h"
    )
    assert batch.completion_window == "1h" and batch.expires_at == batch.created_at + 3600
    assert wait_for(client, batch.id).completion_window == "1h"
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=batch.input_file_id, endpoint=CHAT, completion_window="1h")


# --- 9. internal addresses ----------------------------------------------------------------------------------------


def test_9_tenants_never_see_an_upstream_address(gateway_factory, sim_factory):
    sim = sim_factory(timeout_rate=1.0, timeout_seconds=30)  # every request hangs: each times out
    env = {"BATCH_GATEWAY_REQUEST_TIMEOUT": "0.3", "BATCH_GATEWAY_MAX_ATTEMPTS": "1"}
    gateway = gateway_factory(f"sim-model={sim.url}", env=env)
    client = gateway.client()
    done = run(client, chat_lines(3))
    assert done.status == "completed" and done.request_counts.failed == 3, done
    errors = client.files.content(done.error_file_id).content
    assert {line["error"]["code"] for line in jsonl(errors)} == {"request_timeout"}
    stats = httpx.get(f"{gateway.base_url}/batches/{done.id}/run_stats", headers={"Authorization": "Bearer x"})
    assert stats.status_code == 200 and "endpoint-0" in stats.json()["endpoints"]
    unknown = run(client, chat_lines(1, model="gpt-nope"))
    seen = b"".join([errors, stats.content, done.model_dump_json().encode(), unknown.model_dump_json().encode()])
    for address in (sim.url, f":{sim.port}", "127.0.0.1"):
        assert address.encode() not in seen, address


# --- 10. strictness ----------------------------------------------------------------------------------------------


def test_10_lowercase_post_is_refused_and_errors_come_in_line_order(client):
    good = json.loads(chat_lines(1))
    rows = [
        {**good, "custom_id": "a"},
        {**good, "custom_id": "a"},  # a duplicate: found only after the whole file was read
        {**good, "custom_id": "b", "method": "post"},
        "{not json",
    ]
    data = "\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows).encode() + b"\n"
    done = run(client, data)
    assert done.status == "failed"
    assert [(e.code, e.param, e.line) for e in done.errors.data] == [
        ("duplicate_custom_id", "custom_id", 2),
        ("invalid_value", "method", 3),
        ("invalid_json_line", None, 4),
    ]
