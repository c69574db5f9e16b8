"""The embedded executor: one runner subprocess per batch on this machine, at most N at a time, started in the
admission order (`admission.py`: earliest deadline first within weighted fair sharing between tenants).

Each runner is tied to this process (it gets SIGTERM when `serve` dies, checkpoints and exits; see
`runner/process.py`), so a `serve` killed with SIGKILL leaves no orphan holding a batch, and on start-up `serve`
resubmits every unfinished batch. What a runner's exit code means (`runner/exits.py`):
- a crash is restarted with backoff; after `--runner-max-crashes` crashes in a row without progress in between, the
  batch is given up: a last runner ends it `failed` with every finished result published (never while a live runner
  holds its lease);
- "another runner holds the lease" and "retry later" (storage down, a signal) are not crashes: the periodic
  reconcile pass starts a runner again when the batch needs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import sys
import time
import uuid
from collections import Counter

import structlog

from batch_gateway import admission
from batch_gateway.admission import Place, Plan, Running, SlotUsage, Waiting
from batch_gateway.errors import StorageUnavailable
from batch_gateway.executor.base import Executor, RunState, end_unpublished
from batch_gateway.runner.exits import EXIT_LEASE_HELD, EXIT_OK, EXIT_RETRY_LATER, OWNER_ENV, PARENT_ENV
from batch_gateway.settings import Settings
from batch_gateway.store.metadata import MetadataStore

STOP_GRACE = 10.0
ADMISSION_REFRESH = 5.0  # seconds between admission passes without news: tenants' policies, projected starts

log = structlog.get_logger("executor.local")


class LocalExecutor(Executor):
    def __init__(self, settings: Settings, metadata: MetadataStore) -> None:
        self.settings = settings
        self.metadata = metadata
        self._queue: dict[str, Waiting] = {}  # waiting for a slot, in submission order
        self._urgent: set[str] = set()  # cancelled while queued: run now so it finalises promptly
        self._running: dict[str, asyncio.subprocess.Process] = {}
        self._running_for: dict[str, tuple[str, float]] = {}  # batch id -> (tenant, started at)
        self._policies: dict = {}  # tenant -> TenantPolicy, as last read
        self._plan = Plan([], [])
        self._usage = SlotUsage(settings.fair_share_window)
        self._crashes: dict[str, tuple[int, int]] = {}  # batch id -> (crashes in a row, lines done at the last)
        self._giving_up: dict[str, str] = {}  # batch id -> reason, for the runner that ends it failed
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
            except TimeoutError:
                log.warning("executor.runner_killed", batch_id=batch_id)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for watcher in self._watchers:
            watcher.cancel()

    async def submit(self, batch_id: str, *, tenant: str, model: str | None = None, deadline: float = math.inf) -> None:
        if batch_id in self._running or batch_id in self._queue:
            return
        self._finished.discard(batch_id)
        self._queue[batch_id] = Waiting(batch_id, tenant, deadline, time.time(), model)
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

    def queue_place(self, batch_id: str) -> Place | None:
        return self._plan.place_of(batch_id)

    def queue(self) -> list[Place]:
        return list(self._plan.queue)

    # ------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            now = time.time()
            # Cancelled or past its deadline: its runner only ends it, so it takes no slot.
            for batch_id in [b for b, w in self._queue.items() if b in self._urgent or w.deadline <= now]:
                self._urgent.discard(batch_id)
                await self._spawn(self._queue.pop(batch_id))
            self._wake.clear()
            try:
                self._plan = await self._admit(now)
            except Exception:  # a bug must not stop every batch: start them in arrival order meanwhile
                log.exception("executor.admission_failed")
                self._plan = admission.plan(
                    list(self._queue.values()),
                    [Running(t) for t, _ in self._running_for.values()],
                    self.settings.max_concurrent_runners,
                    {},
                    now,
                    fifo=True,
                )
            for batch in self._plan.start:
                del self._queue[batch.batch_id]
                await self._spawn(batch)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ADMISSION_REFRESH)

    async def _admit(self, now: float) -> Plan:
        """Which queued batches start now, and the order of the others (their queue positions)."""
        usage = self._usage.observe(Counter(tenant for tenant, _ in self._running_for.values()), now)
        if not self._queue:
            return Plan([], [])
        running_ids = list(self._running_for)
        forecasts = {}
        try:
            self._policies = await self.metadata.tenant_policies()
            forecasts = await self.metadata.forecasts(running_ids)
        except StorageUnavailable as exc:  # decide on the policies last read; starts are projected without forecasts
            log.warning("executor.admission_without_database", error=str(exc))
        running = []
        for batch_id in running_ids:
            tenant, started = self._running_for[batch_id]
            forecast = forecasts.get(batch_id)
            running.append(Running(tenant, started, forecast.projected_end_at if forecast else None))
        return admission.plan(
            list(self._queue.values()),
            running,
            self.settings.max_concurrent_runners,
            self._policies,
            now,
            usage,
            fifo=self.settings.admission_order == "fifo",
        )

    async def _spawn(self, batch: Waiting) -> None:
        batch_id = batch.batch_id
        owner = f"{socket.gethostname()}-runner-{uuid.uuid4().hex[:12]}"
        env = {**os.environ, **self.settings.to_env(), PARENT_ENV: str(os.getpid()), OWNER_ENV: owner}
        command = [sys.executable, "-m", "batch_gateway.runner", "--batch-id", batch_id]
        reason = self._giving_up.get(batch_id)
        if reason is not None:
            command += ["--give-up", reason]
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for `serve` reaches the runners through `serve` alone
        )
        self._running[batch_id] = process
        self._running_for[batch_id] = (batch.tenant, time.time())
        log.info(
            "executor.runner_started",
            batch_id=batch_id,
            pid=process.pid,
            crashes=self._crashes.get(batch_id, (0, 0))[0],
            giving_up=reason is not None,
        )
        watcher = asyncio.create_task(self._watch(batch_id, process, owner))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, batch_id: str, process: asyncio.subprocess.Process, owner: str) -> None:
        code = await process.wait()
        self._running.pop(batch_id, None)
        self._running_for.pop(batch_id, None)
        self._wake.set()
        if code not in (EXIT_OK, EXIT_LEASE_HELD):
            # It may have died holding the lease (SIGKILL, OOM): it is gone for sure, so the next runner need not
            # wait the lease out.
            with contextlib.suppress(StorageUnavailable):
                await self.metadata.release_batch(batch_id, owner)
        if self._loop_task is not None and self._loop_task.done():
            return  # we are shutting down and stopped it ourselves
        giving_up = self._giving_up.pop(batch_id, None)
        crashed = code not in (EXIT_OK, EXIT_LEASE_HELD, EXIT_RETRY_LATER)  # an error, or killed by a signal
        if not crashed or giving_up is not None:
            self._finished.add(batch_id)
            if code == EXIT_OK:
                self._crashes.pop(batch_id, None)
            log.info("executor.runner_exited", batch_id=batch_id, exit_code=code)
            if crashed:  # even the runner giving up crashed: fail the batch without its files
                await self._fail_without_files(batch_id)
            return
        try:
            batch = await self.metadata.get_batch(batch_id, None)
        except StorageUnavailable as exc:
            self._finished.add(batch_id)  # the next reconcile pass starts it again once the database is back
            log.warning("executor.runner_crashed", batch_id=batch_id, error=str(exc))
            return
        if batch is None or batch.terminal:
            self._finished.add(batch_id)
            return
        # A runner that made progress since its last crash starts counting again: only crashing in place gives up.
        progress = batch.request_counts.completed + batch.request_counts.failed
        crashes, progress_then = self._crashes.get(batch_id, (0, -1))
        crashes = crashes + 1 if progress <= progress_then else 1
        self._crashes[batch_id] = (crashes, progress)
        give_up = crashes >= self.settings.runner_max_crashes
        if give_up:
            log.error("executor.runner_gave_up", batch_id=batch_id, crashes=crashes)
            self._giving_up[batch_id] = (
                f"The batch runner crashed {crashes} times in a row; see the server logs for this batch id. Every "
                "result it finished is in the output and error files."
            )
        delay = 0.0 if give_up else min(30.0, 2.0**crashes)
        log.warning("executor.runner_crashed", batch_id=batch_id, crashes=crashes, retry_in=delay)
        await asyncio.sleep(delay)
        await self.submit(batch_id, tenant=batch.tenant, model=batch.model, deadline=batch.expires_at)

    async def _fail_without_files(self, batch_id: str) -> None:
        log.error("executor.give_up_crashed", batch_id=batch_id)
        await end_unpublished(self.metadata, batch_id)
