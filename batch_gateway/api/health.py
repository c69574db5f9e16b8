"""Kubernetes probes, without authentication: /health (the process answers) and /ready (its storage answers).

Valkey only speeds things up, so its state is reported but never makes the gateway unready.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from litestar import Request, Response, get

from batch_gateway.api.errors import json_response
from batch_gateway.api.state import services_of

log = structlog.get_logger("api.health")

PING_TIMEOUT_SECONDS = 3.0


@get("/health")
async def health() -> Response:
    return json_response({"status": "ok"})


@get("/ready")
async def ready(request: Request) -> Response:
    services = services_of(request)
    metadata, objects = await asyncio.gather(_ping(services.metadata.ping), _ping(services.objects.ping))
    is_ready = metadata == "ok" and objects == "ok"
    body = {
        "status": "ok" if is_ready else "unavailable",
        "metadata": metadata,
        "objects": objects,
        "signals": services.signals.state,
    }
    if not is_ready:
        log.warning("ready.unavailable", **body)
    return json_response(body, 200 if is_ready else 503)


async def _ping(ping: Callable[[], Awaitable[None]]) -> str:
    try:
        await asyncio.wait_for(ping(), PING_TIMEOUT_SECONDS)
    except Exception as exc:  # any failure, timeouts included, means "down"
        log.debug("ready.ping_failed", error=repr(exc))
        return "down"
    return "ok"
