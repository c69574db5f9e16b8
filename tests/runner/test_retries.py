"""Transient failures are retried (honouring Retry-After) within a per-batch budget; requests that give up get a
clear final error line, and a dead upstream cannot stall a batch."""

from __future__ import annotations

import asyncio
import time

import httpx

from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.helpers import chat_lines, free_port
from tests.runner.stack import create_batch, results, start_runner


def run(tmp_path, upstream: str, lines: int, **settings) -> tuple:
    config = Settings(data_dir=str(tmp_path), upstream=[upstream], log_format="json", **settings)
    batch_id = asyncio.run(create_batch(config, chat_lines(lines)))
    started = time.monotonic()
    with open(tmp_path / "runner.log", "ab") as log:
        assert start_runner(config, batch_id, log).wait(120) == 0
    return (*asyncio.run(results(config, batch_id)), time.monotonic() - started)


def test_transient_errors_are_retried_until_they_succeed(tmp_path):
    with SimServer(SimConfig(time_scale=0.02, error_rate_429=0.3, error_rate_503=0.2, seed=5)) as sim:
        batch, out, err, _ = run(tmp_path, sim.url, 30, max_attempts=10)
        served = httpx.get(sim.url + "/sim/stats").json()
    assert batch.status == "completed" and len(out) == 30 and not err
    assert served["injected"]["429"] + served["injected"]["503"] > 0  # failures really happened


def test_retry_budget_bounds_a_failing_upstream(tmp_path):
    with SimServer(SimConfig(time_scale=0.02, error_rate_503=1.0)) as sim:
        batch, out, err, seconds = run(tmp_path, sim.url, 150, max_attempts=5, retry_budget=0.1)
        served = httpx.get(sim.url + "/sim/stats").json()
    assert batch.status == "completed" and not out and len(err) == 150
    assert all(line["response"]["status_code"] == 503 for line in err)
    retries = served["injected"]["503"] - 150
    assert retries <= 100  # the budget: max(100, 10% of 150)


def test_dead_upstream_ends_every_request_with_a_clear_error(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    batch, out, err, seconds = run(tmp_path, dead, 20, max_attempts=3)
    assert batch.status == "completed" and not out and len(err) == 20
    for line in err:
        assert line["response"] is None
        assert line["error"]["code"] == "upstream_unreachable"
        assert "no response" in line["error"]["message"]
    assert seconds < 60
