"""Ending a batch: its output and error files, their records, its terminal status and its run statistics.

Idempotent, so it is simply run again after a storage outage: the file ids derive from the batch id, a file record
inserted again is a no-op, and every status change is a compare-and-set. A batch cancelled meanwhile ends `cancelled`,
never `completed`, with the same files. The terminal status change writes the batch's webhook event into the outbox
in the same transaction (a trigger on `batches`); `serve` delivers it.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
import numpy as np
import structlog

from batch_gateway import ids, wire
from batch_gateway.errors import StorageUnavailable
from batch_gateway.runner.checkpoint import Checkpoints, Totals
from batch_gateway.runner.ingest import Ingested, read_request
from batch_gateway.runner.run_stats import DispatchStats, final_stats
from batch_gateway.runner.stop import StopReason
from batch_gateway.services import Services
from batch_gateway.store.metadata import BatchRecord, FileRecord
from batch_gateway.store.objects import batch_prefix, file_key, run_stats_key
from batch_gateway.store.parts import ResultKind
from batch_gateway.wire import BatchStatus

# The error line of every line that did not run, by how the batch ended.
UNFINISHED_LINE_ERRORS = {
    StopReason.CANCELLED: ("batch_cancelled", "This request was not executed because the batch was cancelled."),
    StopReason.EXPIRED: (
        "batch_expired",
        "This request could not be executed before the completion window expired.",
    ),
    StopReason.FAILED: (
        "batch_failed",
        "This request was not executed because the batch failed; see the batch's errors.",
    ),
}
# The terminal status each way of ending gives, and the statuses it may be reached from.
ENDINGS: dict[StopReason, tuple[BatchStatus, list[BatchStatus]]] = {
    StopReason.COMPLETED: (BatchStatus.COMPLETED, [BatchStatus.FINALIZING]),
    StopReason.CANCELLED: (BatchStatus.CANCELLED, [BatchStatus.CANCELLING]),
    StopReason.EXPIRED: (BatchStatus.EXPIRED, [BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING]),
    # Not from `cancelling`: a batch its tenant cancelled ends `cancelled` however its runner ended (`end`).
    StopReason.FAILED: (BatchStatus.FAILED, [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING]),
}


class _CustomId(msgspec.Struct):
    custom_id: str


class Finaliser:
    def __init__(
        self,
        services: Services,
        batch_id: str,
        log: structlog.typing.FilteringBoundLogger,
        reload: Callable[[], Awaitable[BatchRecord]],
    ) -> None:
        self.metadata = services.metadata
        self.objects = services.objects
        self.work_path = services.settings.work_path
        self.batch_id = batch_id
        self.log = log
        self.reload = reload  # the batch as stored now

    async def finalise(
        self,
        batch: BatchRecord,
        ingested: Ingested,
        checkpoints: Checkpoints,
        reason: StopReason,
        *,
        dispatch: DispatchStats | None = None,
        errors: list[wire.BatchError] | None = None,
    ) -> BatchStatus:
        """Write the output and error files and end the batch as `reason` says."""
        await checkpoints.flush()
        if reason == StopReason.COMPLETED:
            moved = await self.metadata.transition(
                self.batch_id, [BatchStatus.IN_PROGRESS], BatchStatus.FINALIZING, ids.now()
            )
            batch = moved or await self.reload()
            if batch.status == BatchStatus.CANCELLING:
                reason = StopReason.CANCELLED
            elif batch.status != BatchStatus.FINALIZING:
                self.log.warning("runner.unexpected_status", status=batch.status)
                return batch.status
        done, totals = await checkpoints.load(ingested.count)
        missing = int((~done).sum())
        if reason == StopReason.COMPLETED and missing:
            raise RuntimeError(f"{missing} lines have no result; refusing to complete the batch")
        code = UNFINISHED_LINE_ERRORS.get(reason)
        failed = totals.failed + (missing if code else 0)

        output_id = error_id = None
        now = ids.now()
        ttl = batch.output_expires_after  # as at OpenAI, results are kept until deleted unless the batch said otherwise
        if totals.completed:
            output_id = ids.result_file_id(self.batch_id, "output")
            size = await checkpoints.write_file(file_key(batch.tenant, output_id), ResultKind.OUTPUT, ingested.count)
            await self._record_file(batch, output_id, "output", size, now, ttl)
        if failed:
            error_id = ids.result_file_id(self.batch_id, "error")
            extra = self._unfinished_lines(ingested, done, *code) if code else None
            size = await checkpoints.write_file(
                file_key(batch.tenant, error_id), ResultKind.ERROR, ingested.count, extra
            )
            await self._record_file(batch, error_id, "error", size, now, ttl)

        changes: dict[str, Any] = {
            "output_file_id": output_id,
            "error_file_id": error_id,
            "request_counts": wire.RequestCounts(total=ingested.count, completed=totals.completed, failed=failed),
            "usage": totals.usage,
        }
        if errors:
            changes["errors"] = errors
        status = await self.end(*ENDINGS[reason], changes)
        await self._save_run_stats(batch, dispatch, totals)
        await checkpoints.delete()
        shutil.rmtree(ingested.path.parent, ignore_errors=True)
        return status

    async def end(self, status: BatchStatus, sources: list[BatchStatus], changes: dict[str, Any]) -> BatchStatus:
        """Move the batch to `status` from one of `sources`; a batch cancelled meanwhile ends `cancelled` instead of
        `completed`, `expired` or `failed`."""
        moved = await self.metadata.transition(self.batch_id, sources, status, ids.now(), **changes)
        if moved is None and status in (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.FAILED):
            moved = await self.metadata.transition(
                self.batch_id, [BatchStatus.CANCELLING], BatchStatus.CANCELLED, ids.now(), **changes
            )
        final = moved or await self.reload()
        counts = final.request_counts
        self.log.info(
            "runner.finished",
            status=final.status,
            total=counts.total,
            completed=counts.completed,
            failed=counts.failed,
            output_file_id=final.output_file_id,
            error_file_id=final.error_file_id,
        )
        return final.status

    async def fail_validation(self, errors: list[wire.BatchError]) -> BatchStatus:
        """The input did not validate: the batch fails with `errors` (or ends cancelled, if it was cancelled)."""
        moved = await self.metadata.transition(
            self.batch_id, [BatchStatus.VALIDATING], BatchStatus.FAILED, ids.now(), errors=errors
        )
        if moved is None:
            current = await self.reload()
            if current.status == BatchStatus.CANCELLING:
                return await self.end(BatchStatus.CANCELLED, [BatchStatus.CANCELLING], {"errors": errors})
            return current.status
        self.log.info("runner.validation_failed", errors=len(errors), first=errors[0].message if errors else None)
        shutil.rmtree(self.work_path / self.batch_id, ignore_errors=True)
        return BatchStatus.FAILED

    async def cleanup(self, batch: BatchRecord) -> None:
        """A terminal batch keeps no checkpoints or work files (a runner may have died right after finishing)."""
        await self.objects.delete_prefix(batch_prefix(batch.tenant, self.batch_id) + "/parts/")
        shutil.rmtree(self.work_path / self.batch_id, ignore_errors=True)

    async def _save_run_stats(self, batch: BatchRecord, dispatch: DispatchStats | None, totals: Totals) -> None:
        try:
            await self.objects.put_bytes(run_stats_key(batch.tenant, self.batch_id), final_stats(dispatch, totals))
        except StorageUnavailable as exc:
            self.log.warning("runner.run_stats_not_saved", error=str(exc))

    async def _record_file(
        self, batch: BatchRecord, file_id: str, kind: str, size: int, now: int, ttl: int | None
    ) -> None:
        await self.metadata.insert_file(
            FileRecord(
                id=file_id,
                tenant=batch.tenant,
                bytes=size,
                created_at=now,
                filename=f"{self.batch_id}_{kind}.jsonl",
                purpose="batch_output",
                object_key=file_key(batch.tenant, file_id),
                expires_at=now + ttl if ttl is not None else None,
            )
        )

    def _unfinished_lines(self, ingested: Ingested, done: np.ndarray, code: str, message: str) -> Iterator[bytes]:
        with open(ingested.path, "rb") as f:
            fd = f.fileno()
            for line in np.flatnonzero(~done):
                custom_id = msgspec.json.decode(read_request(ingested, fd, int(line)), type=_CustomId).custom_id
                yield wire.encode_result_line(
                    wire.ResultLine(
                        id=ids.request_line_id(self.batch_id, int(line)),
                        custom_id=custom_id,
                        response=None,
                        error=wire.LineError(code=code, message=message),
                    )
                )
