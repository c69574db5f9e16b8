"""The Uploads API: a large file sent in parts. POST /v1/uploads, /v1/uploads/{id}/parts, .../complete, .../cancel.

- Parts (at most 64 MiB each, the `data` field of a multipart form) stream into object storage as they arrive, through
  the same streaming parser as POST /v1/files, as `<tenant>/uploads/<upload_id>/<part_id>`; a part is recorded only
  once its bytes are stored. Parts may arrive in parallel and in any order; `complete` names their order.
- Completing reads the listed parts once, in order, through an md5 hasher and (for `purpose=batch`) the same checks as
  POST /v1/files, into one new object: an S3 multipart upload on S3, a streaming write on disk; nothing is held in
  memory whole. Every byte has to be read for the md5 and the batch checks anyway, and obstore has no server-side
  multipart copy (UploadPartCopy; its `copy` copies whole objects), so a server-side assembly would save only the
  write. The File record and the `completed` status are written in one transaction.
- An upload expires an hour after creation; gc marks it `expired` and deletes its parts, and the parts of completed
  and cancelled uploads.

Status conflicts (a part for a cancelled upload, completing an expired one) are 409 with `x-should-retry: false`, as
for batches; a complete that finds another complete assembling the same upload is a 409 the SDK retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import AsyncIterator

import structlog
from litestar import Request, Response, post

from batch_gateway import ids, wire
from batch_gateway.api import file_policy
from batch_gateway.api.auth import PathId, Tenant
from batch_gateway.api.errors import json_response
from batch_gateway.api.multipart import FilePart, read_form
from batch_gateway.api.state import services_of
from batch_gateway.api.validation import (
    expires_after_object,
    invalid_type,
    invalid_value,
    missing,
    parse_json,
    required_string,
)
from batch_gateway.errors import Conflict, InvalidRequest, NotFound
from batch_gateway.services import Services
from batch_gateway.store.metadata import FileRecord, UploadPartRecord, UploadRecord, UploadStatus
from batch_gateway.store.objects import ObjectMissing, file_key, upload_part_key

log = structlog.get_logger("api.uploads")

UPLOAD_TTL_SECONDS = 3600
PART_MAX_BYTES = 64 * 1024 * 1024
PARTS_ROOM = 2  # the parts an upload keeps may hold this many times its declared size (`PartUpload`)
MAX_MIME_TYPE_CHARS = 255
# Parts are small enough to write with little buffering: at most this many 8 MB chunks in flight to S3.
PART_WRITE_CONCURRENCY = 2
ASSEMBLY_WRITE_CONCURRENCY = 4  # the same for the completed file: at most 32 MB held while S3 catches up
NO_RETRY = {"x-should-retry": "false"}
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")

PENDING = UploadStatus.PENDING.value
COMPLETING = UploadStatus.COMPLETING.value
COMPLETED = UploadStatus.COMPLETED.value
CANCELLED = UploadStatus.CANCELLED.value
EXPIRED = UploadStatus.EXPIRED.value


def upload_not_found(upload_id: str) -> NotFound:
    return NotFound(f"No such Upload object: {upload_id}", param="upload_id")


def _part_too_large(limit: int) -> InvalidRequest:
    return InvalidRequest(f"A part may hold at most {limit} bytes (64 MB).", param="data")


async def _get_upload(services: Services, upload_id: str, tenant: str) -> UploadRecord:
    upload = await services.metadata.get_upload(upload_id, tenant)
    if upload is None:
        raise upload_not_found(upload_id)
    return upload


async def _to_wire(services: Services, upload: UploadRecord) -> wire.Upload:
    file = None
    if upload.file_id is not None:
        record = await services.metadata.get_file(upload.file_id, upload.tenant)
        file = record.to_wire() if record is not None else None  # deleted since
    return wire.Upload(
        id=upload.id,
        bytes=upload.bytes,
        created_at=upload.created_at,
        expires_at=upload.expires_at,
        filename=upload.filename,
        purpose=upload.purpose,
        status=upload.shown_status(ids.now()),
        file=file,
    )


def _not_pending(upload: UploadRecord, action: str) -> Conflict:
    status = upload.shown_status(ids.now())
    if upload.status == COMPLETING and status == PENDING:
        return Conflict(f"Cannot {action}: upload {upload.id} is being completed.", headers=NO_RETRY)
    return Conflict(f"Cannot {action}: upload {upload.id} has status '{status}'.", headers=NO_RETRY)


# --- create ------------------------------------------------------------------------------------------------------


@post("/v1/uploads", status_code=200)
async def create_upload(request: Request, tenant: Tenant) -> Response:
    services = services_of(request)
    raw = parse_json(await request.body(), wire.UploadCreate)
    purpose = file_policy.purpose_of(_optional_string("purpose", raw.purpose))
    size = _byte_count(raw.bytes)
    filename = file_policy.clean_filename(required_string("filename", raw.filename), param="filename")
    mime_type = required_string("mime_type", raw.mime_type)
    if len(mime_type) > MAX_MIME_TYPE_CHARS:
        raise invalid_value("mime_type", f"Invalid 'mime_type': at most {MAX_MIME_TYPE_CHARS} characters.")
    file_expires_after = _expires_after(raw.expires_after)
    limit = file_policy.size_limit(services.settings, purpose)
    if size > limit:
        raise file_policy.file_too_large(limit, purpose)
    if purpose == "batch":
        file_policy.check_batch_filename(filename)
    now = ids.now()
    upload = UploadRecord(
        id=ids.new_upload_id(),
        tenant=tenant,
        filename=filename,
        purpose=purpose,
        bytes=size,
        mime_type=mime_type,
        status=PENDING,
        created_at=now,
        expires_at=now + UPLOAD_TTL_SECONDS,
        file_expires_after=file_expires_after,
    )
    await services.metadata.insert_upload(upload)
    log.info("upload.created", upload_id=upload.id, bytes=size, purpose=purpose)
    return json_response(await _to_wire(services, upload))


def _optional_string(param: str, value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    return value


def _byte_count(value: object) -> int:
    if value is None:
        raise missing("bytes")
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type("bytes", "an integer", value)
    if value < 0:
        raise invalid_value(
            "bytes", f"Invalid 'bytes': integer below minimum value. Expected a value >= 0, but got {value} instead."
        )
    return value


def _expires_after(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_type("expires_after", "an object", value)
    return expires_after_object("expires_after", value)


# --- parts -------------------------------------------------------------------------------------------------------


# Like POST /v1/files, no body limit of the route's own: the part's limit is enforced while it streams.
@post("/v1/uploads/{upload_id:str}/parts", request_max_body_size=None, status_code=200)
async def add_upload_part(request: Request, upload_id: PathId, tenant: Tenant) -> Response:
    services = services_of(request)
    upload = await _get_upload(services, upload_id, tenant)
    if upload.status != PENDING or upload.shown_status(ids.now()) != PENDING:
        raise _not_pending(upload, "add a part")
    part = await PartUpload(services, upload).run(request)
    return json_response(wire.UploadPart(id=part.id, created_at=part.created_at, upload_id=upload.id))


class PartUpload:
    """One part in flight, streamed to its own object. The parts may hold up to PARTS_ROOM times the declared size:
    `complete` takes the parts its `part_ids` name and checks their exact size, so a part sent again (a client that
    retried a part the server had stored) must not leave the last one without room. Parallel parts each see the room
    left when they started, so together they may overshoot it by a few parts; gc deletes whatever a finished upload
    leaves."""

    def __init__(self, services: Services, upload: UploadRecord) -> None:
        self.services = services
        self.upload = upload
        self.id = ids.new_upload_part_id()
        self.key = upload_part_key(upload.tenant, upload.id, self.id)
        self.size = 0
        self.room = 0
        self.stored = False

    async def run(self, request: Request) -> UploadPartRecord:
        metadata = self.services.metadata
        stored = sum(p.bytes for p in await metadata.upload_parts(self.upload.id))
        self.room = PARTS_ROOM * self.upload.bytes - stored
        try:
            _, seen = await read_form(
                request,
                max_file_bytes=PART_MAX_BYTES,
                on_file=self._receive,
                file_field="data",
                too_large=_part_too_large,
            )
            if not seen:
                raise missing("data")
            part = UploadPartRecord(
                id=self.id,
                upload_id=self.upload.id,
                tenant=self.upload.tenant,
                bytes=self.size,
                created_at=ids.now(),
                object_key=self.key,
            )
            if not await metadata.add_upload_part(part, ids.now()):
                current = await metadata.get_upload(self.upload.id, self.upload.tenant)
                raise _not_pending(current or self.upload, "add a part")
        except BaseException:
            await self._discard()
            raise
        log.info("upload.part_added", upload_id=self.upload.id, part_id=part.id, bytes=part.bytes)
        return part

    async def _receive(self, part: FilePart, chunks: AsyncIterator[bytes]) -> None:
        await self.services.objects.put_stream(self.key, self._counted(chunks), max_concurrency=PART_WRITE_CONCURRENCY)
        self.stored = True

    async def _counted(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.size += len(chunk)
            if self.size > self.room:
                raise InvalidRequest(
                    f"The parts would hold more than {PARTS_ROOM} times the {self.upload.bytes} bytes upload "
                    f"{self.upload.id} was created for. Complete it with the ids of the parts that make up the file, "
                    "or create a new upload.",
                    param="data",
                )
            yield chunk

    async def _discard(self) -> None:
        if self.stored:
            with contextlib.suppress(Exception):
                await self.services.objects.delete(self.key)


# --- complete ----------------------------------------------------------------------------------------------------


@post("/v1/uploads/{upload_id:str}/complete", status_code=200)
async def complete_upload(request: Request, upload_id: PathId, tenant: Tenant) -> Response:
    services = services_of(request)
    raw = parse_json(await request.body(), wire.UploadComplete)
    part_ids = _part_ids(raw.part_ids)
    md5 = _md5(raw.md5)
    upload = await _get_upload(services, upload_id, tenant)
    if upload.status == COMPLETED:  # a retry of a complete that succeeded: the same answer
        return json_response(await _to_wire(services, upload))
    if upload.shown_status(ids.now()) != PENDING or upload.status == COMPLETING:
        raise _completing_conflict(upload)
    parts = _ordered_parts(upload, await services.metadata.upload_parts(upload_id), part_ids)

    started = await services.metadata.transition_upload(
        upload_id, tenant, [PENDING], COMPLETING, unexpired_at=ids.now()
    )
    if started is None:
        raise _completing_conflict(await _get_upload(services, upload_id, tenant))
    file_id = ids.upload_file_id(upload_id)
    assembly = Assembly(services, started, parts, md5, file_key(tenant, file_id))
    try:
        await assembly.write()
        now = ids.now()
        file = FileRecord(
            id=file_id,
            tenant=tenant,
            bytes=assembly.size,
            created_at=now,
            filename=started.filename,
            purpose=started.purpose,
            object_key=assembly.key,
            expires_at=file_policy.expires_at(started.purpose, now, started.file_expires_after),
        )
        completed = await services.metadata.complete_upload(upload_id, file)
        if completed is None:  # gc expired it meanwhile
            raise Conflict(f"Cannot complete upload {upload_id}: it expired while being completed.", headers=NO_RETRY)
    except BaseException:
        # The upload stays usable: the client may complete it again (other parts, the right md5) until it expires.
        with contextlib.suppress(Exception):
            await services.objects.delete(assembly.key)
        with contextlib.suppress(Exception):
            await services.metadata.transition_upload(upload_id, tenant, [COMPLETING], PENDING)
        raise
    log.info("upload.completed", upload_id=upload_id, file_id=file_id, bytes=assembly.size, parts=len(parts))
    await _delete_parts(services, await services.metadata.upload_parts(upload_id))
    return json_response(await _to_wire(services, completed))


def _completing_conflict(upload: UploadRecord) -> Conflict:
    if upload.status == COMPLETING and upload.shown_status(ids.now()) == PENDING:
        # Another request is assembling it (often the SDK's own retry of a slow complete): retrying finds it done.
        return Conflict(f"Upload {upload.id} is being completed; retry shortly.")
    return _not_pending(upload, "complete the upload")


def _part_ids(value: object) -> list[str]:
    if value is None:
        raise missing("part_ids")
    if not isinstance(value, list):
        raise invalid_type("part_ids", "an array", value)
    if not value:
        raise invalid_value("part_ids", "Invalid 'part_ids': empty array. Expected an array with at least one part id.")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise invalid_type(f"part_ids[{index}]", "a string", item)
    if len(set(value)) != len(value):
        raise invalid_value("part_ids", "Invalid 'part_ids': a part may be listed only once.")
    return value


def _md5(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid_type("md5", "a string", value)
    if not _MD5.match(value):
        raise invalid_value("md5", "Invalid 'md5': expected the file's MD5 checksum as 32 hexadecimal digits.")
    return value.lower()


def _ordered_parts(upload: UploadRecord, parts: list[UploadPartRecord], part_ids: list[str]) -> list[UploadPartRecord]:
    by_id = {part.id: part for part in parts}
    unknown = [part_id for part_id in part_ids if part_id not in by_id]
    if unknown:
        raise invalid_value("part_ids", f"Invalid 'part_ids': {unknown[0]} is not a part of upload {upload.id}.")
    ordered = [by_id[part_id] for part_id in part_ids]
    total = sum(part.bytes for part in ordered)
    if total != upload.bytes:
        raise invalid_value(
            "part_ids",
            f"The parts hold {total} bytes, but upload {upload.id} was created for {upload.bytes} bytes: the bytes "
            "uploaded must match the bytes specified when the upload was created.",
        )
    return ordered


class Assembly:
    """The parts, in order, streamed into one object and checked on the way: size, md5, and a batch file's format.
    Raising inside the stream makes the object store discard the write."""

    def __init__(
        self, services: Services, upload: UploadRecord, parts: list[UploadPartRecord], md5: str | None, key: str
    ) -> None:
        self.services = services
        self.upload = upload
        self.parts = parts
        self.md5 = md5
        self.key = key
        self.size = 0

    async def write(self) -> None:
        await self.services.objects.put_stream(self.key, self._chunks(), max_concurrency=ASSEMBLY_WRITE_CONCURRENCY)

    async def _chunks(self) -> AsyncIterator[bytes]:
        upload = self.upload
        checker = file_policy.batch_checker(self.services.settings) if upload.purpose == "batch" else None
        hasher = hashlib.md5(usedforsecurity=False)
        for part in self.parts:
            try:
                chunks = await self.services.objects.stream(part.object_key)
            except ObjectMissing:
                raise Conflict(
                    f"Cannot complete upload {upload.id}: the bytes of part {part.id} are gone.", headers=NO_RETRY
                ) from None
            async for chunk in chunks:
                self.size += len(chunk)
                hasher.update(chunk)
                if checker is not None:
                    checker.feed(chunk)
                    if checker.problem is not None:
                        raise checker.problem
                yield chunk
        if checker is not None:
            checker.finish()
            if checker.problem is not None:
                raise checker.problem
        if self.size != upload.bytes:  # the parts' records said otherwise: their bytes changed underneath
            raise InvalidRequest(f"The parts hold {self.size} bytes, not the {upload.bytes} bytes declared.")
        if self.md5 is not None and hasher.hexdigest() != self.md5:
            raise invalid_value(
                "md5",
                f"The md5 checksum {self.md5} does not match the uploaded bytes (their md5 is {hasher.hexdigest()}).",
            )


# --- cancel ------------------------------------------------------------------------------------------------------


@post("/v1/uploads/{upload_id:str}/cancel", status_code=200)
async def cancel_upload(request: Request, upload_id: PathId, tenant: Tenant) -> Response:
    services = services_of(request)
    upload = await _get_upload(services, upload_id, tenant)
    status = upload.shown_status(ids.now())
    if status in (CANCELLED, EXPIRED):  # nothing left to stop: its parts are (being) deleted
        return json_response(await _to_wire(services, upload))
    if status == COMPLETED or upload.status == COMPLETING:
        raise _not_pending(upload, "cancel the upload")
    cancelled = await services.metadata.transition_upload(
        upload_id, tenant, [PENDING], CANCELLED, unexpired_at=ids.now()
    )
    if cancelled is None:  # completed, cancelled or expired meanwhile: answer with what won
        current = await _get_upload(services, upload_id, tenant)
        if current.shown_status(ids.now()) in (CANCELLED, EXPIRED):
            return json_response(await _to_wire(services, current))
        raise _not_pending(current, "cancel the upload")
    log.info("upload.cancelled", upload_id=upload_id)
    await _delete_parts(services, await services.metadata.upload_parts(upload_id))
    return json_response(await _to_wire(services, cancelled))


async def _delete_parts(services: Services, parts: list[UploadPartRecord]) -> None:
    """Best effort: what is left (storage down) gc deletes, since the upload is no longer open."""
    try:
        for part in parts:
            await services.objects.delete(part.object_key)
            await services.metadata.delete_upload_part(part.id)
    except Exception as exc:
        log.warning("upload.parts_left_for_gc", error=str(exc))
