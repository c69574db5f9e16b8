"""Cold-prefix gating over the prefix tree, exactly-once hand-out, endpoint affinity and joining, cost at 1M lines."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from batch_gateway.runner.prefix import MAX_BLOCKS, plan_order, prefix_key, shared_depths
from batch_gateway.runner.schedule import GroupScheduler

CHAT = "/v1/chat/completions"


def drain(scheduler: GroupScheduler, endpoint: int = 0) -> list[int]:
    out = []
    while (line := scheduler.next_ready(endpoint)) is not None:
        out.append(line)
    return out


def test_cold_group_sends_its_head_alone_then_flows():
    # Two groups: lines 10,11,12 (group 0) and 20,21 (group 1).
    s = GroupScheduler(np.array([10, 11, 12, 20, 21]), np.array([0, 0, 0, 1, 1]))
    assert drain(s) == [10, 20]  # one head per group; followers wait
    assert not s.done and s.pending == 3
    s.on_finished(20, success=True)
    assert drain(s) == [21]  # group 1 is warm now
    s.on_finished(10, success=True)
    assert drain(s) == [11, 12]
    assert s.done and s.pending == 0


def test_one_follower_at_a_time_per_group_for_engines_with_a_cache_per_slot():
    # llama.cpp: a follower sent beside another lands in a slot holding some other prefix and computes its own.
    s = GroupScheduler(np.array([10, 11, 12, 20, 21, 22, 30]), np.array([0, 0, 0, 1, 1, 1, 2]))
    s.limit_pool_inflight(0, 1)
    assert drain(s) == [10, 20, 30]  # the heads
    s.on_finished(10, success=True)
    s.on_finished(20, success=True)
    assert drain(s) == [11, 21]  # one follower per warm group, not both of each
    s.on_finished(11, success=True)
    assert drain(s) == [12]  # the next of group 0, into the slot 11 just left
    s.on_finished(21, success=False)  # a failed follower frees its turn too
    assert drain(s) == [22]
    for line in (12, 22, 30):
        s.on_finished(line, success=True)
    assert s.done and s.inflight == 0


def test_failed_head_passes_the_role_on():
    s = GroupScheduler(np.array([1, 2, 3, 4]), np.array([0, 0, 0, 0]))
    assert drain(s) == [1]
    s.on_finished(1, success=False)
    assert drain(s) == [2]  # the next request becomes the head, still alone
    s.on_finished(2, success=False)
    assert drain(s) == [3]
    s.on_finished(3, success=True)
    assert drain(s) == [4]


def test_followers_failing_change_nothing():
    s = GroupScheduler(np.array([1, 2, 3]), np.array([0, 0, 0]))
    assert drain(s) == [1]
    s.on_finished(1, success=True)
    assert drain(s) == [2, 3]
    s.on_finished(2, success=False)
    s.on_finished(3, success=True)
    assert s.done and s.inflight == 0


def test_every_level_of_the_prefix_tree_is_warmed_once():
    # Two system prompts that open with the same 64+ bytes, each with its own followers, plus a lonely request.
    common = "You are a careful assistant working for the ACME company, please "
    bodies = {
        0: [("system", common + "handle billing. " * 30), ("user", "b1")],
        1: [("system", common + "handle shipping. " * 30), ("user", "s1")],
        2: [("system", common + "handle billing. " * 30), ("user", "b2")],
        3: [("user", "something unrelated")],
        4: [("system", common + "handle shipping. " * 30), ("user", "s2")],
        5: [("system", common + "handle billing. " * 30), ("user", "b3")],
    }
    keys = np.array(
        [
            (k := prefix_key(CHAT, {"messages": [{"role": r, "content": c} for r, c in msgs]}))
            + (0,) * (MAX_BLOCKS - len(k))
            for _, msgs in sorted(bodies.items())
        ],
        dtype=np.uint64,
    )
    order = plan_order(keys)
    s = GroupScheduler(order, depths=shared_depths(keys, order))
    # Group-level gating alone would let the first shipping request go out next to the first billing one: both
    # would compute the common opening. The tree holds it back until the opening is cached.
    billing, shipping = {0, 2, 5}, {1, 4}
    first = drain(s)
    assert len(first) == 2 and first[1] == 3  # the head of the ACME group, then the unrelated request
    head = first[0]
    mine, other = (billing, shipping) if head in billing else (shipping, billing)
    s.on_finished(head, success=True)
    second = drain(s)
    # The head's branch reuses its whole prompt; the other branch sends one request to compute its own part.
    assert set(second) == (mine - {head}) | {second[-1]} and second[-1] in other
    s.on_finished(second[-1], success=True)
    assert set(drain(s)) == other - {second[-1]}
    for line in set(range(6)) - {head, second[-1]}:
        s.on_finished(line, success=True)
    assert s.done and s.inflight == 0


def random_plan(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys of a random 3-level prefix tree (system prompt, few-shot block, question), in planned order."""
    system = rng.integers(1, 12, n)
    shots = rng.integers(1, 4, n)
    question = rng.integers(1, 1 << 40, n)
    keys = np.zeros((n, MAX_BLOCKS), dtype=np.uint64)
    keys[:, 0] = system
    keys[:, 1] = system * 10 + shots
    keys[:, 2] = np.where(rng.random(n) < 0.2, 0, question)  # some end after the few-shot block (identical texts)
    keys[system == 11, 1:] = 0  # one group of requests sharing only their first block
    return keys, plan_order(keys)


