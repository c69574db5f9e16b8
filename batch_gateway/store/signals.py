"""Live signals between the API and runners: progress (request counts, usage) and cancel requests.

The database is always the durable source of truth; signals only make things faster. `NullSignals` is the embedded
default (no Valkey): the runner polls the database for cancels and writes progress there about once a second.
`valkey.py` carries progress at high frequency and cancels in well under a second.
"""

from __future__ import annotations

import abc
from collections.abc import Collection

from batch_gateway import wire


class Signals(abc.ABC):
    #: Shown in /ready and logs: "disabled", "ok" or "down".
    state: str = "disabled"

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def publish_progress(self, batch_id: str, counts: wire.RequestCounts, usage: wire.Usage | None) -> None:
        """Record live progress. Never raises: a signals outage must not fail a batch."""

    @abc.abstractmethod
    async def read_progress(
        self, batch_ids: Collection[str]
    ) -> dict[str, tuple[wire.RequestCounts, wire.Usage | None]]:
        """Live progress of running batches that have any; missing ids have none. Never raises."""

    @abc.abstractmethod
    async def request_cancel(self, batch_id: str) -> None:
        """Tell the batch's runner to stop now. Never raises."""

    @abc.abstractmethod
    async def cancel_requested(self, batch_id: str) -> bool:
        """True once a cancel was signalled for the batch (cheap; called about 10 times a second)."""


class NullSignals(Signals):
    """No live channel: the database carries everything."""

    state = "disabled"

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish_progress(self, batch_id: str, counts: wire.RequestCounts, usage: wire.Usage | None) -> None:
        return None

    async def read_progress(
        self, batch_ids: Collection[str]
    ) -> dict[str, tuple[wire.RequestCounts, wire.Usage | None]]:
        return {}

    async def request_cancel(self, batch_id: str) -> None:
        return None

    async def cancel_requested(self, batch_id: str) -> bool:
        return False
