"""The five /v1/files endpoints."""

from __future__ import annotations

from urllib.parse import quote

import structlog
from litestar import Request, Response, delete, get, post
from litestar.response import Stream

from batch_gateway import ids, wire
from batch_gateway.api.auth import PathId, Tenant
from batch_gateway.api.errors import json_response
from batch_gateway.api.state import services_of
from batch_gateway.api.upload import FileUpload
from batch_gateway.api.validation import query_choice, query_int, query_str
from batch_gateway.errors import NotFound, StorageUnavailable
from batch_gateway.store.metadata import FileRecord
from batch_gateway.store.objects import ObjectMissing

log = structlog.get_logger("api.files")

FILES_LIMIT_DEFAULT = 10_000
FILES_LIMIT_MAX = 10_000


def file_not_found(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param="id")


async def _get_file(request: Request, file_id: PathId, tenant: Tenant) -> FileRecord:
    record = await services_of(request).metadata.get_file(file_id, tenant)
    if record is None:
        raise file_not_found(file_id)
    return record


# The upload route sets no body limit of its own: the upload enforces `max_upload_bytes` while it streams.
@post("/v1/files", request_max_body_size=None, status_code=200)
async def upload_file(request: Request, tenant: Tenant) -> Response:
    record = await FileUpload(services_of(request), tenant).run(request)
    return json_response(record.to_wire())


@get("/v1/files")
async def list_files(request: Request, tenant: Tenant) -> Response:
    limit = query_int(request, "limit", default=FILES_LIMIT_DEFAULT, minimum=1, maximum=FILES_LIMIT_MAX)
    order = query_choice(request, "order", default="desc", choices=("asc", "desc"))
    records, has_more = await services_of(request).metadata.list_files(
        tenant, purpose=query_str(request, "purpose"), order=order, after=query_str(request, "after"), limit=limit
    )
    data = [r.to_wire() for r in records]
    page = wire.ListPage(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )
    return json_response(page)


@get("/v1/files/{file_id:str}")
async def retrieve_file(request: Request, file_id: PathId, tenant: Tenant) -> Response:
    return json_response((await _get_file(request, file_id, tenant)).to_wire())


@delete("/v1/files/{file_id:str}", status_code=200)
async def delete_file(request: Request, file_id: PathId, tenant: Tenant) -> Response:
    """Deleted for the user at once (hidden from every read). The bytes and row go now, unless an unfinished batch
    reads the file as its input: then they stay until that batch ends and gc deletes them, so a restarted runner can
    still read its input."""
    services = services_of(request)
    record = await services.metadata.hide_file(file_id, tenant, ids.now())
    if record is None:
        raise file_not_found(file_id)  # missing, another tenant's, or a concurrent delete won
    if await services.metadata.file_in_use(file_id):
        log.info("file.deleted", file_id=file_id, kept_for_unfinished_batch=True)
        return json_response(wire.FileDeleted(id=file_id))
    try:
        # Bytes first, then the row: a failure in between leaves a hidden row, which gc deletes again.
        await services.objects.delete(record.object_key)
        await services.metadata.delete_file(file_id, tenant)
    except StorageUnavailable as exc:
        log.warning("file.delete_deferred", file_id=file_id, error=str(exc), note="gc deletes the hidden file")
    log.info("file.deleted", file_id=file_id)
    return json_response(wire.FileDeleted(id=file_id))


@get("/v1/files/{file_id:str}/content")
async def file_content(request: Request, file_id: PathId, tenant: Tenant) -> Stream:
    record = await _get_file(request, file_id, tenant)
    try:
        chunks = await services_of(request).objects.stream(record.object_key)
    except ObjectMissing:
        raise file_not_found(file_id) from None
    return Stream(
        chunks,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(record.filename)}"},
    )
