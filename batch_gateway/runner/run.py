"""One runner runs one batch, start to finish, and can be killed and started again at any moment.

The pipeline: claim the batch (`lease.py`, so two runners never run it together) → read and validate the input into a
work file → plan the order (prefix groups) → dispatch to the upstream under adaptive concurrency, checkpointing
results, while `watch.py` watches for cancel and expiry → finalise the output and error files and end the batch
(`finalise.py`). Cancel and expiry stop dispatch within a second; results that finished are kept, and every line that
did not run gets a `batch_cancelled` / `batch_expired` error line.

Storage that is down (the database, the object store, a full work disk) is waited for, phase by phase, with backoff:
every phase outside dispatch is idempotent, so a phase cut short by an outage simply runs again. A runner gives up
only after `--storage-retry-seconds`, and then exits as "retry later", its results kept in checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np
import structlog

from batch_gateway import ids, tracing, wire
from batch_gateway.runner.board import LoadBoard
from batch_gateway.runner.checkpoint import Checkpoints
from batch_gateway.runner.controller import ConcurrencyController
from batch_gateway.runner.deadline import DeadlineTracker
from batch_gateway.runner.dispatch import Dispatcher, Endpoint, RetryBudget
from batch_gateway.runner.exits import OWNER_ENV
from batch_gateway.runner.finalise import ENDINGS, Finaliser
from batch_gateway.runner.hints import Hints, hints_for, parse_hints
from batch_gateway.runner.ingest import Ingested, Limits, ingest
from batch_gateway.runner.lease import Lease, LeaseLost
from batch_gateway.runner.patience import Interrupted, Patience
from batch_gateway.runner.prefix import plan_order, shared_depths
from batch_gateway.runner.run_stats import DispatchStats
from batch_gateway.runner.schedule import GroupScheduler
from batch_gateway.runner.stop import Stop, StopReason
from batch_gateway.runner.upstream import UpstreamClient
from batch_gateway.runner.watch import Progress, Watch, flush
from batch_gateway.services import Services
from batch_gateway.store.metadata import BatchRecord
from batch_gateway.store.objects import ObjectMissing, batch_prefix, file_key
from batch_gateway.store.parts import ResultKind
from batch_gateway.upstreams.catalog import UpstreamCatalog
from batch_gateway.upstreams.routes import endpoints_for, parse_upstreams, resolve_endpoints
from batch_gateway.wire import BatchStatus

if TYPE_CHECKING:
    from opentelemetry.trace import Span

# Results not yet checkpointed (the object store is down) stay in memory; past this, dispatch waits for the store.
MAX_UNSAVED_BYTES = 64 * 1024 * 1024

# Work done under the lease, on the batch as read under it, within this run's span (None while tracing is off).
Work = Callable[[BatchRecord, "Span | None"], Awaitable[BatchStatus]]


async def _no_model_problem(model: str) -> None:
    return None


def plan(ingested: Ingested, done: np.ndarray, prefix_ordering: bool, endpoints: int) -> GroupScheduler:
    """The scheduler for the lines without a result yet, in planned order. The prefix keys are needed for nothing
    else, so they are released here (ingested.keys becomes None): dispatch holds only the order and the index."""
    if prefix_ordering:
        assert ingested.keys is not None, "the prefix keys are released once planned"
        order = plan_order(ingested.keys)
        order = order[~done[order]]
        # Every level of the prefix tree warms once, and the prefix window counts each shared block once.
        depths = shared_depths(ingested.keys, order)
    else:  # input order, every request its own group (no warm-up holds)
        order = np.flatnonzero(~done)
        depths = np.zeros(len(order), dtype=np.uint8)
    ingested.keys = None
    return GroupScheduler(order, endpoints=endpoints, depths=depths)


class BatchRunner:
    def __init__(self, services: Services, batch_id: str) -> None:
        self.services = services
        self.settings = services.settings
        self.metadata = services.metadata
        self.batch_id = batch_id
        self.owner = os.environ.get(OWNER_ENV) or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.log = structlog.get_logger("runner").bind(batch_id=batch_id)
        self.stop = Stop(self.log)
        self.patiently = Patience(
            label=f"batch {batch_id}",
            log=self.log,
            seconds=self.settings.storage_retry_seconds,
            interrupted=lambda: self.stop.reason == StopReason.SHUTDOWN,  # a shutdown stops the waiting
        )
        self.lease = Lease(
            self.metadata,
            batch_id,
            self.owner,
            seconds=self.settings.runner_lease_seconds,
            log=self.log,
            on_lost=lambda: self.stop(StopReason.LEASE_LOST),
        )
        self.finaliser = Finaliser(services, batch_id, self.log, self._reload)

    # --- entry points --------------------------------------------------------------------------

    async def run(self) -> BatchStatus | None:
        """Run the batch to a terminal status and return it (None: the batch does not exist). Raises LeaseLost if
        another runner owns it."""
        return await self._claimed(self._run_claimed)

    async def give_up(self, reason: str) -> BatchStatus | None:
        """End the batch `failed` after its runners crashed for good, publishing every result they left in
        checkpoints and every other line as `batch_failed` (`cancelled` and `batch_cancelled`, if its tenant cancelled
        it). Raises LeaseLost if a live runner owns the batch."""
        return await self._claimed(lambda batch, span: self._give_up_claimed(batch, reason))

    def shutdown(self) -> bool:
        """Stop dispatching for a process shutdown; False if dispatch has not started (nothing to save)."""
        if not self.stop.dispatch_started:
            return False
        self.stop(StopReason.SHUTDOWN)
        return True

    async def _claimed(self, work: Work) -> BatchStatus | None:
        batch = await self.patiently("read the batch", lambda: self.metadata.get_batch(self.batch_id, None))
        if batch is None:
            self.log.error("runner.batch_missing")
            return None
        if batch.terminal:
            return await self._already_ended(batch)
        async with self.lease.held(self.patiently):
            # Read again under the lease: another runner may have finished the batch while this one waited.
            batch = await self._reload()
            if batch.terminal:
                return await self._already_ended(batch)
            return await self._traced(work, batch)

    async def _already_ended(self, batch: BatchRecord) -> BatchStatus:
        await self.finaliser.cleanup(batch)
        self.log.info("runner.already_terminal", status=batch.status)
        return batch.status

    async def _traced(self, work: Work, batch: BatchRecord) -> BatchStatus:
        """`work` inside this run's span, when tracing is on."""
        tracer = tracing.tracer()
        if tracer is None:
            return await work(batch, None)
        attributes = {
            tracing.BATCH_ID: self.batch_id,
            tracing.TENANT: batch.tenant,
            "batch_gateway.endpoint": batch.endpoint,
        }
        with tracer.start_as_current_span("batch.run", attributes=attributes) as span:
            status = await work(batch, span)
            span.set_attribute("batch_gateway.status", status)
            return status

    # --- the pipeline --------------------------------------------------------------------------

    async def _run_claimed(self, batch: BatchRecord, span: Span | None) -> BatchStatus:
        catalog = self._catalog()
        try:
            ingested = await self.patiently("read the input file", lambda: self._ingest(batch, catalog))
        except ObjectMissing:
            error = wire.BatchError("invalid_request", f"Cannot find file {batch.input_file_id}.", "input_file_id")
            return await self.patiently("fail the batch", lambda: self.finaliser.fail_validation([error]))

        if batch.status == BatchStatus.VALIDATING:
            if ingested.errors:
                return await self.patiently("fail the batch", lambda: self.finaliser.fail_validation(ingested.errors))
            moved = await self.patiently(
                "start the batch",
                lambda: self.metadata.transition(
                    self.batch_id,
                    [BatchStatus.VALIDATING],
                    BatchStatus.IN_PROGRESS,
                    ids.now(),
                    model=ingested.model,
                    request_counts=wire.RequestCounts(total=ingested.count),
                ),
            )
            batch = moved or await self._reload()
        if batch.status == BatchStatus.CANCELLING and ingested.errors:
            # Cancelled while a bad file was being validated: no line can run, and the errors say why.
            return await self.patiently(
                "end the batch",
                lambda: self.finaliser.end(
                    BatchStatus.CANCELLED, [BatchStatus.CANCELLING], {"errors": ingested.errors}
                ),
            )

        checkpoints = self._checkpoints(batch)
        done, totals = await self.patiently("read the checkpoints", lambda: checkpoints.load(ingested.count))
        self.log.info("runner.resumed" if done.any() else "runner.starting", already_done=int(done.sum()))

        dispatch: DispatchStats | None = None
        if batch.status == BatchStatus.IN_PROGRESS and ids.now() >= batch.expires_at:
            reason = StopReason.EXPIRED
        elif batch.status == BatchStatus.IN_PROGRESS and not done.all():
            progress = Progress(ingested.count, totals)
            dispatch = await self._dispatch(batch, ingested, done, checkpoints, progress, catalog, span)
            reason = dispatch.ended
        else:
            # Cancelled before it ran (every line ends as `batch_cancelled`), or every line already has a result.
            reason = StopReason.CANCELLED if batch.status == BatchStatus.CANCELLING else StopReason.COMPLETED
        if reason == StopReason.LEASE_LOST:
            raise LeaseLost(f"batch {self.batch_id} was taken over by another runner")
        if reason == StopReason.SHUTDOWN:
            raise Interrupted(f"batch {self.batch_id}: stopped by a signal; results so far are checkpointed")
        return await self.patiently(
            "finalise the batch",
            lambda: self.finaliser.finalise(batch, ingested, checkpoints, reason, dispatch=dispatch),
        )

    async def _give_up_claimed(self, batch: BatchRecord, reason: str) -> BatchStatus:
        error = wire.BatchError("runner_failed", reason)
        catalog = self._catalog()
        try:
            ingested = await self.patiently("read the input file", lambda: self._ingest(batch, catalog))
        except ObjectMissing:
            ingested = None
        if ingested is None or ingested.errors or batch.status == BatchStatus.VALIDATING:
            # Nothing ran: the batch fails with the reason (and the input's own errors, if any).
            errors = [*(ingested.errors if ingested else []), error]
            return await self.patiently(
                "end the batch", lambda: self.finaliser.end(*ENDINGS[StopReason.FAILED], {"errors": errors})
            )
        checkpoints = self._checkpoints(batch)
        # A batch its tenant cancelled ends as asked: cancelled, its unfinished lines `batch_cancelled`.
        cancelled = batch.status == BatchStatus.CANCELLING
        self.log.warning("runner.giving_up", reason=reason, cancelled=cancelled)
        ending = StopReason.CANCELLED if cancelled else StopReason.FAILED
        return await self.patiently(
            "finalise the batch",
            lambda: self.finaliser.finalise(
                batch, ingested, checkpoints, ending, errors=None if cancelled else [error]
            ),
        )

    def _catalog(self) -> UpstreamCatalog:
        """What the upstreams serve, asked once per run (validation and dispatch share the answers)."""
        routes = parse_upstreams(self.settings.upstream)
        return UpstreamCatalog(routes, api_key=self.settings.upstream_api_key or None)

    def _checkpoints(self, batch: BatchRecord) -> Checkpoints:
        return Checkpoints(self.services.objects, batch_prefix(batch.tenant, self.batch_id), self.owner)

    async def _ingest(self, batch: BatchRecord, catalog: UpstreamCatalog) -> Ingested:
        """Stream the input into the work file and validate it; run again from the start after an outage."""
        chunks = await self.services.objects.stream(file_key(batch.tenant, batch.input_file_id))
        started = time.monotonic()
        ingested = await ingest(
            chunks,
            self.settings.work_path / self.batch_id / "input.jsonl",
            batch.endpoint,
            Limits(self.settings.max_requests_per_batch, self.settings.max_line_bytes),
            # Asked while validating only: what the upstreams say later must not undo a validated batch.
            check_model=(
                (lambda model: catalog.model_problem(model, batch.endpoint))
                if batch.status == BatchStatus.VALIDATING
                else _no_model_problem
            ),
        )
        self.log.info(
            "runner.ingested",
            requests=ingested.count,
            errors=len(ingested.errors),
            seconds=round(time.monotonic() - started, 3),
        )
        return ingested

    async def _dispatch(
        self,
        batch: BatchRecord,
        ingested: Ingested,
        done: np.ndarray,
        checkpoints: Checkpoints,
        progress: Progress,
        catalog: UpstreamCatalog,
        span: Span | None,
    ) -> DispatchStats:
        """Send every line without a durable result; the figures say why dispatch ended (`ended`)."""
        settings = self.settings
        model = ingested.model or ""
        urls = await catalog.usable(
            model, batch.endpoint, await resolve_endpoints(endpoints_for(catalog.routes, model))
        )
        scheduler = plan(ingested, done, settings.prefix_ordering, endpoints=len(urls))
        for index in range(len(urls)):
            scheduler.warm_up_heads(index, settings.prefix_ordering and settings.prefix_warm_up)
        endpoints = [
            Endpoint(
                url,
                ConcurrencyController(
                    initial=settings.initial_concurrency,
                    maximum=settings.max_concurrency,
                    fixed=settings.fixed_concurrency or None,
                    slowdown=settings.interactive_slowdown,
                    phase=random.random(),  # runners sharing an engine take their fractional extras at different times
                ),
                name=f"endpoint-{index}",
            )
            for index, url in enumerate(urls)
        ]
        board = LoadBoard(self.metadata, self.owner, self.log, tenant=batch.tenant)
        async with UpstreamClient(api_key=settings.upstream_api_key) as client:
            client.tracing = tracing.upstream_tracing(
                span,
                settings.trace_upstream_sample_ratio,
                {tracing.BATCH_ID: self.batch_id, tracing.TENANT: batch.tenant},
            )

            def on_result(line: int, kind: ResultKind, usage: wire.TokenUsage | None, result_line: bytes) -> None:
                checkpoints.add(line, kind, usage, result_line)
                progress.add(kind, usage)

            dispatcher = Dispatcher(
                batch_id=self.batch_id,
                path=batch.endpoint,
                ingested=ingested,
                endpoints=endpoints,
                scheduler=scheduler,
                client=client,
                sink=on_result,
                budget=RetryBudget(int((~done).sum()), settings.retry_budget),
                max_attempts=settings.max_attempts,
                request_timeout=settings.request_timeout,
                log=self.log,
                backlogged=lambda: checkpoints.pending_bytes > MAX_UNSAVED_BYTES,
                board=board,
                hints=self._hints(batch, model),
                preempt=settings.preempt,
                deadline=DeadlineTracker(self.metadata, batch, self.log, shares=settings.deadline_shares),
            )
            self.stop.dispatching(dispatcher)
            started = time.monotonic()
            self.log.info("runner.dispatching", endpoints=urls, pending=scheduler.total)
            watcher = asyncio.create_task(Watch(self.services, batch, checkpoints, progress, self.stop, self.log).run())
            try:
                await dispatcher.run()
            finally:
                await dispatcher.abort(settings.cancel_grace if self.stop.reason else 0)
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await board.withdraw()
        await flush(checkpoints, self.log)
        now = time.monotonic()
        stats = DispatchStats.of(
            dispatcher,
            endpoints,
            sent=scheduler.total,
            resumed_with_done=int(done.sum()),
            seconds=now - started,
            ended=self.stop.reason or StopReason.COMPLETED,
            deadline=dispatcher.deadline.summary() if dispatcher.deadline else None,
            now=now,
        )
        self.log.info(
            "runner.dispatch_ended",
            **stats.loggable(),
            endpoints=dict(zip([ep.name for ep in endpoints], urls, strict=True)),
            limits=[ep.controller.limit for ep in endpoints],
        )
        return stats

    def _hints(self, batch: BatchRecord, model: str) -> Callable[[bytes], tuple[bytes, dict[str, str]]] | None:
        """Priority hints for the batch's requests, where the operator asked for them (`--priority-hints`)."""
        hints = hints_for(parse_hints(self.settings.priority_hints), model)
        if hints == Hints():
            return None
        return lambda body: hints.apply(body, tenant=batch.tenant, expires_at=batch.expires_at)

    async def _reload(self) -> BatchRecord:
        batch = await self.patiently("read the batch", lambda: self.metadata.get_batch(self.batch_id, None))
        if batch is None:
            raise RuntimeError(f"batch {self.batch_id} vanished from the database")
        return batch
