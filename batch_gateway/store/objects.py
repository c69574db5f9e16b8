"""File bytes in object storage through obstore: S3 in production, the local filesystem by default.

obstore already speaks to S3, GCS, Azure and local disks behind one API, so one small wrapper serves every backend;
the URL picks it (`s3://bucket/prefix`, `file:///path`, `memory:///`). S3 endpoint, region and credentials come from
the usual `AWS_*` environment variables (for MinIO or moto: `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP=true`).

Key layout: one bucket, everything under `<tenant>/`: `<tenant>/files/<file_id>` for files,
`<tenant>/uploads/<upload_id>/<part_id>` for the parts of an Upload, and `<tenant>/batches/<batch_id>/...` for a
runner's checkpoints.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterable, AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import httpx
import obstore
import structlog
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import from_url

from batch_gateway.errors import GatewayError, StorageUnavailable
from batch_gateway.store import s3_uploads

if TYPE_CHECKING:
    from obstore.store import ClientConfig

CHUNK = 8 * 1024 * 1024
# obstore's local store writes "<key>#<n>" and renames it when the write completes; a killed writer leaves it behind.
LOCAL_STAGING_FILE = re.compile(r"#\d+$")

log = structlog.get_logger(__name__)

# What the store raises when it cannot serve: obstore's errors (the backend refused, timed out, is unreachable) and
# the operating system's (a full disk, a reset connection). Only these become StorageUnavailable, which callers wait
# out or answer with a 503; anything else (a TypeError, obstore's ValueError for a malformed key) is a bug and is
# raised as it is.
STORAGE_ERRORS = (BaseError, OSError)


class ObjectMissing(GatewayError):
    """The object does not exist in the object store."""


def file_key(tenant: str, file_id: str) -> str:
    return f"{tenant}/files/{file_id}"


def upload_part_key(tenant: str, upload_id: str, part_id: str) -> str:
    return f"{tenant}/uploads/{upload_id}/{part_id}"


def batch_prefix(tenant: str, batch_id: str) -> str:
    return f"{tenant}/batches/{batch_id}"


def run_stats_key(tenant: str, batch_id: str) -> str:
    """The final figures of a batch's run (controller limits, retries, cache hit rate), kept after it ends."""
    return f"{batch_prefix(tenant, batch_id)}/run.json"


class ObjectStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self._store = _open_store(url)
        # ping answers readiness probes: it must fail in a second or two, not after obstore's default of 10 retries
        # over up to 3 minutes.
        self._ping_store = _open_store(url, fast_fail=True)

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes], max_concurrency: int = 12) -> None:
        """Write an object from a stream (multipart on S3). If the stream raises, nothing is stored. Up to
        `max_concurrency` parts of CHUNK bytes are buffered while they upload: a fast producer fills them all."""
        try:
            await obstore.put_async(self._store, key, chunks, chunk_size=CHUNK, max_concurrency=max_concurrency)
        except GatewayError:
            raise  # the stream's own error (the upload size limit, a bad line), as obstore hands it back
        except STORAGE_ERRORS as exc:
            cause = _caused_by_gateway_error(exc)
            if cause is not None:
                raise cause from exc
            raise StorageUnavailable(f"object store write failed for {key}: {exc}") from exc

    async def put_bytes(self, key: str, data: bytes) -> None:
        try:
            await obstore.put_async(self._store, key, data)
        except STORAGE_ERRORS as exc:
            raise StorageUnavailable(f"object store write failed for {key}: {exc}") from exc

    async def put_file(self, key: str, path: Path) -> None:
        try:
            await obstore.put_async(self._store, key, path, chunk_size=CHUNK)
        except STORAGE_ERRORS as exc:
            raise StorageUnavailable(f"object store write failed for {key}: {exc}") from exc

    async def stream(self, key: str, chunk_size: int = 1024 * 1024) -> AsyncIterator[bytes]:
        """The object's bytes as a stream of chunks; raises ObjectMissing before the first chunk if absent."""
        try:
            result = await obstore.get_async(self._store, key)
        except (NotFoundError, FileNotFoundError) as exc:
            raise ObjectMissing(key) from exc
        except STORAGE_ERRORS as exc:
            raise StorageUnavailable(f"object store read failed for {key}: {exc}") from exc
        return _chunks(result.stream(min_chunk_size=chunk_size))

    async def get_bytes(self, key: str) -> bytes:
        parts = [chunk async for chunk in await self.stream(key)]
        return b"".join(parts)

    async def delete(self, key: str) -> None:
        """Delete an object; deleting a missing object is not an error (gc may run twice)."""
        try:
            await obstore.delete_async(self._store, key)
        except (NotFoundError, FileNotFoundError):
            return
        except STORAGE_ERRORS as exc:
            raise StorageUnavailable(f"object store delete failed for {key}: {exc}") from exc

    async def list(self, prefix: str) -> list[str]:
        try:
            keys: list[str] = []
            async for chunk in obstore.list(self._store, prefix=prefix):
                keys.extend(meta["path"] for meta in chunk)
            return sorted(keys)
        except (NotFoundError, FileNotFoundError):
            return []
        except STORAGE_ERRORS as exc:
            raise StorageUnavailable(f"object store list failed for {prefix}: {exc}") from exc

    async def delete_prefix(self, prefix: str) -> None:
        for key in await self.list(prefix):
            await self.delete(key)

    async def abort_stale_uploads(self, older_than: float) -> int | None:
        """Clean up after writers killed mid-upload: abort the multipart uploads under this store's prefix (S3), or
        delete obstore's staging files (local disk), started more than `older_than` seconds ago. Returns how many,
        or None when this store cannot tell (S3 without static credentials)."""
        parsed = urlparse(self.url)
        cutoff = time.time() - older_than
        if parsed.scheme == "file":
            return await asyncio.to_thread(_remove_staging_files, Path(unquote(parsed.path)), cutoff)
        if parsed.scheme not in ("s3", "s3a"):
            return 0
        credentials = s3_uploads.credentials_from_env()
        if credentials is None:
            return None
        bucket = s3_uploads.bucket_from_env(parsed.netloc)
        prefix = parsed.path.strip("/")
        aborted = 0
        async with httpx.AsyncClient() as http:
            for upload in await s3_uploads.list_uploads(http, bucket, credentials, f"{prefix}/" if prefix else ""):
                if upload.initiated <= cutoff:
                    await s3_uploads.abort_upload(http, bucket, credentials, upload)
                    log.info("objects.upload_aborted", key=upload.key, initiated=int(upload.initiated))
                    aborted += 1
        return aborted

    async def ping(self) -> None:
        """Raise StorageUnavailable if the store cannot be listed."""
        try:
            await obstore.list_with_delimiter_async(self._ping_store, prefix=None)
        except STORAGE_ERRORS as exc:
            raise StorageUnavailable(f"object store unreachable: {exc}") from exc


def _open_store(url: str, *, fast_fail: bool = False) -> obstore.store.ObjectStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        Path(parsed.path).mkdir(parents=True, exist_ok=True)
        return from_url(url, mkdir=True)
    if parsed.scheme in ("s3", "s3a"):
        options: ClientConfig = {}
        if os.environ.get("AWS_ALLOW_HTTP", "").lower() == "true":
            options["allow_http"] = True
        if fast_fail:
            options["connect_timeout"], options["timeout"] = "1s", "2s"
            return from_url(
                url, client_options=options, retry_config={"max_retries": 1, "retry_timeout": timedelta(seconds=2)}
            )
        return from_url(url, client_options=options or None)
    return from_url(url)


def _remove_staging_files(root: Path, cutoff: float) -> int:
    removed = 0
    for path in root.rglob("*#*"):
        try:
            if LOCAL_STAGING_FILE.search(path.name) and path.is_file() and path.stat().st_mtime <= cutoff:
                path.unlink()
                log.info("objects.staging_file_removed", path=str(path.relative_to(root)))
                removed += 1
        except FileNotFoundError:  # finished (renamed) or removed meanwhile
            continue
    return removed


async def _chunks(stream: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield bytes(chunk)
    except STORAGE_ERRORS as exc:
        raise StorageUnavailable(f"object store stream failed: {exc}") from exc


def _caused_by_gateway_error(exc: BaseException) -> GatewayError | None:
    """An error of our input stream (e.g. the upload size limit) that a storage error may wrap, found again."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, GatewayError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
