"""Per-request context: the request id, structlog bindings and the access log.

The request id is stamped on every response from Litestar's `before_send` hook, because it is the only hook that also
sees responses the router produces itself (unknown route, wrong method) before any middleware runs. The same hook
counts every response in the metrics; a router-produced response, answered before any middleware could start the
clock, starts it when the response starts.
"""

from __future__ import annotations

import re
import time
from typing import Any

import structlog
from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from batch_gateway import ids
from batch_gateway.api import metrics

log = structlog.get_logger("api.access")

REQUEST_ID_HEADER = "x-request-id"
# An incoming id is echoed only when it is short and plain, so it cannot smuggle anything into headers or logs.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

_STATE_REQUEST_ID = "request_id"
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY"}
_STATE_STARTED = "started_at"
_STATE_STATUS = "status_code"
TENANT_STATE = "tenant"
BATCH_STATE = "batch_id"  # the batch a request created, for its trace span


def request_id_of(scope: Scope) -> str:
    """The request's id, chosen on first use: the client's own if valid, else a new `req_...`."""
    state = scope.setdefault("state", {})
    request_id = state.get(_STATE_REQUEST_ID)
    if request_id is None:
        incoming = _header(scope, REQUEST_ID_HEADER)
        request_id = incoming if incoming and _VALID_REQUEST_ID.match(incoming) else ids.new_request_id()
        state[_STATE_REQUEST_ID] = request_id
    return request_id


def request_context_middleware(app: ASGIApp) -> ASGIApp:
    """Bind the request id to every log line the handler writes, and start the access-log clock."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await app(scope, receive, send)
            return
        scope.setdefault("state", {}).setdefault(_STATE_STARTED, time.perf_counter())
        with structlog.contextvars.bound_contextvars(request_id=request_id_of(scope)):
            await app(scope, receive, send)

    return middleware


async def stamp_response(message: Message, scope: Scope) -> None:
    """`before_send` hook: add x-request-id to every response and write one access-log line when it ends."""
    if scope.get("type") != ScopeType.HTTP:
        return
    if message["type"] == "http.response.start":
        headers = MutableScopeHeaders.from_message(message)
        headers[REQUEST_ID_HEADER] = request_id_of(scope)
        for name, value in SECURITY_HEADERS.items():  # the API serves JSON and files, never pages to frame or sniff
            headers.setdefault(name, value)
        scope["state"][_STATE_STATUS] = message["status"]
        scope["state"].setdefault(_STATE_STARTED, time.perf_counter())
    elif message["type"] == "http.response.body" and not message.get("more_body", False):
        _access_log(scope)


def _access_log(scope: Scope) -> None:
    state: dict[str, Any] = scope.get("state", {})
    now = time.perf_counter()
    duration = now - state.get(_STATE_STARTED, now)
    # The route template, not the path: ids in paths would make a metric series per object.
    metrics.observe(
        str(scope.get("method", "")), scope.get("path_template") or "unmatched", state.get(_STATE_STATUS) or 0, duration
    )
    log.info(
        "http.request",
        method=scope.get("method"),
        path=scope.get("path"),
        status=state.get(_STATE_STATUS),
        duration_ms=round(duration * 1000, 2),
        request_id=request_id_of(scope),
        tenant=state.get(TENANT_STATE),
    )


def _header(scope: Scope, name: str) -> str | None:
    wanted = name.encode()
    for key, value in scope.get("headers", ()):
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None
