"""Object ids in OpenAI's shapes. Clients treat them as opaque; we keep the familiar look."""

from __future__ import annotations

import hashlib
import secrets
import time

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_BASE62[r])
    return "".join(reversed(out))


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


def new_file_id() -> str:
    return "file-" + _base62(secrets.randbits(131), 22)


def result_file_id(batch_id: str, kind: str) -> str:
    """The output or error file id of a batch, derived from the batch id so that a re-run finalize is idempotent."""
    digest = hashlib.blake2b(f"{batch_id}/{kind}".encode(), digest_size=17).digest()
    return "file-" + _base62(int.from_bytes(digest, "big"), 22)


def new_upload_id() -> str:
    return "upload_" + secrets.token_hex(16)


def new_upload_part_id() -> str:
    return "part_" + secrets.token_hex(16)


def upload_file_id(upload_id: str) -> str:
    """The File an upload completes into, derived from the upload id: a crashed completion's leftover bytes sit at a
    key gc can name, and a repeated completion writes the same file."""
    digest = hashlib.blake2b(f"{upload_id}/file".encode(), digest_size=17).digest()
    return "file-" + _base62(int.from_bytes(digest, "big"), 22)


def request_line_id(batch_id: str, line: int) -> str:
    """The `id` of one result line: stable across runner restarts, so a resumed batch writes the same line."""
    digest = hashlib.blake2b(f"{batch_id}/{line}".encode(), digest_size=12).hexdigest()
    return "batch_req_" + digest


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def new_api_key() -> str:
    return "sk-bg-" + secrets.token_urlsafe(32)


def now() -> int:
    return int(time.time())
