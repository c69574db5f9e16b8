"""The benchmarks' own yardsticks: the peer's AIMD limit, and reading the engine's inter-token latency from /metrics."""

from __future__ import annotations

from batch_gateway.sim import SimConfig
from batch_gateway.sim.engine import Engine
from batch_gateway.sim.metrics import render
from benchmarks.harness import token_latency_totals
from benchmarks.peer import Aimd
from benchmarks.report import times


def test_the_peer_starts_at_ten_halves_on_429_and_5xx_down_to_five_and_adds_one_per_ten_successes():
    aimd = Aimd()
    assert aimd.limit == 10
    aimd.on_answer(429)
    assert aimd.limit == 5
    for _ in range(9):
        aimd.on_answer(200)
    assert aimd.limit == 5
    aimd.on_answer(200)
    assert aimd.limit == 6
    aimd.on_answer(503)
    assert aimd.limit == 5  # 3 would be below the floor
    aimd.on_answer(400)  # a client error says nothing about load
    for _ in range(100):
        aimd.on_answer(200)
    assert aimd.limit == 10
    assert [limit for _, limit in aimd.changes] == [10, 5, 6, 5, 6, 7, 8, 9, 10]


def test_the_inter_token_latency_totals_are_read_from_the_simulators_metrics():
    engine = Engine(SimConfig(), "sim-model")
    engine.stats.itl.observe(0.02, 30)
    engine.stats.itl.observe(0.5, 2)
    total, count = token_latency_totals(render([engine]).encode())
    assert count == 32 and abs(total - (0.6 + 1.0)) < 1e-9


def test_the_prefix_benchmarks_tree_has_three_levels_and_its_ideal_computes_each_block_once():
    import numpy as np

    from batch_gateway.runner.prefix import MAX_BLOCKS, plan_order, prefix_key, shared_depths
    from benchmarks.prefix import ideal_hit_rate, shared_blocks, tree_bodies

    bodies = tree_bodies(systems=2, shots=3, questions=4)
    keys = np.array(
        [(k := prefix_key("/v1/chat/completions", b)) + (0,) * (MAX_BLOCKS - len(k)) for b in bodies], dtype=np.uint64
    )
    depths = shared_depths(keys, plan_order(keys))
    # Per system prompt: one tree; under it, each few-shot block shares less than its questions do.
    assert sorted(set(depths.tolist())) == [0, 3, 4] and list(depths).count(0) == 2
    assert list(depths).count(3) == 2 * 2 and list(depths).count(4) == 2 * 3 * 3
    # Computing each block once: the same prompt twice is all hits the second time (bar its last block).
    twice = [bodies[0], bodies[0]]
    assert 0.4 < ideal_hit_rate(twice, 16) < 0.5 and shared_blocks(twice, 16) > 0


def test_a_measured_phase_has_the_same_requests_whatever_warm_up_came_before_it():
    from benchmarks.loadgen import arrivals

    def window(warm_up: float) -> list[tuple[float, int]]:
        return [
            (round(at - warm_up, 9), i) for at, i in arrivals([(warm_up, 20.0), (30.0, 20.0)], seed=11) if at >= warm_up
        ]

    short, long = window(4.0), window(15.0)
    assert len(short) > 400 and short == long
    # Another draw: the same moments, bodies of its own (an engine's prompt cache must not serve one run another's).
    other = list(arrivals([(4.0, 20.0), (30.0, 20.0)], seed=11, draw=3))
    mine = list(arrivals([(4.0, 20.0), (30.0, 20.0)], seed=11))
    assert [at for at, _ in other] == [at for at, _ in mine] and not {i for _, i in other} & {i for _, i in mine}
    # Each phase lasts its length at its rate, a phase of rate 0 included, and a phase of 0 s keeps the places after it.
    sent = list(arrivals([(10.0, 0.0), (10.0, 50.0)], seed=3))
    assert all(10.0 <= at < 20.0 for at, _ in sent) and 400 < len(sent) < 600
    assert [(round(at - 10.0, 9), i) for at, i in sent] == [
        (round(at, 9), i) for at, i in arrivals([(0.0, 7.0), (10.0, 50.0)], seed=3)
    ]


def test_a_ratio_judged_against_a_bound_shows_the_decimals_that_tell_it_from_the_bound():
    assert times(1.29, 1.3) == "1.29×"
    assert times(1.3003, 1.3) == "1.3003×"  # missed, by a hair: not "1.30×"
    assert times(1.296, 1.3) == "1.296×"  # met, by a hair
