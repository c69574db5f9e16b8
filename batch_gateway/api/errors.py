"""Every failure becomes OpenAI's error envelope, in one exception handler.

`{"error": {"message", "type", "param", "code"}}` with the status the SDK maps to the right exception class. Bad input
is always 4xx; 5xx means the storage is down (503, with Retry-After so the SDK waits) or a bug (500).
"""

from __future__ import annotations

import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException

from batch_gateway import wire
from batch_gateway.errors import ApiError, StorageUnavailable

log = structlog.get_logger("api")

_encoder = msgspec.json.Encoder()

STORAGE_RETRY_AFTER_SECONDS = 1


def json_response(obj: object, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Encode with msgspec ourselves, so every key (null included) reaches the wire exactly as the struct says."""
    return Response(
        content=_encoder.encode(obj), status_code=status_code, media_type="application/json", headers=headers
    )


def error_response(
    status_code: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = wire.ErrorEnvelope(error=wire.ErrorBody(message=message, type=error_type, param=param, code=code))
    return json_response(body, status_code, headers)


def handle_exception(request: Request, exc: Exception) -> Response:
    """The app's only exception handler: registered for `Exception`, so router 404/405s come here too."""
    if isinstance(exc, ApiError):
        return error_response(
            exc.status_code, exc.message, error_type=exc.error_type, param=exc.param, code=exc.code, headers=exc.headers
        )
    if isinstance(exc, StorageUnavailable):
        log.warning("api.storage_unavailable", error=str(exc))
        return error_response(
            503,
            "The service is temporarily unavailable. Please retry your request shortly.",
            error_type="server_error",
            headers={"Retry-After": str(STORAGE_RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, NotFoundException):
        # OpenAI's answer for a path it does not serve.
        return error_response(404, f"Invalid URL ({request.method} {request.url.path})")
    if isinstance(exc, MethodNotAllowedException):
        return error_response(
            405, f"Method not allowed ({request.method} {request.url.path})", headers=_str_headers(exc.headers)
        )
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        # Litestar's own 4xx (body too large, bad path parameter, ...): keep its status, speak OpenAI's envelope.
        return error_response(exc.status_code, str(exc.detail), headers=_str_headers(exc.headers))
    log.exception("api.unhandled_error", method=request.method, path=request.url.path)
    return error_response(
        500, "The server had an error while processing your request. Sorry about that!", error_type="server_error"
    )


def _str_headers(headers: object) -> dict[str, str] | None:
    if not headers:
        return None
    return {str(k): str(v) for k, v in dict(headers).items()}  # type: ignore[call-overload]
