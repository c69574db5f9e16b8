"""Raw multipart/form-data bodies, for the cases the SDK never sends (odd field order, missing parts, garbage)."""

from __future__ import annotations

import secrets

FILE_KEYS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "expires_at", "status_details"}
BATCH_KEYS = {
    "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window", "status", "output_file_id",
    "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
    "expired_at", "cancelling_at", "cancelled_at", "request_counts", "usage", "metadata",
}  # fmt: skip


def multipart_body(parts: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    """(name, value, filename or None) parts in the given order -> (body, content type)."""
    boundary = "----bg" + secrets.token_hex(8)
    out = bytearray()
    for name, value, filename in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + value + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def assert_envelope(response, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    """A raw httpx response carries OpenAI's error envelope (all four keys) and a request id."""
    assert response.status_code == status, response.text
    assert response.headers.get("x-request-id"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error
