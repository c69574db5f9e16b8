"""Load generators that talk to the simulator directly: closed loop (fixed concurrency) and open loop (Poisson).

Both use the raw keep-alive client so that they take as little CPU as possible from the system under test.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec

from benchmarks.rawhttp import RawPool

PHASE_BODIES = 1_000_000  # phase n of draw d sends bodies d·DRAW_BODIES + n·PHASE_BODIES onward
DRAW_BODIES = 100_000_000


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Completion(msgspec.Struct):
    usage: _Usage = msgspec.field(default_factory=_Usage)


_decode_completion = msgspec.json.Decoder(_Completion).decode


@dataclass
class Sample:
    started: float  # monotonic
    latency: float  # seconds
    status: int
    completion_tokens: int


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0

    def between(self, start: float, end: float) -> list[Sample]:
        """Requests that started inside [start, end)."""
        return [s for s in self.samples if start <= s.started < end]

    def tokens_finished_between(self, start: float, end: float) -> int:
        return sum(s.completion_tokens for s in self.samples if start <= s.started + s.latency < end)


async def _send(pool: RawPool, path: str, body: bytes, result: LoadResult) -> None:
    started = time.monotonic()
    try:
        status, payload = await pool.request("POST", path, body)
    except (OSError, asyncio.IncompleteReadError):
        result.errors += 1
        return
    tokens = _decode_completion(payload).usage.completion_tokens if status == 200 else 0
    result.samples.append(Sample(started, time.monotonic() - started, status, tokens))


async def closed_loop(
    url: str, body: Callable[[int], bytes], concurrency: int, duration: float, path: str = "/v1/chat/completions"
) -> LoadResult:
    """`concurrency` workers, each sending its next request as soon as the last one answered, for `duration` s."""
    pool = RawPool(url)
    result = LoadResult()
    deadline = time.monotonic() + duration
    counter = iter(range(1 << 62))

    async def worker() -> None:
        while time.monotonic() < deadline:
            await _send(pool, path, body(next(counter)), result)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        pool.close()
    return result


async def poisson(
    url: str,
    body: Callable[[int], bytes],
    rate: float,
    duration: float,
    seed: int = 7,
    path: str = "/v1/chat/completions",
) -> LoadResult:
    """Open loop: requests arrive at exponential intervals (mean 1/rate) for `duration` s, whatever the latency."""
    return await poisson_phases(url, body, [(duration, rate)], seed, path)


async def poisson_phases(
    url: str,
    body: Callable[[int], bytes],
    phases: list[tuple[float, float]],
    seed: int = 7,
    path: str = "/v1/chat/completions",
    started: float | None = None,
    draw: int = 0,
) -> LoadResult:
    """Open loop with a rate that changes: `phases` is [(seconds, requests per second)], one after the other (see
    `arrivals`). Every request is awaited, so the call returns when the last answer is in. `started`: the monotonic
    time the first phase begins (default now); `draw`: which bodies are sent (see `arrivals`)."""
    pool = RawPool(url)
    result = LoadResult()
    tasks: set[asyncio.Task] = set()
    start = time.monotonic() if started is None else started
    try:
        for at, i in arrivals(phases, seed, draw):
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(_send(pool, path, body(i), result))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        delay = start + sum(seconds for seconds, _ in phases) - time.monotonic()  # a last phase of rate 0 lasts too
        if delay > 0:
            await asyncio.sleep(delay)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        pool.close()
    return result


def arrivals(phases: list[tuple[float, float]], seed: int, draw: int = 0) -> Iterator[tuple[float, int]]:
    """(seconds since the first phase began, body index) of each request of `phases` ([(seconds, requests per
    second)]), each phase a Poisson stream of its own (a rate of 0 sends nothing for that long).

    A phase's arrivals and bodies come from `seed` and its place in the list only, not from the phases before it: runs
    that measure the same phase after warm-ups of different lengths send their requests at the same moments of the
    phase (a p99 of a few hundred requests is its slowest few, which differ from one draw of arrivals to the next). A
    phase of 0 seconds keeps the places of those after it. Each `draw` has bodies of its own (alike, but not the same):
    an engine with a prompt cache would otherwise serve a run the prompts an earlier run sent."""
    phase_start = 0.0
    for n, (seconds, rate) in enumerate(phases):
        rng = random.Random(f"{seed}/{n}")
        at, i = rng.expovariate(rate) if rate > 0 else seconds, draw * DRAW_BODIES + n * PHASE_BODIES
        while at < seconds:
            yield phase_start + at, i
            at, i = at + rng.expovariate(rate), i + 1
        phase_start += seconds


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def measure_capacity(sim, body: Callable[[int], bytes], concurrency: int, warmup: float, duration: float) -> dict:
    """Saturate the simulator with a closed loop at `concurrency` and return its steady output rate (tokens/s, real
    time) over the last `duration` seconds, with the mean running and waiting counts it showed meanwhile."""
    from benchmarks.harness import StatsSampler, mean

    sampler = StatsSampler(sim).start()
    started = time.monotonic()
    try:
        asyncio.run(closed_loop(sim.url, body, concurrency, warmup + duration))
    finally:
        sampler.stop()
    window = (started + warmup, started + warmup + duration)
    inside = [s for t, s in sampler.samples if window[0] <= t <= window[1]]
    first, last = sampler.at(window[0]), sampler.at(window[1])
    steps = last["steps"] - first["steps"]
    return {
        "tokens_per_s": sampler.rate("generation_tokens", *window),
        "requests_per_s": sampler.rate("completed", *window),
        "running": mean([s["running"] for s in inside]),
        "waiting": mean([s["waiting"] for s in inside]),
        "step_ms": 1000 * (last["busy_seconds"] - first["busy_seconds"]) / steps if steps else float("nan"),
    }
