"""This runner's side of the load board (`MetadataStore.share_load`): publish its load on each endpoint, and keep the
latest loads the other batch runners published there.

An engine's gauges cannot tell one batch runner from another, or from interactive users. Runners sharing an engine
therefore tell each other what they hold, so each can count the rest of the engine's load as interactive, and all
of them split the batch's share the same way. The exchange runs beside the controller, never in its way: a slow or
unavailable database leaves the runner with the loads it last saw. Each exchange runs beside the scrape of the
engine's gauges, so what the runner reads of the others is at most a reading old.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from batch_gateway.errors import StorageUnavailable
from batch_gateway.store.metadata import MetadataStore, RunnerLoad

FRESH_SECONDS = 5.0  # a load not refreshed for this long is of a runner gone (each refreshes every reading)
FORGET_SECONDS = 3600.0  # rows this old are deleted when a runner withdraws


class LoadBoard:
    def __init__(
        self, metadata: MetadataStore, owner: str, log: structlog.typing.FilteringBoundLogger, tenant: str = ""
    ) -> None:
        self.metadata = metadata
        self.owner = owner
        self.log = log
        self.tenant = tenant  # published with each load: a tenant's runners on one engine share its weight
        self._peers: dict[str, list[RunnerLoad]] = {}
        self._exchanges: dict[str, asyncio.Task] = {}
        self._failing = False

    def peers(self, endpoint: str) -> list[RunnerLoad]:
        """The other runners' loads on `endpoint`, as last read (those gone stale since are left out)."""
        fresh_after = time.time() - FRESH_SECONDS
        return [load for load in self._peers.get(endpoint, []) if load.at > fresh_after]

    async def exchange(
        self,
        endpoint: str,
        *,
        inflight: int,
        limit: int,
        demand: int,
        completed: int,
        weight: float = 1.0,
        budget: float = 0.0,
        wait: float = 0.25,
    ) -> list[RunnerLoad]:
        """Publish this runner's load and read the others'; if the database does not answer within `wait` seconds,
        the exchange goes on in the background and the others' loads as last read are returned."""
        task = self._exchanges.get(endpoint)
        if task is None:  # one exchange per endpoint at a time
            load = RunnerLoad(self.owner, inflight, limit, demand, completed, weight, time.time(), self.tenant, budget)
            task = self._exchanges[endpoint] = asyncio.create_task(self._exchange(endpoint, load))
            task.add_done_callback(lambda _: self._exchanges.pop(endpoint, None))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), wait)
        return self.peers(endpoint)

    async def _exchange(self, endpoint: str, load: RunnerLoad) -> None:
        try:
            self._peers[endpoint] = await self.metadata.share_load(endpoint, load, load.at - FRESH_SECONDS)
        except StorageUnavailable as exc:
            if not self._failing:
                self.log.warning("runner.load_board_unavailable", error=str(exc))
            self._failing = True
            return
        if self._failing:
            self.log.info("runner.load_board_back")
        self._failing = False

    async def withdraw(self) -> None:
        for task in list(self._exchanges.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(StorageUnavailable):
            await self.metadata.withdraw_load(self.owner, time.time() - FORGET_SECONDS)
