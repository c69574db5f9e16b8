"""One OpenTelemetry span per API request, when tracing is on (batch_gateway/tracing.py).

The span continues the caller's W3C `traceparent`, is named by the route template (`POST /v1/batches`, never a path
with ids in it) and carries the tenant, the batch id when the request is about one, the status and the request id.
Off, the middleware is not installed at all.
"""

from __future__ import annotations

from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from batch_gateway import tracing
from batch_gateway.api.context import BATCH_STATE, TENANT_STATE, request_id_of

TRACE_HEADERS = (b"traceparent", b"tracestate")


def tracing_middleware(app: ASGIApp) -> ASGIApp:
    tracer = tracing.tracer()
    if tracer is None:
        return app
    from opentelemetry.trace import SpanKind, StatusCode

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        carrier = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() in TRACE_HEADERS
        }
        method = scope.get("method", "")
        status: dict[str, int] = {}

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        with tracer.start_as_current_span(
            method, context=tracing.extract(carrier), kind=SpanKind.SERVER, attributes={"http.request.method": method}
        ) as span:
            try:
                await app(scope, receive, send_and_note)
            finally:
                route = scope.get("path_template") or "unmatched"
                span.update_name(f"{method} {route}")
                state: dict[str, Any] = scope.get("state", {})
                path_params: dict[str, Any] = scope.get("path_params") or {}
                attributes = {
                    "http.route": route,
                    "url.path": scope.get("path", ""),
                    "batch_gateway.request_id": request_id_of(scope),
                    tracing.TENANT: state.get(TENANT_STATE),
                    tracing.BATCH_ID: state.get(BATCH_STATE) or path_params.get("batch_id"),
                    "http.response.status_code": status.get("code"),
                }
                span.set_attributes({k: v for k, v in attributes.items() if v is not None})
                if status.get("code", 500) >= 500:
                    span.set_status(StatusCode.ERROR)

    return middleware
