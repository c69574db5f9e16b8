"""What makes a File acceptable, whichever way its bytes arrive (POST /v1/files in one request, or the Uploads API in
parts): the size limit of its purpose, its name, its default expiry, and the batch checks of a `purpose=batch` file.

As at OpenAI: a file may hold up to 512 MB, a batch input file up to 200 MB (`--max-upload-bytes`,
`--max-batch-file-bytes`); a bigger one gets 400 "File is too large." Only batch input files expire by default (after
30 days); every other file, batch output and error files included, is kept until deleted unless the client set
`expires_after` (`output_expires_after` for a batch's results).
"""

from __future__ import annotations

from batch_gateway import wire
from batch_gateway.api.batch_file_check import BatchFileChecker, check_batch_filename
from batch_gateway.api.validation import invalid_choice, missing
from batch_gateway.errors import InvalidRequest
from batch_gateway.settings import Settings

BATCH_FILE_TTL_SECONDS = 30 * 24 * 3600
DEFAULT_FILENAME = "upload"
MAX_FILENAME_CHARS = 255

__all__ = [
    "BATCH_FILE_TTL_SECONDS",
    "batch_checker",
    "check_batch_filename",
    "clean_filename",
    "expires_at",
    "file_too_large",
    "purpose_of",
    "size_limit",
]


def size_limit(settings: Settings, purpose: str | None) -> int:
    """The most bytes a file of `purpose` may hold (None: the purpose is not known yet, so the general limit)."""
    if purpose == "batch":
        return min(settings.max_batch_file_bytes, settings.max_upload_bytes)
    return settings.max_upload_bytes


def file_too_large(limit: int, purpose: str | None = None) -> InvalidRequest:
    """OpenAI's answer to a file over the limit: 400, "File is too large.", no param or code."""
    what = f"a file with purpose '{purpose}'" if purpose else "a file"
    return InvalidRequest(f"File is too large. The most {what} may hold is {limit} bytes.")


def purpose_of(value: str | None) -> str:
    if value is None or value == "":
        raise missing("purpose")
    if value not in wire.FILE_PURPOSES:
        raise invalid_choice("purpose", value, wire.FILE_PURPOSES)
    return value


def clean_filename(filename: str | None, param: str = "file") -> str:
    """The base name only (some clients send a path), never empty."""
    if not filename:
        return DEFAULT_FILENAME
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name:
        return DEFAULT_FILENAME
    if len(name) > MAX_FILENAME_CHARS:
        raise InvalidRequest(f"The filename is too long (at most {MAX_FILENAME_CHARS} characters).", param=param)
    return name


def expires_at(purpose: str, created_at: int, expires_after: int | None) -> int | None:
    """The File's `expires_at`: the client's policy, else 30 days for batch input files, else never."""
    if expires_after is not None:
        return created_at + expires_after
    if purpose == "batch":
        return created_at + BATCH_FILE_TTL_SECONDS
    return None


def batch_checker(settings: Settings) -> BatchFileChecker:
    return BatchFileChecker(max_line_bytes=settings.max_line_bytes, max_requests=settings.max_requests_per_batch)
