"""A span per API request, when tracing is on: named by route, continuing the caller's trace, with the tenant and the
batch id. The SDK's in-memory exporter stands in for a collector (the runner's test uses real OTLP)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from batch_gateway import tracing
from batch_gateway.settings import Settings
from tests.helpers import chat_lines, eventually

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    assert tracing.configure(Settings(), "batch-gateway-api", exporter=exporter)
    yield exporter
    tracing.shutdown()


def test_each_request_is_a_span_with_tenant_and_batch(server_factory, spans):
    server = server_factory(upstream=[])
    client = server.client()
    upload = client.files.create(file=("in.jsonl", chat_lines(2)), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"},
    )
    client.batches.retrieve(batch.id)
    with server.http() as http:
        assert http.get("/v1/batches/batch_missing").status_code == 404
    # A span ends just after its response is sent: wait for the last one (the 404) to end.
    eventually(lambda: len(spans.get_finished_spans()) >= 4, timeout=5, interval=0.01, what="four finished spans")
    finished = {s.name: s for s in spans.get_finished_spans()}
    create = finished["POST /v1/batches"]
    assert create.context.trace_id == int(CALLER_TRACE, 16) and create.parent.span_id == int(CALLER_SPAN, 16)
    assert create.attributes["batch_gateway.tenant"] == "default"
    assert create.attributes["batch_gateway.batch_id"] == batch.id
    assert create.attributes["http.response.status_code"] == 200
    assert create.resource.attributes["service.name"] == "batch-gateway-api"
    retrieve = [s for s in spans.get_finished_spans() if s.name == "GET /v1/batches/{batch_id}"]
    assert [s.attributes["batch_gateway.batch_id"] for s in retrieve] == [batch.id, "batch_missing"]
    assert retrieve[1].attributes["http.response.status_code"] == 404
    assert finished["POST /v1/files"].attributes["batch_gateway.tenant"] == "default"


def test_tracing_is_off_without_an_endpoint(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.configure(Settings(), "x") and tracing.tracer() is None
    from batch_gateway.api.tracing import tracing_middleware

    app = object()
    assert tracing_middleware(app) is app, "off, the middleware is not even installed"
    assert tracing.endpoint_of(Settings(otlp_endpoint="http://c:4318/")) == "http://c:4318/v1/traces"
    assert (
        tracing.endpoint_of(Settings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "http://c:4318/v1/traces"
    )
    assert (
        tracing.endpoint_of(Settings(), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/t"}) == "http://c:4318/t"
    )
    assert tracing.endpoint_of(Settings(otlp_endpoint="http://c"), {"OTEL_SDK_DISABLED": "true"}) is None
