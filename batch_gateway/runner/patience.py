"""Waiting out storage that is down: the database, the object store, or a full work disk.

An outage of a few minutes is an everyday event (a database failover, an S3 endpoint restarting, a disk being
freed). A runner that crashed on the first error would be restarted, re-read its input and crash again; after a few
restarts the batch would fail with its results stranded in checkpoints. So each idempotent phase of the runner is
retried here with capped exponential backoff. Only after `patience` seconds of failures does the runner give up, and
then as "retry later" (`StorageGaveUp`): its results stay in checkpoints, and the next runner resumes from them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

from batch_gateway.errors import StorageUnavailable

T = TypeVar("T")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 15.0


class StorageGaveUp(Exception):
    """Storage stayed unavailable for longer than the runner's patience."""


class WaitInterrupted(Exception):
    """The process is shutting down: stop waiting for storage."""


class Interrupted(Exception):
    """The process was asked to stop (SIGTERM); results so far are checkpointed for the next runner."""


async def with_patience(
    what: str,
    operation: Callable[[], Awaitable[T]],
    *,
    log: structlog.typing.FilteringBoundLogger,
    patience: float,
    interrupted: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Run `operation` (which must be safe to run again from the start) until it does not raise
    StorageUnavailable, waiting with backoff in between; raise StorageGaveUp once `patience` seconds have passed
    since the first failure. `interrupted()` is checked before each wait: a shutdown cancels the waiting. (`clock`
    and `sleep` are time's, unless a test brings its own.)"""
    first_failure: float | None = None
    attempt = 0
    while True:
        try:
            result = await operation()
        except StorageUnavailable as exc:
            now = clock()
            first_failure = first_failure if first_failure is not None else now
            attempt += 1
            waited = now - first_failure
            if waited >= patience:
                log.error("runner.storage_gave_up", during=what, seconds=round(waited, 1), error=str(exc))
                raise StorageGaveUp(f"could not {what} for {waited:.0f} s: {exc}") from exc
            if interrupted():
                raise WaitInterrupted(f"stopped while waiting to {what}") from exc
            delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning(
                "runner.storage_unavailable", during=what, attempt=attempt, retry_in=round(delay, 2), error=str(exc)
            )
            await sleep(min(delay, max(0.0, patience - waited)))
            continue
        if attempt:
            log.info("runner.storage_back", during=what, attempts=attempt + 1)
        return result


class Patience:
    """`with_patience` for one runner: its log, how long it waits, and its shutdown, which ends any waiting (then
    `Interrupted`, naming `label`)."""

    def __init__(
        self,
        *,
        label: str,
        log: structlog.typing.FilteringBoundLogger,
        seconds: float,
        interrupted: Callable[[], bool],
    ) -> None:
        self.label = label
        self.log = log
        self.seconds = seconds
        self.interrupted = interrupted

    async def __call__(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        try:
            return await with_patience(
                what, operation, log=self.log, patience=self.seconds, interrupted=self.interrupted
            )
        except WaitInterrupted as exc:
            raise Interrupted(f"{self.label}: {exc}") from None
