"""The embedded executor: one runner subprocess per batch on this machine, at most N at a time.

A runner that crashes is started again (it resumes from its checkpoints) a few times with backoff; after that the
batch is failed with a clear error rather than left stuck. On start-up `serve` resubmits every batch a crash left
unfinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections import deque

import structlog

from batch_gateway import ids, wire
from batch_gateway.executor.base import Executor, RunState
from batch_gateway.settings import Settings
from batch_gateway.store.metadata import MetadataStore

MAX_RESTARTS = 5
STOP_GRACE = 10.0

log = structlog.get_logger("executor.local")


class LocalExecutor(Executor):
    def __init__(self, settings: Settings, metadata: MetadataStore) -> None:
        self.settings = settings
        self.metadata = metadata
        self._queue: deque[str] = deque()
        self._urgent: set[str] = set()  # cancelled while queued: run now so it finalises promptly
        self._running: dict[str, asyncio.subprocess.Process] = {}
        self._attempts: dict[str, int] = {}
        self._finished: set[str] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._watchers: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        # Runners checkpoint on SIGTERM and resume when `serve` starts again.
        for process in self._running.values():
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        for batch_id, process in list(self._running.items()):
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE)
            except asyncio.TimeoutError:
                log.warning("executor.runner_killed", batch_id=batch_id)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for watcher in self._watchers:
            watcher.cancel()

    async def submit(self, batch_id: str, *, tenant: str, model: str | None = None) -> None:
        if batch_id in self._running or batch_id in self._queue:
            return
        self._finished.discard(batch_id)
        self._queue.append(batch_id)
        log.info("executor.queued", batch_id=batch_id, queued=len(self._queue), running=len(self._running))
        self._wake.set()

    async def cancel(self, batch_id: str) -> None:
        if batch_id in self._queue:
            self._urgent.add(batch_id)
            self._wake.set()

    async def state(self, batch_id: str) -> RunState:
        if batch_id in self._running or batch_id in self._queue:
            return RunState.RUNNING
        if batch_id in self._finished:
            return RunState.FINISHED
        return RunState.UNKNOWN

    # ------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            for batch_id in [b for b in self._queue if b in self._urgent]:
                self._queue.remove(batch_id)
                self._urgent.discard(batch_id)
                await self._spawn(batch_id)
            while self._queue and len(self._running) < self.settings.max_concurrent_runners:
                await self._spawn(self._queue.popleft())
            self._wake.clear()
            await self._wake.wait()

    async def _spawn(self, batch_id: str) -> None:
        self._attempts[batch_id] = self._attempts.get(batch_id, 0) + 1
        env = {**os.environ, **self.settings.to_env()}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "batch_gateway.runner", "--batch-id", batch_id, env=env, stdin=asyncio.subprocess.DEVNULL
        )
        self._running[batch_id] = process
        log.info("executor.runner_started", batch_id=batch_id, pid=process.pid, attempt=self._attempts[batch_id])
        watcher = asyncio.create_task(self._watch(batch_id, process))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, batch_id: str, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        self._running.pop(batch_id, None)
        self._wake.set()
        if code == 0:
            self._finished.add(batch_id)
            self._attempts.pop(batch_id, None)
            log.info("executor.runner_exited", batch_id=batch_id)
            return
        if code < 0 and self._loop_task is not None and self._loop_task.done():
            return  # we are shutting down and stopped it ourselves
        attempts = self._attempts.get(batch_id, 0)
        batch = await self.metadata.get_batch(batch_id, None)
        if batch is None or batch.terminal:
            self._finished.add(batch_id)
            return
        if attempts >= MAX_RESTARTS:
            log.error("executor.runner_gave_up", batch_id=batch_id, exit_code=code, attempts=attempts)
            await self.metadata.transition(
                batch_id,
                list(wire.ACTIVE_STATUSES),
                "failed",
                ids.now(),
                errors=[
                    wire.BatchError(
                        code="runner_failed",
                        message=f"The batch runner crashed {attempts} times (last exit code {code}); see the server "
                        "logs for this batch id. Completed results were kept in checkpoints.",
                    )
                ],
            )
            self._finished.add(batch_id)
            return
        delay = min(30.0, 2.0**attempts)
        log.warning("executor.runner_crashed", batch_id=batch_id, exit_code=code, retry_in=delay)
        await asyncio.sleep(delay)
        await self.submit(batch_id, tenant=batch.tenant)
