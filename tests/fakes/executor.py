"""A fake executor, for the API's and gc's tests: it records what it is asked to run and starts nothing.

The real executors start runner processes (`executor/local.py`) or Argo Workflows (`executor/argo.py`); the tests of
the API and of gc check what is handed to them, and leave running the batches to the end-to-end tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from batch_gateway.executor.base import Executor, RunState


class RecordingExecutor(Executor):
    def __init__(self, *, running: Iterable[str] = (), broken: Iterable[str] = ()) -> None:
        self.submitted: list[tuple[str, str]] = []  # (batch id, tenant), of every submission that succeeded
        self.cancelled: list[str] = []
        self.running = set(running)  # batches it says a runner is working on (besides those it was given)
        self.broken = set(broken)  # batches whose submission fails
        self.fail_submit = False  # every submission fails: the cluster is down

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def submit(self, batch_id: str, *, tenant: str, model: str | None = None, deadline: float = math.inf) -> None:
        if self.fail_submit or batch_id in self.broken:
            raise RuntimeError("the executor is down (test)")
        self.submitted.append((batch_id, tenant))

    async def cancel(self, batch_id: str) -> None:
        self.cancelled.append(batch_id)

    async def state(self, batch_id: str) -> RunState:
        running = batch_id in self.running or any(submitted == batch_id for submitted, _ in self.submitted)
        return RunState.RUNNING if running else RunState.UNKNOWN
