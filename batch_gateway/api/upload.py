"""POST /v1/files: validate the form and stream the file part into object storage.

The SDK sends `purpose` before `file`, so the usual bad upload is refused before a byte is stored. Fields may come in
any order though: when the file arrives first, its batch checks (and the general size limit) run anyway and the
verdict waits for `purpose`; a rejected file is deleted again. A metadata row is written only once the bytes are
safely stored and accepted. The rules a File must meet are in `file_policy.py`, shared with the Uploads API.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog
from litestar import Request

from batch_gateway import ids
from batch_gateway.api import file_policy
from batch_gateway.api.batch_file_check import BatchFileChecker
from batch_gateway.api.multipart import FilePart, read_form
from batch_gateway.api.validation import expires_after_seconds, form_int, missing
from batch_gateway.services import Services
from batch_gateway.store.metadata import FileRecord
from batch_gateway.store.objects import file_key

log = structlog.get_logger("api.files")


class FileUpload:
    """One upload in flight: where its bytes go and what was learnt about them."""

    def __init__(self, services: Services, tenant: str) -> None:
        self.services = services
        self.tenant = tenant
        self.file_id = ids.new_file_id()
        self.key = file_key(tenant, self.file_id)
        self.stored = False
        self.size = 0
        self.filename = file_policy.DEFAULT_FILENAME
        self.checker: BatchFileChecker | None = None
        self.limit = services.settings.max_upload_bytes  # until the purpose is known

    async def run(self, request: Request) -> FileRecord:
        try:
            fields, file_seen = await read_form(
                request, max_file_bytes=self.services.settings.max_upload_bytes, on_file=self._receive_file
            )
            if not file_seen:
                raise missing("file")
            purpose = file_policy.purpose_of(fields.get("purpose"))
            expires_after = _expires_after(fields)
            limit = file_policy.size_limit(self.services.settings, purpose)
            if self.size > limit:
                raise file_policy.file_too_large(limit, purpose)
            if purpose == "batch":
                file_policy.check_batch_filename(self.filename)
                if self.checker is not None and self.checker.problem is not None:
                    raise self.checker.problem
            created_at = ids.now()
            record = FileRecord(
                id=self.file_id,
                tenant=self.tenant,
                bytes=self.size,
                created_at=created_at,
                filename=self.filename,
                purpose=purpose,
                object_key=self.key,
                expires_at=file_policy.expires_at(purpose, created_at, expires_after),
            )
            await self.services.metadata.insert_file(record)
        except BaseException:
            await self._discard()
            raise
        log.info("file.uploaded", file_id=record.id, bytes=record.bytes, purpose=record.purpose)
        return record

    async def _receive_file(self, part: FilePart, chunks: AsyncIterator[bytes]) -> None:
        # Refuse what the fields seen so far already rule out, before storing anything.
        fields = part.fields_before
        known_purpose = file_policy.purpose_of(fields.get("purpose")) if "purpose" in fields else None
        _expires_after(fields)
        self.filename = file_policy.clean_filename(part.filename)
        if known_purpose == "batch":
            file_policy.check_batch_filename(self.filename)
        if known_purpose in (None, "batch"):
            self.checker = file_policy.batch_checker(self.services.settings)
        self.limit = file_policy.size_limit(self.services.settings, known_purpose)
        await self.services.objects.put_stream(
            self.key, self._checked(chunks, enforce=known_purpose == "batch", purpose=known_purpose)
        )
        self.stored = True

    async def _checked(
        self, chunks: AsyncIterator[bytes], *, enforce: bool, purpose: str | None
    ) -> AsyncIterator[bytes]:
        """Count and check the bytes on their way to storage; raising here makes the store discard the upload."""
        checker = self.checker
        async for chunk in chunks:
            self.size += len(chunk)
            if self.size > self.limit:
                raise file_policy.file_too_large(self.limit, purpose)
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


def _expires_after(fields: dict[str, str]) -> int | None:
    anchor = fields.get("expires_after[anchor]")
    seconds = form_int(fields, "expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    return expires_after_seconds("expires_after", anchor, seconds)
