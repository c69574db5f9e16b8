"""While dispatch runs: checkpoints, live progress, cancel and expiry.

Every `WATCH_INTERVAL` the runner publishes its progress and checks for a cancel (both through Valkey) and for the
batch's expiry; it flushes its checkpoints every `--checkpoint-interval` seconds. The database is the fallback for
progress and cancels: the runner writes its counts there and reads the batch's status every `DATABASE_INTERVAL`
seconds while Valkey is up, every `DATABASE_FALLBACK_INTERVAL` while it is down or not configured.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from batch_gateway import ids, wire
from batch_gateway.errors import StorageUnavailable
from batch_gateway.runner import metrics as runner_metrics
from batch_gateway.runner.checkpoint import Checkpoints, Totals
from batch_gateway.runner.stop import Stop, StopReason
from batch_gateway.services import Services
from batch_gateway.store.metadata import BatchRecord
from batch_gateway.store.parts import ResultKind

WATCH_INTERVAL = 0.2
DATABASE_INTERVAL = 5.0
DATABASE_FALLBACK_INTERVAL = 1.0


class Progress:
    """The run's counts so far, every result counted as it arrives (durable or not yet)."""

    def __init__(self, total: int, totals: Totals) -> None:
        self.total = total
        self.totals = totals  # those already durable when the run started, and every result since

    def add(self, kind: ResultKind, usage: wire.TokenUsage | None) -> None:
        self.totals.add(kind, usage)

    def counts(self) -> wire.RequestCounts:
        return wire.RequestCounts(total=self.total, completed=self.totals.completed, failed=self.totals.failed)


async def flush(checkpoints: Checkpoints, log: structlog.typing.FilteringBoundLogger) -> None:
    """Make the buffered results durable if the object store lets us; otherwise they wait for the next flush."""
    try:
        await checkpoints.flush()
    except StorageUnavailable as exc:
        log.warning("runner.checkpoint_failed", error=str(exc), pending=checkpoints.pending)


class Watch:
    def __init__(
        self,
        services: Services,
        batch: BatchRecord,
        checkpoints: Checkpoints,
        progress: Progress,
        stop: Stop,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.signals = services.signals
        self.metadata = services.metadata
        self.checkpoint_interval = services.settings.checkpoint_interval
        self.batch = batch
        self.checkpoints = checkpoints
        self.progress = progress
        self.stop = stop
        self.log = log

    async def run(self) -> None:
        """Until cancelled (dispatch ended)."""
        batch_id = self.batch.id
        last_database = last_checkpoint = time.monotonic()
        while True:
            database_interval = DATABASE_INTERVAL if self.signals.state == "ok" else DATABASE_FALLBACK_INTERVAL
            await asyncio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            counts = self.progress.counts()
            usage = self.progress.totals.usage
            if usage.input_tokens:
                runner_metrics.PREFIX_HIT_RATE.set(usage.input_tokens_details.cached_tokens / usage.input_tokens)
            await self.signals.publish_progress(batch_id, counts, usage)
            if await self.signals.cancel_requested(batch_id):
                self.stop(StopReason.CANCELLED)
            if ids.now() >= self.batch.expires_at:
                self.stop(StopReason.EXPIRED)
            if now - last_checkpoint >= self.checkpoint_interval:
                last_checkpoint = now
                await flush(self.checkpoints, self.log)
            if now - last_database >= database_interval:
                last_database = now
                try:
                    await self.metadata.save_progress(batch_id, counts, usage)
                    current = await self.metadata.get_batch(batch_id, None)
                except StorageUnavailable as exc:
                    self.log.warning("runner.database_unavailable", error=str(exc))
                    continue
                if current is not None and current.status == wire.BatchStatus.CANCELLING:
                    self.stop(StopReason.CANCELLED)
