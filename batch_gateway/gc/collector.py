"""Garbage collection and reconciliation, one pass at a time.

`batch-gateway gc` runs one pass and exits (the CronWorkflow); `serve` runs the same pass periodically in local mode.
A pass:
1. hands every unfinished batch that no runner is working on (none the executor knows of, and no live lease) back to
   the executor. That covers batches whose runner vanished (crash, deleted Workflow, failed submission), runners that
   exited to retry later (storage down), and overdue batches: a runner started for an overdue batch
   ends it `expired`, keeping partial results and writing `batch_expired` lines for the rest;
2. hides expired files (gone for their owner from then on), then deletes hidden files (expired, or deleted through
   the API) that no unfinished batch reads as its input: object first and then the row, so a crash in between leaves
   a row that the next pass deletes again (deleting a missing object is not an error). An unfinished batch's input
   keeps its bytes until the batch ends, so its runner can always read it again. Each step always takes the first page
   of what is left, so it never skips rows the way offset pagination would. A deleted file's place in its tenant's
   list (for a list's `after`) is forgotten FILE_CURSOR_SECONDS after it was deleted;
3. expires the Uploads (the Uploads API) not completed within their hour, deleting the bytes a completion cut short
   may have written, and deletes the parts of every upload that is no longer open (completed, cancelled, expired);
4. aborts the S3 multipart uploads (removes the local staging files) that writers killed mid-upload left behind,
   once they are older than `gc_stale_upload_age`: younger ones may still be in progress.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import structlog

from batch_gateway import ids, wire
from batch_gateway.errors import StorageUnavailable
from batch_gateway.executor.base import Executor, RunState
from batch_gateway.services import Services
from batch_gateway.store.objects import file_key

PAGE = 100
MAX_PAGES = 100  # at most 10,000 files a pass; the next pass continues
# How long a deleted file keeps its place in its tenant's list: a client paging through its files while it deletes
# them asks for the page after one it deleted, usually within seconds.
FILE_CURSOR_SECONDS = 86400

log = structlog.get_logger("gc")
_skipped_uploads_said = threading.Event()


@dataclass
class GcReport:
    resubmitted: int = 0
    overdue: int = 0
    files_deleted: int = 0
    file_cursors_forgotten: int = 0
    uploads_expired: int = 0
    upload_parts_deleted: int = 0
    uploads_aborted: int = 0


async def reconcile(services: Services, executor: Executor, report: GcReport) -> None:
    now = ids.now()
    leased = await services.metadata.leased_batches(now)
    for batch in await services.metadata.batches_with_status(wire.ACTIVE_STATUSES):
        overdue = batch.expires_at <= now
        report.overdue += overdue
        try:
            state = await executor.state(batch.id)
            if state == RunState.RUNNING or batch.id in leased:
                continue  # its runner (perhaps one a previous `serve` started) handles cancel and expiry itself
            # Read again after asking the executor: a runner that ended the batch since the list was read is no
            # longer running, and the batch must not get another.
            current = await services.metadata.get_batch(batch.id, None)
            if current is None or current.terminal:
                continue
            log.info("gc.resubmit", batch_id=batch.id, status=current.status, run_state=state.value, overdue=overdue)
            await executor.submit(batch.id, tenant=current.tenant, model=current.model, deadline=current.expires_at)
        except Exception:
            # One batch that cannot be handled now must not stop the pass for the others; the next pass retries.
            log.exception("gc.resubmit_failed", batch_id=batch.id)
            continue
        report.resubmitted += 1


async def delete_expired_files(services: Services, report: GcReport) -> None:
    for _ in range(MAX_PAGES):
        expired = await services.metadata.expired_files(ids.now(), PAGE)
        if not expired:
            break
        for record in expired:
            await services.metadata.hide_file(record.id, None, ids.now())
            log.info("gc.file_expired", file_id=record.id, tenant=record.tenant, expires_at=record.expires_at)
    await delete_hidden_files(services, report)


async def delete_hidden_files(services: Services, report: GcReport) -> None:
    """Hidden files (deleted or expired) that no unfinished batch reads any more: bytes, then the row; and the list
    places of files deleted more than FILE_CURSOR_SECONDS ago."""
    for _ in range(MAX_PAGES):
        hidden = await services.metadata.deletable_hidden_files(PAGE)
        if not hidden:
            break
        for record in hidden:
            await services.objects.delete(record.object_key)
            await services.metadata.delete_file(record.id, None)
            report.files_deleted += 1
            log.info("gc.file_deleted", file_id=record.id, tenant=record.tenant)
    report.file_cursors_forgotten += await services.metadata.forget_file_cursors(ids.now() - FILE_CURSOR_SECONDS)


async def expire_uploads(services: Services, report: GcReport) -> None:
    """Uploads left uncompleted past their hour expire; then the parts of every finished upload are deleted, bytes
    first and then the row, so a crash in between leaves a row the next pass deletes again."""
    for _ in range(MAX_PAGES):
        expired = await services.metadata.expire_uploads(ids.now(), PAGE)
        if not expired:
            break
        for upload in expired:
            # A completion cut short (a crash) may have written the file's bytes without its record.
            await services.objects.delete(file_key(upload.tenant, ids.upload_file_id(upload.id)))
            report.uploads_expired += 1
            log.info("gc.upload_expired", upload_id=upload.id, tenant=upload.tenant, expires_at=upload.expires_at)
    for _ in range(MAX_PAGES):
        parts = await services.metadata.stale_upload_parts(PAGE)
        if not parts:
            return
        for part in parts:
            await services.objects.delete(part.object_key)
            await services.metadata.delete_upload_part(part.id)
            report.upload_parts_deleted += 1
        log.info("gc.upload_parts_deleted", parts=len(parts))


async def abort_stale_uploads(services: Services, report: GcReport) -> None:
    try:
        aborted = await services.objects.abort_stale_uploads(services.settings.gc_stale_upload_age)
    except StorageUnavailable as exc:  # the next pass tries again
        log.warning("gc.stale_uploads_failed", error=str(exc))
        return
    if aborted is None:
        if not _skipped_uploads_said.is_set():  # once per process, not every pass
            _skipped_uploads_said.set()
            log.warning(
                "gc.stale_uploads_skipped",
                reason="no AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY to list multipart uploads with; "
                "add an AbortIncompleteMultipartUpload lifecycle rule to the bucket instead",
            )
        return
    report.uploads_aborted += aborted


async def collect(services: Services, executor: Executor) -> GcReport:
    report = GcReport()
    await reconcile(services, executor, report)
    await delete_expired_files(services, report)
    await expire_uploads(services, report)
    await abort_stale_uploads(services, report)
    log.info("gc.pass_done", **report.__dict__)
    return report
