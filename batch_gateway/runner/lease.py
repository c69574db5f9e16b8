"""The runner's lease on its batch: one runner works on a batch at a time.

`claim_batch` is one conditional UPDATE: it takes the batch only if nobody holds an unexpired lease (or this runner
does already). A runner that finds the batch held waits out a crashed runner's lease, which it cannot tell from a live
one, and gives up (`LeaseLost`) once the lease must have run out. While it works, the lease is renewed every third of
its length; a runner that loses it (another took the batch over) is told to stop, and stops without touching the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import structlog

from batch_gateway import ids
from batch_gateway.errors import StorageUnavailable
from batch_gateway.runner.patience import Patience
from batch_gateway.store.metadata import MetadataStore

CLAIM_RETRY_SECONDS = 1.0


class LeaseLost(Exception):
    """Another runner holds the batch, or took it over; stop without touching it."""


class Lease:
    def __init__(
        self,
        metadata: MetadataStore,
        batch_id: str,
        owner: str,
        *,
        seconds: int,
        log: structlog.typing.FilteringBoundLogger,
        on_lost: Callable[[], None],
    ) -> None:
        self.metadata = metadata
        self.batch_id = batch_id
        self.owner = owner
        self.seconds = seconds
        self.log = log
        self.on_lost = on_lost

    @contextlib.asynccontextmanager
    async def held(self, patience: Patience) -> AsyncIterator[None]:
        """Claim the batch, keep the lease while the block runs, and release it after."""
        await self._claim(patience)
        heartbeat = asyncio.create_task(self._renew())
        try:
            yield
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat
            with contextlib.suppress(Exception):
                await self.metadata.release_batch(self.batch_id, self.owner)

    async def _claim(self, patience: Patience) -> None:
        """Take the lease, waiting out a crashed runner's lease (bounded by the lease length)."""
        deadline = time.monotonic() + self.seconds + 5
        while not await patience(
            "claim the batch", lambda: self.metadata.claim_batch(self.batch_id, self.owner, ids.now(), self.seconds)
        ):
            if time.monotonic() > deadline:
                raise LeaseLost(f"batch {self.batch_id} is held by another runner")
            self.log.info("runner.waiting_for_lease")
            await asyncio.sleep(CLAIM_RETRY_SECONDS)
        self.log.info("runner.claimed", owner=self.owner)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.seconds / 3))
            try:
                if not await self.metadata.renew_lease(self.batch_id, self.owner, ids.now(), self.seconds):
                    self.log.error("runner.lease_lost")
                    self.on_lost()
                    return
            except StorageUnavailable as exc:
                self.log.warning("runner.lease_renew_failed", error=str(exc))
