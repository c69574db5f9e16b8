"""Traces of a batch run, end to end: the real runner process exports over real OTLP/HTTP to an in-process receiver,
and sends its requests through a recording proxy to the simulator, so the test sees both the spans and the
`traceparent` headers the model server got."""

from __future__ import annotations

import asyncio
import re

import pytest

from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.fixtures.otlp import OtlpReceiver
from tests.fixtures.recording_proxy import RecordingProxy
from tests.helpers import chat_lines
from tests.runner.stack import create_batch, results, start_runner

pytestmark = pytest.mark.process

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])$")
LINES = 40


def run_traced(tmp_path, receiver: OtlpReceiver | None, ratio: float) -> tuple[str, list[dict[str, str]]]:
    with SimServer(SimConfig(time_scale=0.01, seed=3)) as sim, RecordingProxy(sim.url) as proxy:
        settings = Settings(
            data_dir=str(tmp_path),
            upstream=[proxy.url],
            log_format="json",
            otlp_endpoint=receiver.url if receiver else "",
            trace_upstream_sample_ratio=ratio,
            prefix_warm_up=False,  # one traced request per line
        )
        batch_id = asyncio.run(create_batch(settings, chat_lines(LINES)))
        with open(tmp_path / "runner.log", "ab") as log:
            assert start_runner(settings, batch_id, log).wait(120) == 0, (tmp_path / "runner.log").read_text()
        batch, out, _ = asyncio.run(results(settings, batch_id))
        assert batch.status == "completed" and len(out) == LINES
        # The batch's own requests (the catalog's `{}` probes and /v1/models are not part of the run)
        sent = [headers for method, path, body, headers in proxy.requests if method == "POST" and body != b"{}"]
    assert len(sent) == LINES
    return batch_id, sent


def test_a_batch_run_is_one_trace_that_the_upstream_joins(tmp_path):
    with OtlpReceiver() as receiver:
        batch_id, sent = run_traced(tmp_path, receiver, ratio=0.5)
    (run,) = [s for s in receiver.spans if s["name"] == "batch.run"]
    assert run["service"] == "batch-gateway-runner" and not run["error"]
    assert run["attributes"]["batch_gateway.batch_id"] == batch_id and run["attributes"]["batch_gateway.tenant"] == "t"
    assert run["attributes"]["batch_gateway.status"] == "completed"
    upstream = {s["span_id"]: s for s in receiver.spans if s["name"] == "POST /v1/chat/completions"}
    assert 0 < len(upstream) < LINES, "about half the requests are sampled"
    for span in upstream.values():
        assert span["trace_id"] == run["trace_id"] and span["parent_span_id"] == run["span_id"]
        assert (
            span["attributes"]["batch_gateway.batch_id"] == batch_id
            and span["attributes"]["batch_gateway.tenant"] == "t"
        )
        assert span["attributes"]["http.response.status_code"] == 200
    # Every request carried a traceparent of the run's trace: a sampled one names its own span (so the engine's spans
    # hang under it), an unsampled one names the run and says "not sampled" (so the engine does not trace it).
    parents = [TRACEPARENT.match(h.get("traceparent") or h.get("Traceparent") or "") for h in sent]
    assert all(parents), sent[0]
    assert {m.group(1) for m in parents} == {run["trace_id"]}
    sampled = [m.group(2) for m in parents if m.group(3) == "01"]
    assert sorted(sampled) == sorted(upstream)
    assert {m.group(2) for m in parents if m.group(3) == "00"} == {run["span_id"]}


def test_without_an_endpoint_nothing_is_traced_or_propagated(tmp_path, monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    _, sent = run_traced(tmp_path, None, ratio=1.0)
    assert not any("traceparent" in {k.lower() for k in headers} for headers in sent)


def test_trace_headers_join_the_headers_a_request_already_has():
    """`post(headers=...)` (priority hints, for instance) keeps its headers and adds the traceparent."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from batch_gateway import tracing
    from batch_gateway.runner.upstream import UpstreamClient

    exporter = InMemorySpanExporter()
    tracing.configure(Settings(), "batch-gateway-runner", exporter=exporter)
    try:
        with SimServer(SimConfig(time_scale=0.01)) as sim, RecordingProxy(sim.url) as proxy:

            async def send() -> None:
                run = tracing.tracer().start_span("batch.run")
                async with UpstreamClient() as client:
                    client.tracing = tracing.upstream_tracing(run, 1.0, {tracing.BATCH_ID: "batch_x"})
                    body = chat_lines(1).split(b'"body": ')[1].rsplit(b"}", 1)[0]
                    exchange = await client.post(proxy.url, "/v1/chat/completions", body, 30, headers={"x-hint": "1"})
                    assert exchange.ok, exchange.body
                run.end()

            asyncio.run(send())
            (headers,) = [h for method, _, _, h in proxy.requests if method == "POST"]
    finally:
        tracing.shutdown()
    lowered = {k.lower(): v for k, v in headers.items()}
    assert lowered["x-hint"] == "1" and TRACEPARENT.match(lowered["traceparent"])
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/chat/completions"]
    assert lowered["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"
