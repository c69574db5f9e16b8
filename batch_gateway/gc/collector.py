"""Garbage collection and reconciliation, one pass at a time.

`batch-gateway gc` runs one pass and exits (the CronWorkflow); `serve` runs the same pass periodically in local mode.
A pass:
1. hands every unfinished batch that no runner is working on (none the executor knows of, and no live lease) back to
   the executor. That covers batches whose runner vanished (crash, deleted Workflow, failed submission), runners that
   exited to retry later (storage down), and overdue batches: a runner started for an overdue batch
   ends it `expired`, keeping partial results and writing `batch_expired` lines for the rest;
2. deletes expired files, object first and then the row, so a crash in between leaves a row that the next pass
   deletes again (deleting a missing object is not an error). It always takes the first page of what is left, so
   deleting never skips rows the way offset pagination would.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from batch_gateway import ids, wire
from batch_gateway.executor.base import Executor, RunState
from batch_gateway.services import Services

PAGE = 100
MAX_PAGES = 100  # at most 10,000 files a pass; the next pass continues

log = structlog.get_logger("gc")


@dataclass
class GcReport:
    resubmitted: int = 0
    overdue: int = 0
    files_deleted: int = 0


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
            log.info("gc.resubmit", batch_id=batch.id, status=batch.status, run_state=state.value, overdue=overdue)
            await executor.submit(batch.id, tenant=batch.tenant, model=batch.model)
        except Exception:
            # One batch that cannot be handled now must not stop the pass for the others; the next pass retries.
            log.exception("gc.resubmit_failed", batch_id=batch.id)
            continue
        report.resubmitted += 1


async def delete_expired_files(services: Services, report: GcReport) -> None:
    for _ in range(MAX_PAGES):
        expired = await services.metadata.expired_files(ids.now(), PAGE)
        if not expired:
            return
        for record in expired:
            await services.objects.delete(record.object_key)
            await services.metadata.delete_file(record.id, None)
            report.files_deleted += 1
            log.info("gc.file_deleted", file_id=record.id, tenant=record.tenant, expires_at=record.expires_at)


async def collect(services: Services, executor: Executor) -> GcReport:
    report = GcReport()
    await reconcile(services, executor, report)
    await delete_expired_files(services, report)
    log.info("gc.pass_done", **report.__dict__)
    return report
