"""The KV pool and the scheduler without HTTP: invariants under random load, eviction order, chained hashes."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest

from batch_gateway.sim.config import SimConfig
from batch_gateway.sim.engine import Engine, Sequence
from batch_gateway.sim.kv import BlockPool
from batch_gateway.sim.metrics import Histogram
from batch_gateway.sim.tokens import prompt_from_text
from batch_gateway.sim.waiting import ArrivalQueue, PriorityQueue
from tests.helpers import eventually_async


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


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_load_under_kv_pressure_keeps_every_invariant(seed, policy):
    config = SimConfig(
        kv_blocks=40, max_num_seqs=6, max_num_batched_tokens=64, time_scale=0.001, seed=seed, scheduling_policy=policy
    )
    engine = Engine(config, "m")
    rng = random.Random(seed)
    prefixes = ["shared system prompt " * 8, "another shared prompt " * 12, ""]

    async def one(i: int) -> None:
        await asyncio.sleep(rng.random() * 0.01)
        text = rng.choice(prefixes) + f"question {i} " * rng.randint(1, 30)
        prompt = prompt_from_text(text, config.block_size)
        want = rng.randint(1, 120)
        pooling = rng.random() < 0.1
        priority = rng.randint(-2, 2) if policy == "priority" else 0
        task = asyncio.ensure_future(engine.generate(prompt, want, pooling=pooling, priority=priority))
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


def _sequence(priority: int, arrived: float) -> Sequence:
    return Sequence(prompt_from_text("x", 16), 1, arrived, priority=priority)


def test_priority_queue_orders_by_priority_then_arrival():
    queue = PriorityQueue()
    late_urgent, early_low = _sequence(0, arrived=3.0), _sequence(5, arrived=1.0)
    early_urgent, mid = _sequence(0, arrived=2.0), _sequence(2, arrived=2.5)
    for sequence in (late_urgent, early_low, early_urgent, mid):
        queue.add(sequence)
    queue.remove(mid)
    assert len(queue) == 3 and set(queue) == {late_urgent, early_low, early_urgent}
    assert [queue.take() for _ in range(3)] == [early_urgent, late_urgent, early_low]
    fifo = ArrivalQueue()
    fifo.add(early_low)
    fifo.add_front(late_urgent)  # a preempted sequence goes back to the head
    assert fifo.peek() is late_urgent and fifo.take() is late_urgent and list(fifo) == [early_low]


async def _stop(engine: Engine, tasks: list[asyncio.Future]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await engine.stop()


async def test_a_waiting_request_of_higher_priority_starts_in_the_next_step():
    # 10 ms steps (real time), so the step count read when the answer comes back is exact.
    engine = Engine(SimConfig(scheduling_policy="priority", max_num_seqs=2), "m")
    low = [
        asyncio.ensure_future(engine.generate(prompt_from_text(f"low {i}", 16), 10_000, priority=10)) for i in range(3)
    ]
    await eventually_async(lambda: engine.num_running == 2, timeout=5, interval=0.001)
    engine.pause(True)
    older, newer = engine.running  # both priority 10; `newer` arrived later
    urgent = asyncio.ensure_future(engine.generate(prompt_from_text("urgent", 16), 2, priority=0))
    await eventually_async(lambda: engine.num_waiting == 2, timeout=5, interval=0.001)
    before = engine.stats.steps
    engine.pause(False)
    sequence = await urgent
    # Step 1 preempts `newer` and prefills the urgent one (its first token), step 2 its second token; the engine has
    # started step 3 when the answer is delivered.
    assert engine.stats.steps - before == 3 and sequence.generated == 2
    assert engine.stats.preemptions == 1
    assert newer.prefill_target > newer.prompt.tokens and older.prefill_target == older.prompt.tokens  # who recomputes
    # Step 3 gave the freed slot back to `newer`, ahead of the later arrival of its priority.
    assert engine.running == [older, newer] and engine.num_waiting == 1
    await _stop(engine, low)


@pytest.mark.parametrize(("policy", "victim"), [("priority", "low"), ("fcfs", "last admitted")])
async def test_a_full_kv_cache_preempts_the_lowest_priority(policy, victim):
    # Two sequences that end with 14 blocks each in a KV cache of 20: one must give way while both decode.
    engine = Engine(SimConfig(scheduling_policy=policy, kv_blocks=20, time_scale=0.01), "m")
    low = asyncio.ensure_future(engine.generate(prompt_from_text("l" * 256, 16), 150, priority=10))
    await eventually_async(lambda: engine.num_running == 1, timeout=5, interval=0.001)
    high = asyncio.ensure_future(engine.generate(prompt_from_text("h" * 256, 16), 150, priority=0))
    low_sequence, high_sequence = await asyncio.gather(low, high)
    preempted = {s for s in (low_sequence, high_sequence) if s.prefill_target > s.prompt.tokens}  # it recomputed
    assert preempted == ({low_sequence} if victim == "low" else {high_sequence})  # fcfs: the last admitted goes
    assert engine.stats.preemptions >= 1
    await engine.stop()


async def test_a_waiting_request_of_higher_priority_preempts_for_kv_room():
    # A 250-token prompt holds 16 of 20 blocks; a 100-token one needs 7: it cannot start unless the first yields.
    engine = Engine(SimConfig(scheduling_policy="priority", kv_blocks=20, time_scale=0.01), "m")
    low = asyncio.ensure_future(engine.generate(prompt_from_text("l" * 1000, 16), 60, priority=1))
    await eventually_async(lambda: engine.num_running == 1, timeout=5, interval=0.001)
    high = await engine.generate(prompt_from_text("h" * 400, 16), 3, priority=0)
    assert high.generated == 3 and not low.done() and engine.stats.preemptions == 1
    assert (await low).generated == 60
    await engine.stop()
