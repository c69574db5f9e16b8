"""Cross-cutting HTTP behaviour: request ids, the error envelope everywhere, no 5xx for bad input, probes, logs."""

from __future__ import annotations

import random

import openai
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from batch_gateway.errors import StorageUnavailable
from batch_gateway.store.signals import NullSignals
from tests.api.forms import assert_envelope, multipart_body
from tests.helpers import chat_lines, free_port


def test_every_response_has_a_request_id(server, client):
    http = server.http()
    created = client.files.with_raw_response.create(file=("x.jsonl", chat_lines(1)), purpose="batch")
    assert created.headers["x-request-id"].startswith("req_")
    assert created.parse()._request_id == created.headers["x-request-id"]
    responses = [
        http.get("/v1/files"),
        http.get("/v1/files/file-nope"),  # 404
        http.get("/v1/batches", params={"limit": 0}),  # 400
        http.get("/v1/nothing-here"),  # unknown route
        http.put("/v1/batches"),  # wrong method
        http.get("/health"),
        http.get("/ready"),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(i and i.startswith("req_") for i in ids), ids
    assert len(set(ids)) == len(ids)
    with pytest.raises(openai.NotFoundError) as caught:
        client.batches.retrieve("batch_missing")
    assert caught.value.request_id and caught.value.request_id.startswith("req_")


def test_a_valid_incoming_request_id_is_echoed_and_a_bad_one_replaced(server):
    http = server.http()
    assert http.get("/v1/files", headers={"x-request-id": "trace-123.abc"}).headers["x-request-id"] == "trace-123.abc"
    replaced = http.get("/v1/files", headers={"x-request-id": "bad id\twith spaces"}).headers["x-request-id"]
    assert replaced.startswith("req_")


def test_unknown_routes_and_methods_get_the_envelope(server, client):
    error = assert_envelope(server.http().get("/v1/nothing-here"), 404)
    assert error["message"] == "Invalid URL (GET /v1/nothing-here)"
    assert_envelope(server.http().get("/"), 404)
    assert_envelope(server.http().delete("/v1/batches"), 405)
    assert_envelope(server.http().post("/v1/files/file-x"), 405)
    with pytest.raises(openai.NotFoundError):
        client.get("/models", cast_to=object)


def test_garbage_never_gets_a_5xx(server, client):
    """Throw odd bodies, headers and parameters at every endpoint: always a 4xx envelope (or a 2xx), never a 5xx."""
    file_id = client.files.create(file=("x.jsonl", chat_lines(1)), purpose="batch").id
    batch_id = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h").id
    rng = random.Random(7)
    bodies = [b"", b"{", b"null", b"[1,2]", b'{"a":', bytes(rng.randrange(256) for _ in range(512)), b"\x00" * 64,
              b'{"input_file_id": {"$ne": null}}', "ünïcødé".encode(), b"--x\r\n\r\n--x--"]  # fmt: skip
    content_types = [None, "application/json", "text/plain", "multipart/form-data", "multipart/form-data; boundary=x",
                     "application/x-www-form-urlencoded"]  # fmt: skip
    routes = [
        ("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"), ("POST", "/v1/batches"), ("GET", "/v1/batches"),
        ("GET", f"/v1/batches/{batch_id}"), ("POST", "/v1/batches/batch_x/cancel"), ("DELETE", "/v1/files/file-x"),
        ("GET", "/v1/files/%00%ff"), ("GET", "/v1/batches/" + "x" * 5000), ("PATCH", "/v1/files"),
    ]  # fmt: skip
    queries = [{}, {"limit": "-1"}, {"limit": "1e9"}, {"after": "\x00"}, {"order": "🙃"}, {"purpose": "x" * 3000},
               {"limit": ""}, {"after": "batch_doesnotexist"}]  # fmt: skip
    http = server.http()
    seen = 0
    for method, path in routes:
        for body in bodies:
            content_type = rng.choice(content_types)
            headers = {"Content-Type": content_type} if content_type else {}
            response = http.request(method, path, content=body, headers=headers, params=rng.choice(queries))
            seen += 1
            assert response.status_code < 500, (method, path, body, response.status_code, response.text)
            assert response.headers.get("x-request-id")
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert seen == len(routes) * len(bodies)
    # the garbage did not hurt the good objects
    assert client.files.retrieve(file_id).id == file_id


def test_storage_outage_is_503_with_retry_after_and_the_sdk_retries(server):
    metadata = server.services.metadata

    async def unavailable(*args, **kwargs):
        raise StorageUnavailable("database is down (test)")

    metadata.get_batch = unavailable  # an outage of the real store, for this instance only
    try:
        client = server.client(max_retries=1)
        with pytest.raises(openai.InternalServerError) as caught:
            client.batches.retrieve("batch_any")
        assert caught.value.status_code == 503 and caught.value.type == "server_error"
        assert caught.value.response.headers["retry-after"] == "1"
        assert server.count("GET", "/v1/batches/batch_any") == 2  # 503 is worth retrying, and the SDK did
    finally:
        del metadata.get_batch


def test_a_bug_is_a_500_envelope(server):
    async def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug (test)")

    server.services.metadata.list_batches = broken
    try:
        error = assert_envelope(server.http().get("/v1/batches"), 500)
        assert error["type"] == "server_error" and "a bug" not in error["message"]  # internals do not leak
    finally:
        del server.services.metadata.list_batches


def test_health(server):
    response = server.http(api_key=None).get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_ready_reports_every_component(server):
    response = server.http(api_key=None).get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "metadata": "ok", "objects": "ok", "signals": "disabled"}


