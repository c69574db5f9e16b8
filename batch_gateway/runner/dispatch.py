"""Dispatch: send planned requests to the upstream endpoints, each behind its own adaptive concurrency limit.

Per endpoint, a loop takes a slot from the endpoint's limiter, asks the scheduler for the next line (prefix groups
stick to one endpoint), and sends that line's original bytes. What happens next depends on the answer
(`upstream.Outcome`):
- a 2xx, or a 4xx that says the request itself is bad: the line's result;
- "not now" (no connection, a reset, 429, 502-504): the endpoint's circuit opens (`circuit.py`) and the line waits,
  without using up its attempts, until that endpoint or another one answers again. Such a line fails only if the
  batch ends first (cancel, expiry);
- a 500, 408, 409 or a timeout: retried with jittered backoff, at most `max_attempts` times and within a per-batch
  retry budget, then reported with the upstream's answer.
A slot is never held while backing off or waiting for a circuit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import structlog

from batch_gateway import ids, wire
from batch_gateway.runner import metrics as runner_metrics
from batch_gateway.runner.board import LoadBoard
from batch_gateway.runner.circuit import Circuit
from batch_gateway.runner.controller import ConcurrencyController, Regime
from batch_gateway.runner.deadline import DeadlineTracker
from batch_gateway.runner.engine_metrics import EngineMeter, EngineSnapshot, stated_slots
from batch_gateway.runner.ingest import Ingested, read_request
from batch_gateway.runner.limiter import AdaptiveLimiter, Permit
from batch_gateway.runner.schedule import GroupScheduler
from batch_gateway.runner.share import RunnerLoad
from batch_gateway.runner.upstream import Exchange, Outcome, UpstreamClient, usage_of
from batch_gateway.runner.warm_up import warm_up_body
from batch_gateway.store.parts import ResultKind

# Called with (line, kind, usage, encoded result line) once a line has its final result.
ResultSink = Callable[[int, ResultKind, wire.TokenUsage | None, bytes], None]

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0
METRICS_INTERVAL = 0.5  # a batch yields to arriving users within about this plus one of its service times
METRICS_RETRY_INTERVAL = 10.0
# Before an endpoint's first request its gauges are read, for at most this long: once, or twice half a second apart
# when the first reading shows a sign of someone else that a second must confirm. A batch that starts beside users
# then starts within their budget, not at its initial limit (on llama.cpp, a new batch's first 8 requests held every
# slot for 5 s while users queued 8 deep).
FIRST_LOOK_SECONDS = 1.5
BACKLOG_POLL_SECONDS = 0.2
WARM_UP_MISSES = 3  # prefix warm-ups that fail in a row before an endpoint gets no more of them


class _Envelope(msgspec.Struct):
    custom_id: str
    body: msgspec.Raw  # forwarded byte for byte: large integers, key order and unicode survive untouched


_envelope_decoder = msgspec.json.Decoder(_Envelope)


class RetryBudget:
    """Retries a batch may spend in all, so that a dead upstream cannot stall it forever."""

    def __init__(self, requests: int, ratio: float) -> None:
        self.left = max(100, int(requests * ratio))

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


@dataclass(eq=False)  # hashed by identity: in-flight requests are kept per endpoint
class Endpoint:
    url: str
    controller: ConcurrencyController
    name: str = ""  # what tenants may see (run stats, error lines): never the address
    limiter: AdaptiveLimiter = field(init=False)
    circuit: Circuit = field(default_factory=Circuit)

    def __post_init__(self) -> None:
        self.limiter = AdaptiveLimiter(self.controller)
        self.name = self.name or self.url


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP) + random.uniform(0, 0.1)
    return min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


def json_object_or_none(body: bytes) -> bytes | None:
    stripped = body.strip()
    if stripped.startswith(b"{"):
        try:
            msgspec.json.decode(stripped)
            return stripped
        except (msgspec.DecodeError, RecursionError):
            return None
    return None


class Dispatcher:
    def __init__(
        self,
        *,
        batch_id: str,
        path: str,
        ingested: Ingested,
        endpoints: list[Endpoint],
        scheduler: GroupScheduler,
        client: UpstreamClient,
        sink: ResultSink,
        budget: RetryBudget,
        max_attempts: int,
        request_timeout: float,
        log: structlog.typing.FilteringBoundLogger,
        backlogged: Callable[[], bool] = lambda: False,
        board: LoadBoard | None = None,
        hints: Callable[[bytes], tuple[bytes, dict[str, str]]] | None = None,
        preempt: bool = False,
        deadline: DeadlineTracker | None = None,
    ) -> None:
        self.batch_id = batch_id
        self.path = path
        self.ingested = ingested
        self.endpoints = endpoints
        self.scheduler = scheduler
        self.client = client
        self.sink = sink
        self.budget = budget
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self.log = log
        self.backlogged = backlogged  # True while too many results are not durable yet: send nothing new
        self.board = board  # where runners sharing an endpoint see each other (None: this runner alone)
        self.hints = hints  # priority hints for the serving stack: (body) -> (body, extra headers)
        self.preempt = preempt  # abort in-flight requests beyond the limit while others use the engine
        self.deadline = deadline  # the batch's need by its deadline: its weight on the board, its forecast
        self.stopped = False
        self._wake = asyncio.Event()
        self._circuits_changed = asyncio.Event()  # replaced on every change: waiters hold the one they checked
        self._tasks: set[asyncio.Task] = set()
        self._fd = -1
        self._sends = 0
        self._flights: dict[Endpoint, dict[asyncio.Event, float]] = {}  # preemptable sends: signal -> started
        self.retries = 0
        self.preempted = 0
        self.preempted_tokens = 0.0  # estimated decode tokens the preempted requests had generated (wasted)
        self.warm_ups = 0  # prefix warm-ups sent (warm_up.py)...
        self.warm_ups_failed = 0  # ...and those that got no answer: their groups waited for their heads instead
        self._warm_up_misses: dict[Endpoint, int] = {}  # warm-ups failed in a row, per endpoint
        self._slots_asked: set[int] = set()  # endpoints asked for their slot count (by index)
        self._looked = [asyncio.Event() for _ in endpoints]  # per endpoint: its first reading is in (or none came)

    async def run(self) -> None:
        """Send every line the scheduler hands out; return when all have a result or `stop()` was called."""
        self._fd = os.open(self.ingested.path, os.O_RDONLY)
        pollers = [asyncio.create_task(self._poll_metrics(i, ep)) for i, ep in enumerate(self.endpoints)]
        try:
            await asyncio.gather(*(self._feed(i, ep) for i, ep in enumerate(self.endpoints)))
            while self._tasks and not self.stopped:
                await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for poller in pollers:
                poller.cancel()
            if self.deadline is not None:
                await self.deadline.close()

    def stop(self) -> None:
        """Send nothing more. In-flight requests finish or are cut by `abort`."""
        self.stopped = True
        self._wake.set()
        self._circuit_changed()

    async def abort(self, grace: float) -> None:
        """After `stop()`: give in-flight requests `grace` seconds to finish, then cancel them (those lines get no
        result here; the runner reports them as cancelled or expired)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------------------------------

    async def _feed(self, index: int, endpoint: Endpoint) -> None:
        # The engine's cache (the prefix window's size), whether it keeps a prefix cache per slot, and who else uses
        # it, before the first request: the first groups go out as the engine can hold them, and within users' budget.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._looked[index].wait(), FIRST_LOOK_SECONDS)
        while not self.stopped:
            if self.backlogged():  # the object store is down: results pile up in memory, so wait for it
                await asyncio.sleep(BACKLOG_POLL_SECONDS)
                continue
            probe = await self._until_admitted(endpoint)
            if probe is None:
                return
            permit = await endpoint.limiter.acquire()
            line = self.scheduler.next_ready(index)
            if line is None or self.stopped:
                permit.release()
                if probe:
                    endpoint.circuit.abandon_probe(time.monotonic())
                if line is not None or self.scheduler.done:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            task = asyncio.create_task(self._request(endpoint, permit, line, probe))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _until_admitted(self, endpoint: Endpoint) -> bool | None:
        """Wait until `endpoint` may be sent to: False when its circuit is closed, True when this send is the probe
        of an open circuit, None if dispatch stopped meanwhile."""
        while not self.stopped:
            changed = self._circuits_changed
            now = time.monotonic()
            if endpoint.circuit.closed:
                return False
            if endpoint.circuit.try_probe(now):
                return True
            await self._wait_for_circuits(changed, endpoint.circuit.seconds_to_probe(now))
        return None

    async def _admission(self, preferred: Endpoint) -> tuple[Endpoint, bool] | None:
        """Where a line that met "not now" goes next: its endpoint once closed, any other closed one meanwhile, or
        its endpoint's probe. None if dispatch stopped meanwhile."""
        while not self.stopped:
            changed = self._circuits_changed
            now = time.monotonic()
            for endpoint in (preferred, *self.endpoints):
                if endpoint.circuit.closed:
                    return endpoint, False
            if preferred.circuit.try_probe(now):
                return preferred, True
            await self._wait_for_circuits(changed, preferred.circuit.seconds_to_probe(now))
        return None

    async def _wait_for_circuits(self, changed: asyncio.Event, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    def _circuit_changed(self) -> None:
        self._circuits_changed.set()
        self._circuits_changed = asyncio.Event()

    async def _request(self, endpoint: Endpoint, permit: Permit | None, line: int, probe: bool) -> None:
        raw = read_request(self.ingested, self._fd, line)
        envelope = _envelope_decoder.decode(raw)
        body = bytes(envelope.body)
        attempt = 1
        try:
            if self.scheduler.warming(line):
                await self._warm_up(endpoint, line, body, probe)
                if self.stopped:
                    return  # the line gets no result here (cancelled, expired or resumed later)
            while True:
                if permit is None:
                    admitted = await self._admission(endpoint)
                    if admitted is None:
                        return  # stopped: the line gets no result here (cancelled, expired or resumed later)
                    endpoint, probe = admitted
                    permit = await endpoint.limiter.acquire()
                    if self.stopped:
                        if probe:
                            endpoint.circuit.abandon_probe(time.monotonic())
                        return
                self._sends += 1
                send = self._sends
                epoch = endpoint.controller.on_send(time.monotonic())
                runner_metrics.INFLIGHT.inc()
                try:
                    exchange = await self._send(endpoint, body)
                except BaseException:
                    if probe:
                        endpoint.circuit.abandon_probe(time.monotonic())
                    raise
                finally:
                    runner_metrics.INFLIGHT.dec()
                permit.release()
                permit = None
                if exchange is None:  # preempted: others need the engine now; the line goes again later
                    endpoint.controller.on_other(time.monotonic(), epoch=epoch)
                    if probe:
                        endpoint.circuit.abandon_probe(time.monotonic())
                    probe = False
                    continue
                outcome = exchange.outcome
                usage = usage_of(exchange.body) if outcome is Outcome.OK else None
                self._feedback(endpoint, exchange, outcome, usage, epoch, send, probe)
                probe = False
                if outcome is Outcome.UNAVAILABLE:
                    if self.stopped:
                        return
                    continue  # wait for an endpoint; "not now" uses up no attempts
                if (
                    outcome is Outcome.FAILED
                    and attempt < self.max_attempts
                    and not self.stopped
                    and self.budget.take()
                ):
                    self.retries += 1
                    runner_metrics.RETRIES.inc()
                    await asyncio.sleep(backoff_delay(attempt, exchange.retry_after))
                    attempt += 1
                    if self.stopped:
                        return
                    continue
                self._finish(line, envelope.custom_id, exchange, usage)
                return
        finally:
            if permit is not None:
                permit.release()
            self._wake.set()

    async def _warm_up(self, endpoint: Endpoint, line: int, body: bytes, probe: bool) -> None:
        """Send the one-token copy of a group's head (warm_up.py), once, in the head's slot; its followers may go
        when it is answered. A probe of an open circuit goes as itself: its answer must be the line's."""
        warm = None if probe else warm_up_body(self.path, body)
        usage = None
        if warm is not None:
            self.warm_ups += 1
            endpoint.controller.on_send(time.monotonic())
            runner_metrics.INFLIGHT.inc()
            try:
                exchange = await self._send(endpoint, warm)
            finally:
                runner_metrics.INFLIGHT.dec()
            if exchange is not None and exchange.outcome is Outcome.OK:
                usage = usage_of(exchange.body)
                self._warm_up_misses[endpoint] = 0
            else:
                self.warm_ups_failed += 1
                self._warm_up_misses[endpoint] = misses = self._warm_up_misses.get(endpoint, 0) + 1
                if misses == WARM_UP_MISSES:  # the engine rejects the copies, or is failing: stop adding to it
                    self.scheduler.warm_up_heads(self.endpoints.index(endpoint), False)
                    self.log.warning(
                        "runner.prefix_warm_ups_stopped",
                        endpoint=endpoint.name,
                        status=exchange.status if exchange is not None else None,
                        note="groups' followers wait for their heads instead",
                    )
            endpoint.controller.on_warm_up(time.monotonic(), answered=usage is not None)
        if usage is None:
            self.scheduler.on_warmed(line, False)
            return
        self.scheduler.on_warmed(line, True, usage.prompt_tokens, usage.cached_tokens)
        self._wake.set()  # its followers may go

    async def _send(self, endpoint: Endpoint, body: bytes) -> Exchange | None:
        """One attempt; None if it was preempted (only with `preempt`)."""
        headers = None
        if self.hints is not None:
            body, headers = self.hints(body)
        post = self.client.post(endpoint.url, self.path, body, self.request_timeout, headers=headers)
        if not self.preempt:
            return await post
        signal = asyncio.Event()
        flights = self._flights.setdefault(endpoint, {})
        flights[signal] = time.monotonic()
        sending = asyncio.ensure_future(post)
        waiting = asyncio.ensure_future(signal.wait())
        try:
            await asyncio.wait((sending, waiting), return_when=asyncio.FIRST_COMPLETED)
        finally:
            flights.pop(signal, None)
            waiting.cancel()
            if not sending.done():
                sending.cancel()  # closes the connection: the engine aborts the request and frees its slot
        if sending.cancelled() or not sending.done():
            return None
        return sending.result()

    def _preempt(self, endpoint: Endpoint, count: int) -> None:
        """Abort the `count` youngest requests in flight on `endpoint`: they have the least work to lose."""
        flights = self._flights.get(endpoint, {})
        now = time.monotonic()
        step = endpoint.controller.step_seconds
        for signal, started in sorted(flights.items(), key=lambda item: item[1], reverse=True)[:count]:
            signal.set()
            self.preempted += 1
            if step:
                self.preempted_tokens += (now - started) / step
        if count:
            runner_metrics.PREEMPTED.inc(min(count, len(flights)))

    def _feedback(
        self,
        endpoint: Endpoint,
        exchange: Exchange,
        outcome: Outcome,
        usage: wire.TokenUsage | None,
        epoch: int,
        send: int,
        probe: bool,
    ) -> None:
        """Close the send with exactly one controller event, and tell the endpoint's circuit."""
        now = time.monotonic()
        controller = endpoint.controller
        circuit = endpoint.circuit
        was_closed = circuit.closed
        if outcome is Outcome.UNAVAILABLE:
            circuit.on_unavailable(now, send=send, probe=probe, retry_after=exchange.retry_after)
        else:
            circuit.on_answer(now, send=send)
        if circuit.closed != was_closed:
            self._circuit_changed()
            runner_metrics.CIRCUIT_OPEN.labels(endpoint=endpoint.name).set(0 if circuit.closed else 1)
            if circuit.closed:
                self.log.info("runner.upstream_back", endpoint=endpoint.name, **circuit.snapshot(now))
            else:
                self.log.warning(
                    "runner.upstream_unavailable",
                    endpoint=endpoint.name,
                    status=exchange.status,
                    failure=exchange.failure,
                    note="lines wait for the endpoint; they fail only if the batch ends first",
                )
        if outcome is Outcome.OK and usage is not None:
            controller.on_success(
                now,
                latency=exchange.latency,
                output_tokens=usage.completion_tokens,
                prompt_tokens=usage.prompt_tokens,
                cached_tokens=usage.cached_tokens,
                epoch=epoch,
            )
        elif exchange.status in (429, 503):
            controller.on_backpressure(now, epoch=epoch, kind=str(exchange.status))
        elif exchange.timed_out:
            controller.on_backpressure(now, epoch=epoch, kind="timeout")
        else:
            # A 4xx, a 500 for a broken request, or no connection at all (the circuit's business): says nothing
            # about how loaded the engine is.
            controller.on_other(now, epoch=epoch)
        endpoint.limiter.poke()
        runner_metrics.LIMIT.labels(endpoint=endpoint.name).set(controller.limit)
        if usage is not None:
            runner_metrics.TOKENS.labels("prompt").inc(usage.prompt_tokens)
            runner_metrics.TOKENS.labels("cached").inc(usage.cached_tokens)
            runner_metrics.TOKENS.labels("completion").inc(usage.completion_tokens)

    def _weight(self, controller: ConcurrencyController, endpoint: Endpoint) -> float:
        """The weight this runner takes the endpoint's batch share with: by its deadline's need (`deadline.py`)."""
        if self.deadline is None:
            return 1.0
        now = time.time()
        remaining = self.scheduler.pending + self.scheduler.inflight
        self.deadline.progress(now, self.scheduler.total - remaining, remaining)
        return self.deadline.weight(
            now,
            remaining=controller.inflight + math.ceil(self.scheduler.pending / len(self.endpoints)),
            service_time=controller.service_time,
            limit=controller.limit,
            peers=self.board.peers(endpoint.url) if self.board is not None else [],
            capacity=controller.capacity,
        )

    def _finish(self, line: int, custom_id: str, exchange: Exchange, usage: wire.TokenUsage | None) -> None:
        line_id = ids.request_line_id(self.batch_id, line)
        body = json_object_or_none(exchange.body) if exchange.status else None
        if exchange.ok and body is not None:
            kind = ResultKind.OUTPUT
            result = wire.ResultLine(
                id=line_id,
                custom_id=custom_id,
                response=wire.LineResponse(exchange.status, exchange.request_id, msgspec.Raw(body)),
                error=None,
            )
        elif exchange.status:
            kind = ResultKind.ERROR
            if body is None or exchange.ok:
                # Not a JSON object (a proxy's HTML error page, say): the line stays valid JSON, and the page, which
                # may name internal hosts, goes to the operator's log rather than to the tenant.
                self.log.warning(
                    "runner.upstream_non_json",
                    status=exchange.status,
                    request_id=exchange.request_id,
                    body=exchange.body[:2000].decode("utf-8", "replace"),
                )
                message = (
                    f"The model server answered {exchange.status} with a body that is not a JSON object "
                    f"({len(exchange.body)} bytes); the gateway's logs have it under request id {exchange.request_id}."
                )
                body = msgspec.json.encode(
                    {"error": {"message": message, "type": "upstream_error", "param": None, "code": None}}
                )
            result = wire.ResultLine(
                id=line_id,
                custom_id=custom_id,
                response=wire.LineResponse(exchange.status, exchange.request_id, msgspec.Raw(body)),
                error=None,
            )
        else:
            kind = ResultKind.ERROR
            result = wire.ResultLine(
                id=line_id,
                custom_id=custom_id,
                response=None,
                error=wire.LineError(
                    code="request_timeout" if exchange.timed_out else "upstream_unreachable",
                    message=f"The request got no response from the model server after {self.max_attempts} attempts "
                    f"({exchange.failure}).",
                ),
            )
        if (
            kind == ResultKind.OUTPUT and usage is not None
        ):  # the prefix window learns from what the answer found cached
            self.scheduler.on_finished(line, True, usage.prompt_tokens, usage.cached_tokens)
        else:
            self.scheduler.on_finished(line, False)
        runner_metrics.REQUESTS.labels(outcome="ok" if kind == ResultKind.OUTPUT else "error").inc()
        self.sink(line, kind, usage if kind == ResultKind.OUTPUT else None, wire.encode_result_line(result))

    async def _engine_cache(self, index: int, endpoint: Endpoint, snapshot: EngineSnapshot) -> None:
        """The engine's cache as the scheduler needs it. An engine with a prefix cache per slot (llama.cpp) is asked
        once how many slots it has, and the batch never sends more: a request waiting there takes the next slot
        freed, and with it the prefix another group's next request would have found."""
        if snapshot.slot_caches:
            self.scheduler.limit_pool_inflight(index, 1)
            self.scheduler.warm_up_heads(index, False)  # a warm-up would leave its prefix in a slot of its own
            if index not in self._slots_asked:
                self._slots_asked.add(index)
                slots = await stated_slots(self.client, endpoint.url)
                if slots is not None:
                    endpoint.controller.on_slots(slots)
        window = self.scheduler.windows[index]
        window.observe(snapshot.cache_tokens, snapshot.cache_held)
        window.observe_hits(
            snapshot.cache_queried, snapshot.cache_found, alone=endpoint.controller.regime is Regime.OURS
        )
        self._wake.set()  # the window may have room now

    async def _poll_metrics(self, index: int, endpoint: Endpoint) -> None:
        """Feed the engine's gauges (vLLM's, or llama.cpp's) and the other batch runners' loads to the endpoint's
        controller, where the upstream exposes /metrics, and its KV cache's size and use to the endpoint's prefix
        window. An engine with a prefix cache per slot (llama.cpp) gets one request of a prefix group at a time."""
        meter = EngineMeter()
        controller = endpoint.controller
        failures = 0
        if self.board is not None:  # known to the others before our first request reaches the engine
            await self.board.exchange(
                endpoint.url, inflight=0, limit=controller.limit, demand=self.scheduler.pending, completed=0
            )
        first = True
        while True:
            # An endpoint without /metrics (or one that is down) is asked less often, but asked again: it may be
            # an engine restarting, whose gauges the controller wants back.
            if not first:
                await asyncio.sleep(METRICS_INTERVAL if failures < 3 else METRICS_RETRY_INTERVAL)
            first = False
            demand = controller.inflight + self.scheduler.pending
            weight = self._weight(controller, endpoint)
            controller.on_scrape()
            scrape = meter.scrape(self.client, endpoint.url, time.monotonic())
            if self.board is None:
                snapshot, peers = await scrape, list[RunnerLoad]()
            else:  # side by side: what we read of the other runners is as fresh as the engine's gauges
                exchange = self.board.exchange(
                    endpoint.url,
                    inflight=controller.inflight,
                    limit=controller.limit,
                    demand=demand,
                    completed=controller.answered,
                    weight=weight,
                    budget=controller.budget_view,
                )
                snapshot, peers = await asyncio.gather(scrape, exchange)
            if snapshot is None:
                failures += 1
                self._looked[index].set()  # no gauges to wait for
                continue
            failures = 0
            await self._engine_cache(index, endpoint, snapshot)
            controller.on_engine(time.monotonic(), snapshot.reading, peers=peers, demand=demand, weight=weight)
            if not controller.others.unconfirmed:
                self._looked[index].set()
            endpoint.limiter.poke()  # a grown limit lets waiting dispatch loops in now, not at the next release
            if self.preempt and controller.excess:
                self._preempt(endpoint, controller.excess)
            runner_metrics.record_controller(endpoint.name, controller.snapshot())
            runner_metrics.record_prefix_window(endpoint.name, self.scheduler.windows[index].snapshot())