@pytest.mark.parametrize("warm_ups", [False, True], ids=["heads", "warm-ups"])
@pytest.mark.parametrize("endpoints,seed", [(1, 1), (2, 2), (3, 3)])
def test_exactly_once_no_deadlock_and_one_cold_request_per_prefix_per_endpoint(endpoints, seed, warm_ups):
    rng = np.random.default_rng(seed)
    n = 1500
    keys, order = random_plan(rng, n)
    depths = shared_depths(keys, order)
    s = GroupScheduler(order, depths=depths, endpoints=endpoints)
    for endpoint in range(endpoints):
        s.warm_up_heads(endpoint, warm_ups)
    warmed_ups = 0
    depth_of = dict(zip(order.tolist(), depths.tolist(), strict=True))
    handed: list[int] = []
    inflight: list[tuple[int, int]] = []  # (line, endpoint)
    warm: list[set[tuple[int, ...]]] = [set() for _ in range(endpoints)]  # prefixes computed on each endpoint
    limit = 12
    while not s.done or inflight:
        progressed = False
        for endpoint in range(endpoints):
            while sum(1 for _, e in inflight if e == endpoint) < limit:
                line = s.next_ready(endpoint)
                if line is None:
                    break
                # The prefix this request shares with an earlier one is cached here, or no request that contains
                # it is in flight here (this one computes it alone).
                d = depth_of[line]
                prefix = tuple(keys[line, :d])
                if d and prefix not in warm[endpoint]:
                    assert all(tuple(keys[other, :d]) != prefix for other, e in inflight if e == endpoint), line
                handed.append(line)
                inflight.append((line, endpoint))
                progressed = True
        assert progressed or inflight, "deadlock: nothing in flight and nothing handed out"
        if inflight:
            i = int(rng.integers(len(inflight)))
            line, endpoint = inflight[i]
            ok = bool(rng.random() < 0.85)
            if ok:  # its whole prompt is cached now (a warm-up computes the same prompt)
                row = keys[line]
                warm[endpoint].update(tuple(row[:k]) for k in range(1, MAX_BLOCKS + 1) if row[k - 1])
            if s.warming(line):  # its warm-up is answered; the line itself stays in flight
                s.on_warmed(line, success=ok)
                warmed_ups += 1
            else:
                inflight.pop(i)
                s.on_finished(line, success=ok)
    assert sorted(handed) == list(range(n))
    assert s.inflight == 0 and s.pending == 0
    assert (warmed_ups > 20) is warm_ups
    assert all(not w.snapshot()["open_groups"] for w in s.windows)  # every group closed


def test_a_warmed_up_head_lets_its_followers_go_while_it_runs():
    s = GroupScheduler(np.array([10, 11, 12, 20, 21]), np.array([0, 0, 0, 1, 1]))
    s.warm_up_heads(0)
    assert drain(s) == [10, 20] and s.warming(10) and s.warming(20)
    s.on_warmed(10, success=True, prompt_tokens=400, cached_tokens=0)
    assert not s.warming(10)
    assert drain(s) == [11, 12]  # beside the head itself, which is still in flight
    s.on_finished(11, success=True)
    s.on_finished(12, success=True)
    assert s.windows[0].snapshot()["open_groups"] == 2  # group 0 stays open while its head runs
    s.on_finished(10, success=True)
    assert drain(s) == []  # its followers went once only
    # A warm-up that fails leaves its group waiting for the head, as without one.
    s.on_warmed(20, success=False)
    assert drain(s) == []
    s.on_finished(20, success=True)
    assert drain(s) == [21]
    s.on_finished(21, success=True)
    assert s.done and s.inflight == 0 and s.windows[0].snapshot()["open_groups"] == 0
    with pytest.raises(ValueError, match="not warming"):
        s.on_warmed(10, success=True)


