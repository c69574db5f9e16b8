"""POST /v1/files: validate the form and stream the file part into object storage.

The SDK sends `purpose` before `file`, so the usual bad upload is refused before a byte is stored. Fields may come in
any order though: when the file arrives first, its batch checks run anyway and the verdict waits for `purpose`; a
rejected file is deleted again. A metadata row is written only once the bytes are safely stored and accepted.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog
from litestar import Request

from batch_gateway import ids, wire
from batch_gateway.api.batch_file_check import BatchFileChecker, check_batch_filename
from batch_gateway.api.multipart import FilePart, read_form
from batch_gateway.api.validation import expires_after_seconds, form_int, invalid_choice, missing
from batch_gateway.errors import InvalidRequest
from batch_gateway.services import Services
from batch_gateway.store.metadata import FileRecord
from batch_gateway.store.objects import file_key

log = structlog.get_logger("api.files")

BATCH_FILE_TTL_SECONDS = 30 * 24 * 3600
DEFAULT_FILENAME = "upload"
MAX_FILENAME_CHARS = 255


class FileUpload:
    """One upload in flight: where its bytes go and what was learnt about them."""

    def __init__(self, services: Services, tenant: str) -> None:
        self.services = services
        self.tenant = tenant
        self.file_id = ids.new_file_id()
        self.key = file_key(tenant, self.file_id)
        self.stored = False
        self.size = 0
        self.filename = DEFAULT_FILENAME
        self.checker: BatchFileChecker | None = None

    async def run(self, request: Request) -> FileRecord:
        try:
            fields, file_seen = await read_form(
                request, max_file_bytes=self.services.settings.max_upload_bytes, on_file=self._receive_file
            )
            if not file_seen:
                raise missing("file")
            purpose = _purpose(fields)
            expires_after = _expires_after(fields)
            if purpose == "batch":
                check_batch_filename(self.filename)
                if self.checker is not None and self.checker.problem is not None:
                    raise self.checker.problem
            created_at = ids.now()
            if expires_after is not None:
                expires_at: int | None = created_at + expires_after
            elif purpose == "batch":
                expires_at = created_at + BATCH_FILE_TTL_SECONDS
            else:
                expires_at = None
            record = FileRecord(
                id=self.file_id,
                tenant=self.tenant,
                bytes=self.size,
                created_at=created_at,
                filename=self.filename,
                purpose=purpose,
                object_key=self.key,
                expires_at=expires_at,
            )
            await self.services.metadata.insert_file(record)
        except BaseException:
            await self._discard()
            raise
        log.info("file.uploaded", file_id=record.id, bytes=record.bytes, purpose=record.purpose)
        return record

    async def _receive_file(self, part: FilePart, chunks: AsyncIterator[bytes]) -> None:
        # Refuse what the fields seen so far already rule out, before storing anything.
        known_purpose = _purpose(part.fields_before) if "purpose" in part.fields_before else None
        _expires_after(part.fields_before)
        self.filename = _clean_filename(part.filename)
        if known_purpose == "batch":
            check_batch_filename(self.filename)
        if known_purpose in (None, "batch"):
            settings = self.services.settings
            self.checker = BatchFileChecker(
                max_line_bytes=settings.max_line_bytes, max_requests=settings.max_requests_per_batch
            )
        await self.services.objects.put_stream(self.key, self._checked(chunks, enforce=known_purpose == "batch"))
        self.stored = True

    async def _checked(self, chunks: AsyncIterator[bytes], *, enforce: bool) -> AsyncIterator[bytes]:
        """Count and check the bytes on their way to storage; raising here makes the store discard the upload."""
        checker = self.checker
        async for chunk in chunks:
            self.size += len(chunk)
            if checker is not None:
                checker.feed(chunk)
                if enforce and checker.problem is not None:
                    raise checker.problem
            yield chunk
        if checker is not None:
            checker.finish()
            if enforce and checker.problem is not None:
                raise checker.problem

    async def _discard(self) -> None:
        if not self.stored:
            return
        with contextlib.suppress(Exception):
            await self.services.objects.delete(self.key)


def _purpose(fields: dict[str, str]) -> str:
    purpose = fields.get("purpose")
    if purpose is None or purpose == "":
        raise missing("purpose")
    if purpose not in wire.FILE_PURPOSES:
        raise invalid_choice("purpose", purpose, wire.FILE_PURPOSES)
    return purpose


def _expires_after(fields: dict[str, str]) -> int | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = form_int(fields, "expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    return expires_after_seconds("expires_after", anchor, seconds)


def _clean_filename(filename: str | None) -> str:
    """The base name only (some clients send a path), never empty."""
    if not filename:
        return DEFAULT_FILENAME
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name:
        return DEFAULT_FILENAME
    if len(name) > MAX_FILENAME_CHARS:
        raise InvalidRequest(f"The filename is too long (at most {MAX_FILENAME_CHARS} characters).", param="file")
    return name
