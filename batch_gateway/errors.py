"""One root exception. API errors carry what the OpenAI error envelope needs; the API turns them into responses."""

from __future__ import annotations


class GatewayError(Exception):
    """Something went wrong in batch-gateway."""


class ApiError(GatewayError):
    """An error answered to the client in OpenAI's envelope: {"error": {message, type, param, code}}."""

    status_code = 400
    error_type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}


class InvalidRequest(ApiError):
    status_code = 400


class Unauthorized(ApiError):
    status_code = 401


class NotFound(ApiError):
    status_code = 404


class Conflict(ApiError):
    status_code = 409


class StorageUnavailable(GatewayError):
    """The metadata store or object store cannot be reached right now; retrying later may work."""


class DiskFull(StorageUnavailable):
    """A local disk (a runner's work directory) is full; freeing space there lets the work go on."""
