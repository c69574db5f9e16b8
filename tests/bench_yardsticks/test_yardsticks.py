"""The benchmarks' own yardsticks: the peer's AIMD limit, and reading the engine's inter-token latency from /metrics."""

from __future__ import annotations

from batch_gateway.sim import SimConfig
from batch_gateway.sim.engine import Engine
from batch_gateway.sim.metrics import render
from benchmarks.harness import token_latency_totals
from benchmarks.peer import Aimd


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
