"""The KV pool and the scheduler without HTTP: invariants under random load, eviction order, chained hashes."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from batch_gateway.sim.config import SimConfig
from batch_gateway.sim.engine import Engine
from batch_gateway.sim.kv import BlockPool
from batch_gateway.sim.metrics import Histogram
from batch_gateway.sim.tokens import prompt_from_text


def test_chained_hashes_see_the_whole_prefix():
    a = prompt_from_text("A" * 64 + "B" * 64, 16)
    b = prompt_from_text("C" * 64 + "B" * 64, 16)
    assert a.tokens == 32 and len(a.block_hashes) == 2
    assert a.block_hashes[1] != b.block_hashes[1]  # same block, other prefix: another hash
    assert prompt_from_text("A" * 64 + "x", 16).block_hashes == a.block_hashes[:1]  # a partial block is not hashed


def test_pool_evicts_the_least_recently_released_idle_block():
    pool = BlockPool(total=3)
    pool.take(3)
    for h in (b"a", b"b", b"c"):
        assert pool.register(h)
    for h in (b"c", b"b", b"a"):  # released tail first, as a finished sequence does
        pool.release(h)
    assert pool.in_use == 0 and pool.available == 3
    pool.acquire(b"a")  # a hit takes it out of the idle list
    pool.take(1)  # needs an eviction: "c" went idle first
    assert pool.longest_hit([b"a", b"b"], 5) == [b"a", b"b"] and b"c" not in pool.refs
    assert not pool.register(b"a")  # already cached: a duplicate stays private
    assert pool.reset() == 1 and pool.longest_hit([b"a", b"b"], 5) == [b"a"]  # idle "b" forgotten, held "a" kept


def test_pool_cap_keeps_the_cache_small():
    pool = BlockPool(total=10, cache_cap=2)
    pool.take(3)
    assert pool.register(b"a") and pool.register(b"b")
    assert not pool.register(b"c")  # at the cap and nothing idle to evict
    pool.release(b"a")
    assert pool.register(b"c") and b"a" not in pool.refs


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_load_under_kv_pressure_keeps_every_invariant(seed):
    config = SimConfig(kv_blocks=40, max_num_seqs=6, max_num_batched_tokens=64, time_scale=0.001, seed=seed)
    engine = Engine(config, "m")
    rng = random.Random(seed)
    prefixes = ["shared system prompt " * 8, "another shared prompt " * 12, ""]

    async def one(i: int) -> None:
        await asyncio.sleep(rng.random() * 0.01)
        text = rng.choice(prefixes) + f"question {i} " * rng.randint(1, 30)
        prompt = prompt_from_text(text, config.block_size)
        want = rng.randint(1, 120)
        pooling = rng.random() < 0.1
        task = asyncio.ensure_future(engine.generate(prompt, want, pooling=pooling))
        if rng.random() < 0.1:  # some clients give up
            await asyncio.sleep(rng.random() * 0.02)
            task.cancel()  # if it already finished, the cancel is a no-op and it counts as completed
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        sequence = await task
        assert sequence.generated == (0 if pooling else want)
        assert 0 <= (sequence.cached_tokens or 0) < prompt.tokens

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(80))), 60)
    await asyncio.sleep(0.01)
    stats = engine.stats
    assert not engine.running and not engine.waiting
    assert engine.pool.in_use == 0 and engine.pool.available == config.kv_blocks
    assert all(count == 0 for count in engine.pool.refs.values())
    assert stats.completed + stats.aborted == stats.requests == 80
    assert stats.preemptions > 0 and stats.prefix_hits > 0
    await engine.stop()


def test_histogram_counts_each_value_in_its_bucket_at_once():
    histogram = Histogram((0.01, 0.025, 0.05))
    histogram.observe(0.01)  # on a bound: that bucket (Prometheus buckets are "less than or equal")
    histogram.observe(0.02, 128)  # a step's latency, seen by every sequence of the step
    histogram.observe(1.0)  # past the last bound: only +Inf
    assert histogram.counts == [1, 128, 0] and histogram.count == 130
    assert histogram.sum == pytest.approx(0.01 + 0.02 * 128 + 1.0)