class DownSignals(NullSignals):
    state = "down"


def test_valkey_down_does_not_make_the_gateway_unready(server_factory):
    server = server_factory(signals=DownSignals())
    response = server.http().get("/ready")
    assert response.status_code == 200 and response.json()["signals"] == "down"


def test_unreachable_object_store_makes_it_unready(server_factory, monkeypatch):
    # A real S3 client pointed at a loopback port nobody listens on.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    server = server_factory(object_store_url="s3://nowhere/prefix")
    response = server.http().get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "metadata": "ok", "objects": "down", "signals": "disabled"}
    assert response.headers["x-request-id"]


@pytest.fixture
def captured_logs():
    """Log entries as the handlers emit them, context variables (request id, tenant) merged in."""
    capture = structlog.testing.LogCapture()
    old = structlog.get_config()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, capture])
    try:
        yield capture.entries
    finally:
        structlog.configure(**old)


def test_one_access_log_line_per_request_with_request_id_and_tenant(server, captured_logs):
    logs = captured_logs
    response = server.http().get("/v1/batches")
    server.http().get("/v1/missing")
    body, content_type = multipart_body([("purpose", b"batch", None), ("file", chat_lines(1), "a.jsonl")])
    upload = server.http().post("/v1/files", content=body, headers={"Content-Type": content_type})
    access = [entry for entry in logs if entry["event"] == "http.request"]
    assert [(e["method"], e["path"], e["status"]) for e in access] == [
        ("GET", "/v1/batches", 200),
        ("GET", "/v1/missing", 404),
        ("POST", "/v1/files", 200),
    ]
    assert access[0]["request_id"] == response.headers["x-request-id"] and access[0]["tenant"] == "default"
    assert isinstance(access[0]["duration_ms"], float)
    uploaded = [e for e in logs if e["event"] == "file.uploaded"]
    assert len(uploaded) == 1  # a handler's own line carries the request's id and tenant too
    assert uploaded[0]["request_id"] == upload.headers["x-request-id"] and uploaded[0]["tenant"] == "default"


def test_router_404_and_405_are_counted_in_metrics(server):
    http = server.http()

    def counted() -> dict[tuple[str, str, str], float]:
        text = http.get("/metrics").text
        return {
            (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "batch_gateway_http_requests_total"
        }

    before = counted()
    assert_envelope(http.get("/v1/nothing-here"), 404)
    assert_envelope(http.put("/v1/batches"), 405)
    assert_envelope(http.get("/v1/files/file-nope"), 404)  # a handler's 404, counted before too
    after = counted()
    grew = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert grew.pop(("GET", "/metrics", "200")) == 1
    assert grew == {
        ("GET", "unmatched", "404"): 1,
        ("PUT", "unmatched", "405"): 1,
        ("GET", "/v1/files/{file_id}", "404"): 1,
    }


def test_every_response_says_not_to_sniff_or_frame_it(server):
    http = server.http()
    for response in (http.get("/v1/files"), http.get("/v1/nothing-here"), http.put("/v1/batches"), http.get("/health")):
        assert response.headers["x-content-type-options"] == "nosniff", response.url
        assert response.headers["x-frame-options"] == "DENY", response.url


def test_metrics_report_deadlines_and_both_stores(server, client):
    """What the alerts read: batches overdue and near their deadline, and whether each store answers."""
    from batch_gateway import ids
    from batch_gateway.store.metadata import BatchRecord

    def gauges() -> dict[str, float]:
        text = server.http().get("/metrics").text
        return {
            s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels
        }

    now = ids.now()
    for created, expires in ((now - 7200, now - 60), (now - 3500, now + 100), (now - 100, now + 3500)):
        server.run(
            server.services.metadata.insert_batch(
                BatchRecord(
                    id=ids.new_batch_id(),
                    tenant="default",
                    endpoint="/v1/chat/completions",
                    input_file_id="file-x",
                    completion_window="1h",
                    status="in_progress",
                    created_at=created,
                    expires_at=expires,
                )
            )
        )
    seen = gauges()
    assert seen["batch_gateway_batches_overdue"] == 1 and seen["batch_gateway_batches_near_deadline"] == 1
    assert seen["batch_gateway_metadata_up"] == 1 and seen["batch_gateway_object_store_up"] == 1


def test_metrics_say_when_the_object_store_is_down(server_factory, monkeypatch):
    # A real S3 client pointed at a loopback port nobody listens on (as the /ready test above).
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    server = server_factory(object_store_url="s3://nowhere/prefix")
    text = server.http().get("/metrics").text
    values = {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if not s.labels
    }
    assert values["batch_gateway_object_store_up"] == 0 and values["batch_gateway_metadata_up"] == 1
