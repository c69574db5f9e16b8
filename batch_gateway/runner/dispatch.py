"""Dispatch: send planned requests to the upstream endpoints, each behind its own adaptive concurrency limit.

Per endpoint, a loop takes a slot from the endpoint's limiter, asks the scheduler for the next line (prefix groups
stick to one endpoint), and sends that line's original bytes. Transient failures (429, 5xx, timeouts, resets) are
retried with jittered backoff that honours Retry-After, within a per-batch retry budget; the slot is released before
backing off, never held while sleeping.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import structlog

from batch_gateway import ids, wire
from batch_gateway.runner import metrics as runner_metrics
from batch_gateway.runner.checkpoint import ERROR, OUTPUT
from batch_gateway.runner.controller import ConcurrencyController
from batch_gateway.runner.ingest import Ingested, read_request
from batch_gateway.runner.limiter import AdaptiveLimiter
from batch_gateway.runner.schedule import GroupScheduler
from batch_gateway.runner.upstream import Exchange, TokenUsage, UpstreamClient, usage_of

# Called with (line, kind, usage, encoded result line) once a line has its final result.
ResultSink = Callable[[int, int, TokenUsage | None, bytes], None]

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0
METRICS_INTERVAL = 1.0


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


@dataclass
class Endpoint:
    url: str
    controller: ConcurrencyController
    limiter: AdaptiveLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = AdaptiveLimiter(self.controller)


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
        except msgspec.DecodeError:
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
        self.stopped = False
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._fd = -1
        self.retries = 0

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

    def stop(self) -> None:
        """Send nothing more. In-flight requests finish or are cut by `abort`."""
        self.stopped = True
        self._wake.set()

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
        while not self.stopped:
            permit = await endpoint.limiter.acquire()
            line = self.scheduler.next_ready(index)
            if line is None:
                permit.release()
                if self.scheduler.done:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.stopped:
                permit.release()
                return
            task = asyncio.create_task(self._request(endpoint, permit, line))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _request(self, endpoint: Endpoint, permit, line: int) -> None:
        raw = read_request(self.ingested, self._fd, line)
        envelope = _envelope_decoder.decode(raw)
        body = bytes(envelope.body)
        attempt = 1
        try:
            while True:
                epoch = endpoint.controller.on_send(time.monotonic())
                runner_metrics.INFLIGHT.inc()
                try:
                    exchange = await self.client.post(endpoint.url, self.path, body, self.request_timeout)
                finally:
                    runner_metrics.INFLIGHT.dec()
                permit.release()
                permit = None
                usage = usage_of(exchange.body) if exchange.ok else None
                self._feedback(endpoint, exchange, usage, epoch)
                if exchange.transient and attempt < self.max_attempts and not self.stopped and self.budget.take():
                    self.retries += 1
                    runner_metrics.RETRIES.inc()
                    await asyncio.sleep(backoff_delay(attempt, exchange.retry_after))
                    attempt += 1
                    if self.stopped:
                        return
                    permit = await endpoint.limiter.acquire()
                    continue
                self._finish(line, envelope.custom_id, exchange, usage)
                return
        finally:
            if permit is not None:
                permit.release()
            self._wake.set()

    def _feedback(self, endpoint: Endpoint, exchange: Exchange, usage: TokenUsage | None, epoch: int) -> None:
        """Close the send with exactly one controller event."""
        now = time.monotonic()
        controller = endpoint.controller
        if exchange.ok and usage is not None:
            controller.on_success(
                now,
                latency=exchange.latency,
                output_tokens=usage.completion_tokens,
                prompt_tokens=usage.prompt_tokens,
                cached_tokens=usage.cached_tokens,
                epoch=epoch,
            )
        elif exchange.status == 0:
            kind = "timeout" if (exchange.failure or "").startswith("timeout") else "reset"
            controller.on_backpressure(now, epoch=epoch, kind=kind)
        elif exchange.status in (429, 503):
            controller.on_backpressure(now, epoch=epoch, kind=str(exchange.status))
        else:
            controller.on_other(now, epoch=epoch)  # a 4xx or a plain 500 says nothing about load
        endpoint.limiter.poke()
        snapshot = controller.snapshot()
        runner_metrics.LIMIT.labels(endpoint=endpoint.url).set(snapshot["limit"])
        if snapshot["last_per_token_s"] is not None:
            runner_metrics.LATENCY.labels(endpoint=endpoint.url).set(snapshot["last_per_token_s"])
            runner_metrics.BASELINE.labels(endpoint=endpoint.url).set(snapshot["baseline_per_token_s"])
        if snapshot["waiting"] is not None:
            runner_metrics.WAITING.labels(endpoint=endpoint.url).set(snapshot["waiting"])
        if usage is not None:
            runner_metrics.TOKENS.labels("prompt").inc(usage.prompt_tokens)
            runner_metrics.TOKENS.labels("cached").inc(usage.cached_tokens)
            runner_metrics.TOKENS.labels("completion").inc(usage.completion_tokens)

    def _finish(self, line: int, custom_id: str, exchange: Exchange, usage: TokenUsage | None) -> None:
        line_id = ids.request_line_id(self.batch_id, line)
        body = json_object_or_none(exchange.body) if exchange.status else None
        if exchange.ok and body is not None:
            kind = OUTPUT
            result = wire.ResultLine(
                id=line_id,
                custom_id=custom_id,
                response=wire.LineResponse(exchange.status, exchange.request_id, msgspec.Raw(body)),
                error=None,
            )
        elif exchange.status:
            kind = ERROR
            if body is None or exchange.ok:
                # Not a JSON object (a proxy's HTML error page, say): wrap it so the line stays valid JSON.
                text = exchange.body[:2000].decode("utf-8", "replace")
                body = msgspec.json.encode(
                    {"error": {"message": f"Upstream returned a non-JSON body: {text}", "type": "upstream_error", "param": None, "code": None}}
                )
            result = wire.ResultLine(
                id=line_id,
                custom_id=custom_id,
                response=wire.LineResponse(exchange.status, exchange.request_id, msgspec.Raw(body)),
                error=None,
            )
        else:
            kind = ERROR
            timeout = (exchange.failure or "").startswith("timeout")
            result = wire.ResultLine(
                id=line_id,
                custom_id=custom_id,
                response=None,
                error=wire.LineError(
                    code="request_timeout" if timeout else "upstream_unreachable",
                    message=f"The request got no response from the model server after retries ({exchange.failure}).",
                ),
            )
        self.scheduler.on_finished(line, kind == OUTPUT)
        runner_metrics.REQUESTS.labels(outcome="ok" if kind == OUTPUT else "error").inc()
        self.sink(line, kind, usage if kind == OUTPUT else None, wire.encode_result_line(result))

    async def _poll_metrics(self, index: int, endpoint: Endpoint) -> None:
        """Feed vLLM's (or llama.cpp's) queue gauges to the controller, where the upstream exposes /metrics. An
        engine with a prefix cache per slot (llama.cpp) gets one request of a prefix group at a time."""
        from batch_gateway.runner.engine_metrics import read_queue_metrics

        failures = 0
        while failures < 3:
            await asyncio.sleep(METRICS_INTERVAL)
            queue = await read_queue_metrics(self.client, endpoint.url)
            if queue is None:
                failures += 1
                continue
            failures = 0
            if queue.slot_caches:
                self.scheduler.limit_pool_inflight(index, 1)
            endpoint.controller.on_queue_metrics(
                time.monotonic(),
                waiting=queue.waiting,
                running=queue.running,
                kv_usage=queue.kv_usage,
                completed=queue.completed,
            )
            endpoint.limiter.poke()  # a grown limit lets waiting dispatch loops in now, not at the next release
            runner_metrics.LIMIT.labels(endpoint=endpoint.url).set(endpoint.controller.limit)