def test_groups_stick_to_their_endpoint():
    lines = np.arange(6)
    s = GroupScheduler(lines, np.array([0, 0, 0, 1, 1, 1]), endpoints=2)
    assert s.next_ready(0) == 0
    assert s.next_ready(1) == 3
    assert s.next_ready(0) is None and s.next_ready(1) is None
    s.on_finished(0, success=True)
    s.on_finished(3, success=True)
    # Each endpoint takes its own group's followers, where the prefix is cached.
    assert [s.next_ready(1), s.next_ready(0), s.next_ready(1), s.next_ready(0)] == [4, 1, 5, 2]
    assert s.done and s.joins == 0


def test_an_idle_endpoint_joins_a_big_group_with_its_own_head():
    s = GroupScheduler(np.arange(8), np.zeros(8, dtype=np.int64), endpoints=2)
    assert s.next_ready(0) == 0
    assert s.next_ready(1) is None  # the only group is cold: nothing to join yet
    s.on_finished(0, success=True)
    assert s.next_ready(1) == 1  # endpoint 1 joins: one request warms the prefix on its engine
    assert s.next_ready(1) is None  # ...alone
    assert s.next_ready(0) == 2 and s.next_ready(0) == 3  # endpoint 0 carries on meanwhile
    s.on_finished(1, success=True)
    assert s.next_ready(1) == 4 and s.next_ready(0) == 5  # both drain the group now
    assert drain(s, 1) == [6, 7]
    assert s.done and s.joins == 1


def test_a_failed_join_is_retried_on_the_joining_endpoint():
    s = GroupScheduler(np.arange(6), np.zeros(6, dtype=np.int64), endpoints=2)
    assert s.next_ready(0) == 0
    s.on_finished(0, success=True)
    assert s.next_ready(1) == 1
    s.on_finished(1, success=False)
    assert s.next_ready(1) == 2  # another stand-in, still one at a time
    assert s.next_ready(1) is None


def test_input_validation():
    with pytest.raises(ValueError):
        GroupScheduler(np.arange(3), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError):
        GroupScheduler(np.arange(3), depths=np.array([1, 0, 0]))
    with pytest.raises(ValueError):
        GroupScheduler(np.arange(3))
    s = GroupScheduler(np.arange(2), np.array([0, 1]))
    with pytest.raises(ValueError):
        s.on_finished(1, success=True)  # never handed out


def test_empty_plan_is_done():
    s = GroupScheduler(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert s.done and s.next_ready() is None


@pytest.mark.slow
def test_a_million_lines_cost_little_memory_and_are_each_handed_out_once():
    """Memory is counted by allocation (deterministic); speed is benchmarks/overhead.py's, not a timed test's."""
    n = 1_000_000
    rng = np.random.default_rng(5)
    groups = np.sort(rng.integers(0, 50_000, n))
    depths = np.zeros(n, dtype=np.uint8)
    depths[1:] = np.where(groups[1:] == groups[:-1], rng.integers(1, 4, n - 1), 0)
    lines = rng.permutation(n)
    tracemalloc.start()
    try:
        s = GroupScheduler(lines, depths=depths, endpoints=2)
        del lines
        resident, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert resident < 40e6, f"{resident / 1e6:.0f} MB held for the plan"  # ~20 bytes per line, no per-line objects
    assert peak < 120e6, f"peak {peak / 1e6:.0f} MB while building it"
    inflight: list[int] = []
    seen = np.zeros(n, dtype=bool)
    handed = 0
    while not s.done or inflight:
        for endpoint in (0, 1):
            while len(inflight) < 256 and (line := s.next_ready(endpoint)) is not None:
                assert not seen[line]
                seen[line] = True
                inflight.append(line)
                handed += 1
        if inflight:
            s.on_finished(inflight.pop(), True)
    assert handed == n and seen.all()
