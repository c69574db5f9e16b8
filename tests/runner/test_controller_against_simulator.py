"""The real dispatcher and controller against the simulator over HTTP: converge near the engine's knee, retreat
when interactive load takes slots, recover when it leaves."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import numpy as np
import structlog

from batch_gateway.runner.controller import ConcurrencyController
from batch_gateway.runner.dispatch import Dispatcher, Endpoint, RetryBudget
from batch_gateway.runner.ingest import Limits, ingest
from batch_gateway.runner.schedule import GroupScheduler
from batch_gateway.runner.upstream import UpstreamClient
from batch_gateway.sim import SimConfig, SimServer
from tests.helpers import chat_lines

SLOTS = 16


async def chunks(data: bytes):
    yield data


async def sample(endpoint: Endpoint, http: httpx.AsyncClient, url: str, seconds: float) -> tuple[float, float]:
    """Median limit and mean engine queue over `seconds`."""
    limits, waiting = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        limits.append(endpoint.controller.limit)
        waiting.append((await http.get(url + "/sim/stats")).json()["waiting"])
    return statistics.median(limits), statistics.mean(waiting)


async def test_converges_near_the_knee_retreats_and_recovers(tmp_path):
    with SimServer(SimConfig(max_num_seqs=SLOTS, time_scale=0.5)) as sim:
        ingested = await ingest(chunks(chat_lines(6000, systems=6000, max_tokens=32)), tmp_path / "input.jsonl",
                                "/v1/chat/completions", Limits(10_000, 1 << 20), lambda model: True)
        endpoint = Endpoint(sim.url, ConcurrencyController(initial=4, maximum=256))
        lines = np.arange(ingested.count)
        async with httpx.AsyncClient(timeout=60) as client, UpstreamClient() as upstream:
            dispatcher = Dispatcher(
                batch_id="batch_test", path="/v1/chat/completions", ingested=ingested, endpoints=[endpoint],
                scheduler=GroupScheduler(lines, lines), client=upstream, sink=lambda *args: None,
                budget=RetryBudget(ingested.count, 0.2), max_attempts=3, request_timeout=60,
                log=structlog.get_logger("test"),
            )
            task = asyncio.create_task(dispatcher.run())
            try:
                await asyncio.sleep(10)
                alone, alone_waiting = await sample(endpoint, client, sim.url, 4)
                await client.post(sim.url + "/sim/load", json={"sequences": SLOTS // 2})
                await asyncio.sleep(6)
                shared, shared_waiting = await sample(endpoint, client, sim.url, 4)
                await client.post(sim.url + "/sim/load", json={"sequences": 0})
                await asyncio.sleep(10)
                recovered, _ = await sample(endpoint, client, sim.url, 3)
            finally:
                dispatcher.stop()
                await dispatcher.abort(0)
                task.cancel()
    print(f"limit alone {alone} (queue {alone_waiting:.1f}), shared {shared} (queue {shared_waiting:.1f}), recovered {recovered}")
    assert 0.8 * SLOTS <= alone <= 1.6 * SLOTS
    assert alone_waiting <= SLOTS * 0.5
    assert shared <= SLOTS // 2 * 1.5 + 2, "the batch did not make room for the interactive load"
    assert recovered >= 0.8 * SLOTS
