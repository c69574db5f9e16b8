"""One runner runs one batch, start to finish, and can be killed and started again at any moment.

The pipeline: claim the batch (a lease, so two runners never run it together) → read and validate the input into a
work file → plan the order (prefix groups) → dispatch to the upstream under adaptive concurrency, checkpointing
results → finalise the output and error files → a terminal status. Cancel and expiry stop dispatch within a second;
results that finished are kept, and every line that did not run gets a `batch_cancelled` / `batch_expired` error line.

Storage that is down (the database, the object store, a full work disk) is waited for, phase by phase, with backoff:
every phase outside dispatch is idempotent, so a phase cut short by an outage simply runs again. A runner gives up
only after `--storage-retry-seconds`, and then exits as "retry later", its results kept in checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import msgspec
import numpy as np
import structlog

from batch_gateway import ids, tracing, wire
from batch_gateway.errors import StorageUnavailable
from batch_gateway.runner import metrics as runner_metrics
from batch_gateway.runner.board import LoadBoard
from batch_gateway.runner.catalog import UpstreamCatalog
from batch_gateway.runner.checkpoint import ERROR, OUTPUT, Checkpoints, Totals
from batch_gateway.runner.controller import ConcurrencyController
from batch_gateway.runner.deadline import DeadlineTracker
from batch_gateway.runner.dispatch import Dispatcher, Endpoint, RetryBudget
from batch_gateway.runner.exits import OWNER_ENV
from batch_gateway.runner.hints import Hints, hints_for, parse_hints
from batch_gateway.runner.ingest import Ingested, Limits, ingest, read_request
from batch_gateway.runner.patience import StorageGaveUp, WaitInterrupted, with_patience
from batch_gateway.runner.prefix import plan_order, shared_depths
from batch_gateway.runner.schedule import GroupScheduler
from batch_gateway.runner.upstream import UpstreamClient, endpoints_for, parse_upstreams, resolve_endpoints
from batch_gateway.services import Services
from batch_gateway.store.metadata import BatchRecord, FileRecord
from batch_gateway.store.objects import ObjectMissing, batch_prefix, file_key, run_stats_key

T = TypeVar("T")

WATCH_INTERVAL = 0.2  # how often the cancel signal and expiry are checked (the database: see _watch)
# Results not yet checkpointed (the object store is down) stay in memory; past this, dispatch waits for the store.
MAX_UNSAVED_BYTES = 64 * 1024 * 1024

_STOP_REASON_CODES = {
    "cancelled": ("batch_cancelled", "This request was not executed because the batch was cancelled."),
    "expired": ("batch_expired", "This request could not be executed before the completion window expired."),
    "failed": ("batch_failed", "This request was not executed because the batch failed; see the batch's errors."),
}
# The terminal status each way of ending gives, and the statuses it may be reached from.
_ENDINGS: dict[str, tuple[str, list[str]]] = {
    "completed": ("completed", ["finalizing"]),
    "cancelled": ("cancelled", ["cancelling"]),
    "expired": ("expired", ["in_progress", "finalizing"]),
    "failed": ("failed", sorted(wire.ACTIVE_STATUSES)),
}


class LeaseLost(Exception):
    """Another runner took the batch over; stop without touching it."""


class Interrupted(Exception):
    """The process was asked to stop (SIGTERM); results so far are checkpointed for the next runner."""


__all__ = ["BatchRunner", "Interrupted", "LeaseLost", "StorageGaveUp", "plan"]


class _CustomId(msgspec.Struct):
    custom_id: str


async def _no_model_problem(model: str) -> None:
    return None


def plan(ingested: Ingested, done: np.ndarray, prefix_ordering: bool, endpoints: int) -> GroupScheduler:
    """The scheduler for the lines without a result yet, in planned order. The prefix keys are needed for nothing
    else, so they are released here (ingested.keys becomes None): dispatch holds only the order and the index."""
    if prefix_ordering:
        assert ingested.keys is not None, "the prefix keys are released once planned"
        order = plan_order(ingested.keys)
        order = order[~done[order]]
        # One level of warm-up: each top-level group (depth 0 at its start) warms once. As 0/1 depths (1 byte a
        # request) rather than group ids (8).
        depths = np.minimum(shared_depths(ingested.keys, order), 1)
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
        self.totals = Totals()
        self.total = 0
        self._stop_reason: str | None = None
        self._dispatcher: Dispatcher | None = None
        self._catalog: UpstreamCatalog | None = None
        self._span = None  # this run's span while tracing is on (batch_gateway/tracing.py)
        self.run_summary: dict = {}

    # --- entry point ---------------------------------------------------------------------------

    async def run(self) -> str:
        """Run the batch to a terminal status and return it. Raises LeaseLost if another runner owns it."""
        return await self._claimed(self._traced(self._run_claimed))

    async def give_up(self, reason: str) -> str:
        """End the batch `failed` after its runners crashed for good, publishing every result they left in
        checkpoints and every other line as `batch_failed`. Raises LeaseLost if a live runner owns the batch."""
        return await self._claimed(self._traced(lambda batch: self._give_up_claimed(batch, reason)))

    def _traced(self, work: Callable[[BatchRecord], Awaitable[str]]) -> Callable[[BatchRecord], Awaitable[str]]:
        """`work` inside this run's span, when tracing is on."""

        async def traced(batch: BatchRecord) -> str:
            tracer = tracing.tracer()
            if tracer is None:
                return await work(batch)
            attributes = {
                tracing.BATCH_ID: self.batch_id,
                tracing.TENANT: batch.tenant,
                "batch_gateway.endpoint": batch.endpoint,
            }
            with tracer.start_as_current_span("batch.run", attributes=attributes) as span:
                self._span = span
                status = await work(batch)
                span.set_attribute("batch_gateway.status", status)
                return status

        return traced

    async def _claimed(self, work: Callable[[BatchRecord], Awaitable[str]]) -> str:
        batch = await self._patiently("read the batch", lambda: self.metadata.get_batch(self.batch_id, None))
        if batch is None:
            self.log.error("runner.batch_missing")
            return "missing"
        if batch.terminal:
            await self._cleanup(batch)
            self.log.info("runner.already_terminal", status=batch.status)
            return batch.status
        await self._claim()
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            # Read again under the lease: another runner may have finished the batch while this one waited.
            batch = await self._reload()
            if batch.terminal:
                await self._cleanup(batch)
                self.log.info("runner.already_terminal", status=batch.status)
                return batch.status
            return await work(batch)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat
            with contextlib.suppress(Exception):
                await self.metadata.release_batch(self.batch_id, self.owner)

    async def _claim(self) -> None:
        """Take the lease, waiting out a crashed runner's lease (bounded by the lease length)."""
        lease = self.settings.runner_lease_seconds
        deadline = time.monotonic() + lease + 5
        while not await self._patiently(
            "claim the batch", lambda: self.metadata.claim_batch(self.batch_id, self.owner, ids.now(), lease)
        ):
            if time.monotonic() > deadline:
                raise LeaseLost(f"batch {self.batch_id} is held by another runner")
            self.log.info("runner.waiting_for_lease")
            await asyncio.sleep(1.0)
        self.log.info("runner.claimed", owner=self.owner)

    async def _patiently(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """`operation`, retried while storage is unavailable (up to --storage-retry-seconds). A shutdown signal
        stops the waiting."""

        def interrupted() -> bool:
            return self._stop_reason == "shutdown"

        try:
            return await with_patience(
                what, operation, log=self.log, patience=self.settings.storage_retry_seconds, interrupted=interrupted
            )
        except WaitInterrupted as exc:
            raise Interrupted(f"batch {self.batch_id}: {exc}") from None

    async def _heartbeat(self) -> None:
        lease = self.settings.runner_lease_seconds
        while True:
            await asyncio.sleep(max(1.0, lease / 3))
            try:
                if not await self.metadata.renew_lease(self.batch_id, self.owner, ids.now(), lease):
                    self.log.error("runner.lease_lost")
                    self._stop("lease_lost")
                    return
            except StorageUnavailable as exc:
                self.log.warning("runner.lease_renew_failed", error=str(exc))

    # --- the pipeline --------------------------------------------------------------------------

    async def _run_claimed(self, batch: BatchRecord) -> str:
        routes = parse_upstreams(self.settings.upstream)
        try:
            ingested = await self._patiently("read the input file", lambda: self._ingest(batch, routes))
        except ObjectMissing:
            return await self._patiently(
                "fail the batch",
                lambda: self._fail(
                    batch,
                    [
                        wire.BatchError(
                            "invalid_request", f"Cannot find file {batch.input_file_id}.", "input_file_id", None
                        )
                    ],
                ),
            )
        self.total = ingested.count

        if batch.status == "validating":
            if ingested.errors:
                return await self._patiently("fail the batch", lambda: self._fail(batch, ingested.errors))
            moved = await self._patiently(
                "start the batch",
                lambda: self.metadata.transition(
                    self.batch_id,
                    ["validating"],
                    "in_progress",
                    ids.now(),
                    model=ingested.model,
                    request_counts=wire.RequestCounts(total=ingested.count),
                ),
            )
            batch = moved or await self._reload()
        if batch.status == "cancelling" and ingested.errors:
            # Cancelled while a bad file was being validated: no line can run, and the errors say why.
            return await self._patiently(
                "end the batch", lambda: self._end(batch, "cancelled", ["cancelling"], {"errors": ingested.errors})
            )

        checkpoints = Checkpoints(self.services.objects, batch_prefix(batch.tenant, self.batch_id), self.owner)
        done, self.totals = await self._patiently("read the checkpoints", lambda: checkpoints.load(ingested.count))
        self.log.info("runner.resumed" if done.any() else "runner.starting", already_done=int(done.sum()))

        if batch.status == "in_progress" and ids.now() >= batch.expires_at:
            reason = "expired"
        elif batch.status == "in_progress" and not done.all():
            reason = await self._dispatch(batch, ingested, done, checkpoints, routes)
        else:
            # Cancelled before it ran (every line ends as `batch_cancelled`), or every line already has a result.
            reason = {"cancelling": "cancelled"}.get(batch.status, "completed")
        if reason == "lease_lost":
            raise LeaseLost(f"batch {self.batch_id} was taken over by another runner")
        if reason == "shutdown":
            raise Interrupted(f"batch {self.batch_id}: stopped by a signal; results so far are checkpointed")
        return await self._patiently("finalise the batch", lambda: self._finalize(batch, ingested, checkpoints, reason))

    async def _ingest(self, batch: BatchRecord, routes: dict[str, list[str]]) -> Ingested:
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
                (lambda model: self._upstreams(routes).model_problem(model, batch.endpoint))
                if batch.status == "validating"
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

    def _upstreams(self, routes: dict[str, list[str]]) -> UpstreamCatalog:
        """What the upstreams serve, asked once per run (validation and dispatch share the answers)."""
        if self._catalog is None:
            self._catalog = UpstreamCatalog(routes, api_key=self.settings.upstream_api_key or None)
        return self._catalog

    async def _give_up_claimed(self, batch: BatchRecord, reason: str) -> str:
        error = wire.BatchError("runner_failed", reason)
        routes = parse_upstreams(self.settings.upstream)
        try:
            ingested = await self._patiently("read the input file", lambda: self._ingest(batch, routes))
        except ObjectMissing:
            ingested = None
        if ingested is None or ingested.errors or batch.status == "validating":
            # Nothing ran: the batch fails with the reason (and the input's own errors, if any).
            errors = [*(ingested.errors if ingested else []), error]
            return await self._patiently(
                "end the batch", lambda: self._end(batch, "failed", _ENDINGS["failed"][1], {"errors": errors})
            )
        self.total = ingested.count
        checkpoints = Checkpoints(self.services.objects, batch_prefix(batch.tenant, self.batch_id), self.owner)
        self.log.warning("runner.giving_up", reason=reason)
        return await self._patiently(
            "finalise the batch", lambda: self._finalize(batch, ingested, checkpoints, "failed", errors=[error])
        )

    async def _dispatch(
        self,
        batch: BatchRecord,
        ingested: Ingested,
        done: np.ndarray,
        checkpoints: Checkpoints,
        routes: dict[str, list[str]],
    ) -> str:
        """Send every line without a durable result. Returns why dispatch ended: completed, cancelled, expired."""
        model = ingested.model or ""
        urls = await self._upstreams(routes).usable(
            model, batch.endpoint, await resolve_endpoints(endpoints_for(routes, model))
        )
        scheduler = plan(ingested, done, self.settings.prefix_ordering, endpoints=len(urls))
        settings = self.settings
        endpoints = [
            Endpoint(
                url,
                ConcurrencyController(
                    initial=settings.initial_concurrency,
                    maximum=settings.max_concurrency,
                    fixed=settings.fixed_concurrency or None,
                    slowdown=settings.interactive_slowdown,
                ),
                name=f"endpoint-{index}",
            )
            for index, url in enumerate(urls)
        ]
        board = LoadBoard(self.metadata, self.owner, self.log, tenant=batch.tenant)
        async with UpstreamClient(api_key=settings.upstream_api_key) as client:
            client.tracing = tracing.upstream_tracing(
                self._span,
                settings.trace_upstream_sample_ratio,
                {tracing.BATCH_ID: self.batch_id, tracing.TENANT: batch.tenant},
            )

            def on_result(line: int, kind: int, usage, result_line: bytes) -> None:
                checkpoints.add(line, kind, usage, result_line)
                self.totals.add(kind, usage)

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
                hints=self._hints(batch, ingested.model or ""),
                preempt=settings.preempt,
                deadline=DeadlineTracker(self.metadata, batch, self.log, shares=settings.deadline_shares),
            )
            self._dispatcher = dispatcher
            dispatch_started = time.monotonic()
            self.log.info("runner.dispatching", endpoints=urls, pending=scheduler.total)
            watcher = asyncio.create_task(self._watch(batch, checkpoints))
            try:
                await dispatcher.run()
            finally:
                if self._stop_reason:
                    await dispatcher.abort(self.settings.cancel_grace)
                else:
                    await dispatcher.abort(0)
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
                await board.withdraw()
        await self._flush(checkpoints)
        now = time.monotonic()
        # Shown to the tenant (run_stats): endpoint names, never addresses, and nothing about this host.
        self.run_summary = {
            "dispatch_seconds": round(now - dispatch_started, 3),
            "requests_sent_this_run": scheduler.total,
            "resumed_with_done": int(done.sum()),
            "retries": dispatcher.retries,
            "preempted": dispatcher.preempted,
            "preempted_tokens_estimate": round(dispatcher.preempted_tokens),
            "ended": self._stop_reason or "completed",
            "deadline": dispatcher.deadline.summary() if dispatcher.deadline else None,
            "endpoints": {
                ep.name: {**ep.controller.snapshot(), "upstream_unavailable": ep.circuit.snapshot(now)}
                for ep in endpoints
            },
        }
        self.log.info(
            "runner.dispatch_ended",
            **{k: v for k, v in self.run_summary.items() if k != "endpoints"},
            endpoints=dict(zip([ep.name for ep in endpoints], urls)),
            limits=[ep.controller.limit for ep in endpoints],
        )
        return self._stop_reason or "completed"

    def _hints(self, batch: BatchRecord, model: str) -> Callable[[bytes], tuple[bytes, dict[str, str]]] | None:
        """Priority hints for the batch's requests, where the operator asked for them (`--priority-hints`)."""
        hints = hints_for(parse_hints(self.settings.priority_hints), model)
        if hints == Hints():
            return None
        return lambda body: hints.apply(body, tenant=batch.tenant, expires_at=batch.expires_at)

    def shutdown(self) -> bool:
        """Stop dispatching for a process shutdown; False if dispatch has not started (nothing to save)."""
        if self._dispatcher is None:
            return False
        self._stop("shutdown")
        return True

    def _stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
            self.log.info("runner.stopping", reason=reason)
        if self._dispatcher is not None:
            self._dispatcher.stop()

    async def _watch(self, batch: BatchRecord, checkpoints: Checkpoints) -> None:
        """Checkpoints, live progress, cancel and expiry, while dispatch runs."""
        signals = self.services.signals
        last_db = last_checkpoint = time.monotonic()
        while True:
            # With Valkey up, progress and cancels travel there; the database is the fallback, polled faster.
            db_interval = 5.0 if signals.state == "ok" else 1.0
            await asyncio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            counts = self._counts()
            usage = self.totals.usage
            if usage.input_tokens:
                runner_metrics.PREFIX_HIT_RATE.set(usage.input_tokens_details.cached_tokens / usage.input_tokens)
            await signals.publish_progress(self.batch_id, counts, usage)
            if await signals.cancel_requested(self.batch_id):
                self._stop("cancelled")
            if ids.now() >= batch.expires_at:
                self._stop("expired")
            if now - last_checkpoint >= self.settings.checkpoint_interval:
                last_checkpoint = now
                await self._flush(checkpoints)
            if now - last_db >= db_interval:
                last_db = now
                try:
                    await self.metadata.save_progress(self.batch_id, counts, self.totals.usage)
                    current = await self.metadata.get_batch(self.batch_id, None)
                except StorageUnavailable as exc:
                    self.log.warning("runner.database_unavailable", error=str(exc))
                    continue
                if current is not None and current.status == "cancelling":
                    self._stop("cancelled")

    async def _flush(self, checkpoints: Checkpoints) -> None:
        try:
            await checkpoints.flush()
        except StorageUnavailable as exc:
            # The results stay buffered and go out with the next flush.
            self.log.warning("runner.checkpoint_failed", error=str(exc), pending=checkpoints.pending)

    # --- finishing -----------------------------------------------------------------------------

    async def _finalize(
        self,
        batch: BatchRecord,
        ingested: Ingested,
        checkpoints: Checkpoints,
        reason: str,
        errors: list[wire.BatchError] | None = None,
    ) -> str:
        """Write the output and error files and end the batch. Idempotent (file ids derive from the batch id, every
        status change is a compare-and-set), so it is simply run again after a storage outage."""
        await checkpoints.flush()
        if reason == "completed":
            moved = await self.metadata.transition(self.batch_id, ["in_progress"], "finalizing", ids.now())
            batch = moved or await self._reload()
            if batch.status == "cancelling":
                reason = "cancelled"
            elif batch.status != "finalizing":
                self.log.warning("runner.unexpected_status", status=batch.status)
                return batch.status
        done, totals = await checkpoints.load(ingested.count)
        missing = int((~done).sum())
        if reason == "completed" and missing:
            raise RuntimeError(f"{missing} lines have no result; refusing to complete the batch")
        code = _STOP_REASON_CODES.get(reason)
        failed = totals.failed + (missing if code else 0)

        output_id = error_id = None
        now = ids.now()
        ttl = batch.output_expires_after  # as at OpenAI, results are kept until deleted unless the batch said otherwise
        if totals.completed:
            output_id = ids.result_file_id(self.batch_id, "output")
            size = await checkpoints.write_file(file_key(batch.tenant, output_id), OUTPUT, ingested.count)
            await self._record_file(batch, output_id, "output", size, now, ttl)
        if failed:
            error_id = ids.result_file_id(self.batch_id, "error")
            extra = self._unfinished_lines(ingested, done, *code) if code else None
            size = await checkpoints.write_file(file_key(batch.tenant, error_id), ERROR, ingested.count, extra)
            await self._record_file(batch, error_id, "error", size, now, ttl)

        changes: dict = {
            "output_file_id": output_id,
            "error_file_id": error_id,
            "request_counts": wire.RequestCounts(total=ingested.count, completed=totals.completed, failed=failed),
            "usage": totals.usage,
        }
        if errors:
            changes["errors"] = errors
        terminal, sources = _ENDINGS[reason]
        status = await self._end(batch, terminal, sources, changes)
        await self._save_run_summary(batch, totals)
        await checkpoints.delete()
        shutil.rmtree(ingested.path.parent, ignore_errors=True)
        return status

    async def _end(self, batch: BatchRecord, status: str, sources: list[str], changes: dict) -> str:
        moved = await self.metadata.transition(self.batch_id, sources, status, ids.now(), **changes)
        if moved is None and status == "completed":
            # Cancelled while finalising: the cancel wins, with the same files.
            moved = await self.metadata.transition(self.batch_id, ["cancelling"], "cancelled", ids.now(), **changes)
        if moved is None and status == "expired":
            moved = await self.metadata.transition(self.batch_id, ["cancelling"], "cancelled", ids.now(), **changes)
        final = moved or await self._reload()
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

    async def _fail(self, batch: BatchRecord, errors: list[wire.BatchError]) -> str:
        moved = await self.metadata.transition(self.batch_id, ["validating"], "failed", ids.now(), errors=errors)
        if moved is None:
            current = await self._reload()
            if current.status == "cancelling":
                return await self._end(current, "cancelled", ["cancelling"], {"errors": errors})
            return current.status
        self.log.info("runner.validation_failed", errors=len(errors), first=errors[0].message if errors else None)
        shutil.rmtree(self.settings.work_path / self.batch_id, ignore_errors=True)
        return "failed"

    async def _save_run_summary(self, batch: BatchRecord, totals: Totals) -> None:
        """The run's final figures, kept beside the batch (GET /v1/batches/{id}/run_stats)."""
        usage = totals.usage
        summary = {
            **self.run_summary,
            "completed": totals.completed,
            "failed": totals.failed,
            "prefix_cache_hit_rate": usage.input_tokens_details.cached_tokens / usage.input_tokens
            if usage.input_tokens
            else None,
        }
        try:
            await self.services.objects.put_bytes(
                run_stats_key(batch.tenant, self.batch_id), msgspec.json.encode(summary)
            )
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

    async def _cleanup(self, batch: BatchRecord) -> None:
        """A terminal batch keeps no checkpoints or work files (a runner may have died right after finishing)."""
        await self.services.objects.delete_prefix(batch_prefix(batch.tenant, self.batch_id) + "/parts/")
        shutil.rmtree(self.settings.work_path / self.batch_id, ignore_errors=True)

    async def _reload(self) -> BatchRecord:
        batch = await self._patiently("read the batch", lambda: self.metadata.get_batch(self.batch_id, None))
        if batch is None:
            raise RuntimeError(f"batch {self.batch_id} vanished from the database")
        return batch

    def _counts(self) -> wire.RequestCounts:
        return wire.RequestCounts(total=self.total, completed=self.totals.completed, failed=self.totals.failed)
