"""OpenTelemetry traces over OTLP/HTTP, off unless an endpoint is configured.

On when `--otlp-endpoint` (BATCH_GATEWAY_OTLP_ENDPOINT) or the standard OTEL_EXPORTER_OTLP_ENDPOINT /
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, and OTEL_SDK_DISABLED is not true. Then:

- the API makes one span per request (`api/tracing.py`), continuing the caller's W3C `traceparent`;
- a runner makes one span per batch run, and a child span for a share of its upstream requests
  (`--trace-upstream-sample-ratio`), whose `traceparent` goes to the upstream so vLLM's and llm-d's spans join the
  trace. Every other upstream request carries the run's `traceparent` flagged "not sampled", so the engine, which
  follows its parent's decision, does not trace it either.

Spans carry the batch id and tenant (`batch_gateway.batch_id`, `batch_gateway.tenant`). The standard OTEL_* variables
(OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, OTEL_EXPORTER_OTLP_HEADERS, ...) apply as usual. Off, the SDK is not even
imported, and each hook costs one `is None` test.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from batch_gateway.runner.upstream import Exchange
    from batch_gateway.settings import Settings

log = structlog.get_logger("tracing")

BATCH_ID = "batch_gateway.batch_id"
TENANT = "batch_gateway.tenant"
TRACES_PATH = "/v1/traces"

_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def endpoint_of(settings: Settings, environ: Mapping[str, str] | None = None) -> str | None:
    """Where spans go, or None when tracing is off."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if settings.otlp_endpoint:
        return settings.otlp_endpoint.rstrip("/") + TRACES_PATH
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    if environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + TRACES_PATH
    return None


def configure(settings: Settings, service: str, *, exporter: SpanExporter | None = None) -> bool:
    """Start tracing for this process as `service` if an endpoint is configured (or, in tests, with `exporter`,
    which gets every span at once). Returns whether tracing is on."""
    global _provider, _tracer
    endpoint = endpoint_of(settings)
    if exporter is None and endpoint is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    shutdown()
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    _provider, _tracer = provider, provider.get_tracer("batch_gateway")
    log.info("tracing.on", service=service, endpoint=endpoint or "in-process")
    return True


def shutdown() -> None:
    """Send what is buffered and stop tracing."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def tracer() -> Tracer | None:
    """The process's tracer, or None while tracing is off."""
    return _tracer


def extract(headers: Mapping[str, str]) -> Any:
    """The trace context a caller sent (`traceparent`, `tracestate`)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(headers)


def traceparent(span: Span, *, sampled: bool | None = None) -> dict[str, str]:
    """The W3C header naming `span` as the parent, with its own sampling flag unless `sampled` overrides it."""
    context = span.get_span_context()
    flag = context.trace_flags.sampled if sampled is None else sampled
    return {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{'01' if flag else '00'}"}


class UpstreamTracing:
    """The upstream requests of one batch run: a sampled few get a span of their own (child of the run's span);
    every request carries a `traceparent`. Made by `upstream_tracing`; used by `UpstreamClient.post`."""

    def __init__(self, tracer: Tracer, run: Span, ratio: float, attributes: dict[str, str]) -> None:
        from opentelemetry.trace import SpanKind, set_span_in_context

        self._tracer = tracer
        self._parent = set_span_in_context(run)
        self._kind = SpanKind.CLIENT
        self._ratio = ratio
        self._attributes = attributes
        # Not sampled: the engine must not trace it either; one header for the whole run, built once.
        self._unsampled = traceparent(run, sampled=False)

    def start(self, endpoint: str, path: str) -> tuple[dict[str, str], Span | None]:
        """The headers to add to one attempt, and its span if it is sampled (end it with `end`)."""
        if self._ratio <= 0 or random.random() >= self._ratio:
            return self._unsampled, None
        span = self._tracer.start_span(
            f"POST {path}",
            context=self._parent,
            kind=self._kind,
            attributes={**self._attributes, "http.request.method": "POST", "url.full": endpoint + path},
        )
        return traceparent(span), span

    @staticmethod
    def end(span: Span, exchange: Exchange) -> None:
        from opentelemetry.trace import StatusCode

        if exchange.status:
            span.set_attribute("http.response.status_code", exchange.status)
        if not exchange.ok:
            span.set_attribute("error.type", str(exchange.status) if exchange.status else (exchange.failure or "error"))
            span.set_status(StatusCode.ERROR)
        span.end()


def upstream_tracing(run: Span | None, ratio: float, attributes: dict[str, str]) -> UpstreamTracing | None:
    """Tracing for the upstream requests of the run `run`, or None while tracing is off."""
    if _tracer is None or run is None:
        return None
    return UpstreamTracing(_tracer, run, ratio, attributes)
