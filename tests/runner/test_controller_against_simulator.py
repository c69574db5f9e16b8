"""The real dispatcher and controller against the simulator over HTTP: fill the engine to its knee, give way to
others' sequences (kept in the engine by /sim/load) without letting them queue, take the engine back when they leave.

The simulator runs as a process of its own, as an engine would: in this process it would share the GIL with the
dispatcher, and its steps (and so its queue) would depend on the dispatcher's load."""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import structlog

from batch_gateway.runner.controller import ConcurrencyController, Regime
from batch_gateway.runner.dispatch import Dispatcher, Endpoint, RetryBudget
from batch_gateway.runner.ingest import Ingested, Limits, ingest
from batch_gateway.runner.presence import FIRST_HOLD
from batch_gateway.runner.schedule import GroupScheduler
from batch_gateway.runner.upstream import UpstreamClient
from tests.fixtures.processes import http_ok, spawn, stop
from tests.helpers import chat_lines, free_port

pytestmark = pytest.mark.process

SLOTS = 16


async def chunks(data: bytes):
    yield data


@contextlib.contextmanager
def sim_process(*args: str) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = spawn(
        [sys.executable, "-m", "batch_gateway", "sim", "--port", str(port), *args],
        ready=http_ok(url + "/health"),
        what="the simulator",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield url
    finally:
        stop(process)


async def sample(endpoint: Endpoint, http: httpx.AsyncClient, url: str, seconds: float) -> tuple[float, float]:
    """Median limit and mean engine queue over `seconds`."""
    limits, waiting = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        limits.append(endpoint.controller.limit)
        waiting.append((await http.get(url + "/sim/stats")).json()["waiting"])
    return statistics.median(limits), statistics.mean(waiting)


async def recovery(endpoint: Endpoint, left: float, target: float, seconds: float) -> tuple[float, float, float]:
    """Once others have left (at `left`), for up to `seconds`: when the engine was the batch's again, the median limit
    over the last 3 s when it first reached `target` (or at the end), and when, all since `left`. (Waited for rather
    than read at a fixed time: once in CI the limit read 14 against 14.4 at the hold's end + 10 s, a cause that five
    traces here, two beside CPU hogs, did not reproduce: each was back at 16-17 at the hold's end.)"""
    controller = endpoint.controller
    ours_at = math.inf
    limits: deque[float] = deque(maxlen=12)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        if controller.regime is Regime.OURS:
            ours_at = min(ours_at, time.monotonic())
        limits.append(controller.limit)
        if len(limits) == limits.maxlen and statistics.median(limits) >= target:
            break
    return ours_at - left, statistics.median(limits), time.monotonic() - left


async def model_ok(model: str) -> None:
    return None


def dispatcher_for(ingested: Ingested, endpoint: Endpoint, upstream: UpstreamClient) -> Dispatcher:
    """The real dispatcher sending every line, in input order, to `endpoint`; results are dropped."""
    lines = np.arange(ingested.count)
    return Dispatcher(
        batch_id="batch_test",
        path="/v1/chat/completions",
        ingested=ingested,
        endpoints=[endpoint],
        scheduler=GroupScheduler(lines, lines),
        client=upstream,
        sink=lambda *args: None,
        budget=RetryBudget(ingested.count, 0.2),
        max_attempts=3,
        request_timeout=60,
        log=structlog.get_logger("test"),
    )


async def test_converges_near_the_knee_retreats_and_recovers(tmp_path):
    with sim_process("--max-num-seqs", str(SLOTS), "--time-scale", "0.5") as sim_url:
        # Output lengths 16..47 tokens: equal lengths would finish in lockstep, and each lockstep refill reads as a
        # burst of waiting requests that no real mix of requests produces.
        # Enough for the 90 s it runs (a minute of it held as after a first sign, at the budget of an empty engine):
        # with 6,400 lines the batch could run out before the end, and its limit with it.
        varied = b"".join(chat_lines(400, systems=400, max_tokens=16 + k, prefix=f"len{k}") for k in range(32))
        ingested = await ingest(
            chunks(varied), tmp_path / "input.jsonl", "/v1/chat/completions", Limits(10_000, 1 << 20), model_ok
        )
        endpoint = Endpoint(sim_url, ConcurrencyController(initial=4, maximum=256))
        async with httpx.AsyncClient(timeout=60) as client, UpstreamClient() as upstream:
            dispatcher = dispatcher_for(ingested, endpoint, upstream)
            task = asyncio.create_task(dispatcher.run())
            try:
                await asyncio.sleep(12)  # slow start, and the knee it finds
                alone, alone_waiting = await sample(endpoint, client, sim_url, 4)
                await client.post(sim_url + "/sim/load", json={"sequences": SLOTS // 2})
                await asyncio.sleep(6)
                shared, shared_waiting = await sample(endpoint, client, sim_url, 4)
                await client.post(sim_url + "/sim/load", json={"sequences": 0})
                left = time.monotonic()
                # Others that finished no request leave no rate nor gaps to hold by: a lone runner holds the engine
                # as after a person's first request, then refills by slow start.
                await asyncio.sleep(FIRST_HOLD - 5)
                ours_after, recovered, recovered_after = await recovery(endpoint, left, 0.9 * SLOTS, 30)
            finally:
                dispatcher.stop()
                await dispatcher.abort(0)
                task.cancel()
    print(
        f"limit alone {alone} (queue {alone_waiting:.1f}), shared {shared} (queue {shared_waiting:.1f}), "
        f"the batch's again {ours_after:.1f} s after they left, recovered to {recovered} after {recovered_after:.1f} s"
    )
    assert 0.9 * SLOTS <= alone <= 1.3 * SLOTS
    assert alone_waiting <= SLOTS * 0.25
    assert shared <= SLOTS // 2 - 1, "the batch did not leave the others room for their bursts"
    assert shared_waiting <= 0.5, "the others' requests queued"
    assert recovered >= 0.9 * SLOTS, "the batch did not take the engine back"


async def test_a_batch_that_starts_beside_users_starts_within_their_budget(tmp_path):
    """Its first requests wait for a reading of the engine: sent at the initial limit, they took every slot of a small
    engine from users for a whole service time (on llama.cpp, 8 requests of 5 s while users queued 8 deep)."""
    with sim_process("--max-num-seqs", "8", "--time-scale", "0.5") as sim_url:
        ingested = await ingest(
            chunks(chat_lines(64, systems=64, max_tokens=64)),
            tmp_path / "input.jsonl",
            "/v1/chat/completions",
            Limits(10_000, 1 << 20),
            model_ok,
        )
        endpoint = Endpoint(sim_url, ConcurrencyController(initial=8))
        async with httpx.AsyncClient(timeout=60) as client, UpstreamClient() as upstream:
            await client.post(sim_url + "/sim/load", json={"sequences": 6})  # users hold 6 of the 8 slots
            dispatcher = dispatcher_for(ingested, endpoint, upstream)
            task = asyncio.create_task(dispatcher.run())
            inflight, waiting = [], []
            try:
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    inflight.append(endpoint.controller.inflight)
                    waiting.append((await client.get(sim_url + "/sim/stats")).json()["waiting"])
                    await asyncio.sleep(0.02)
            finally:
                dispatcher.stop()
                await dispatcher.abort(0)
                task.cancel()
    assert max(inflight) >= 1, "the batch sent nothing: this test shows nothing"
    assert max(inflight) <= 2, f"the batch started with {max(inflight)} in flight beside users holding 6 of 8 slots"
    assert max(waiting) <= 1  # an arrival waits for the next step; 8 at once would have waited for slots
