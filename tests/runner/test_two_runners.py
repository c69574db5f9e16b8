"""Two runners started for the same batch (a double submit, a retried Workflow): only one runs it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.helpers import chat_lines
from tests.runner.stack import create_batch, results, start_runner

pytestmark = pytest.mark.process


def test_only_one_of_two_simultaneous_runners_runs_the_batch(tmp_path):
    with SimServer(SimConfig(time_scale=0.2, max_num_seqs=8)) as sim:
        # Without prefix warm-ups: this counts what the lines themselves sent.
        settings = Settings(
            data_dir=str(tmp_path), upstream=[sim.url], log_format="json", runner_lease_seconds=5, prefix_warm_up=False
        )
        batch_id = asyncio.run(create_batch(settings, chat_lines(60, max_tokens=8)))
        with open(tmp_path / "runners.log", "ab") as log:
            first, second = start_runner(settings, batch_id, log), start_runner(settings, batch_id, log)
            assert first.wait(120) == 0 and second.wait(120) == 0
        served = httpx.get(sim.url + "/sim/stats").json()["requests"]
        batch, out, err = asyncio.run(results(settings, batch_id))
    assert batch.status == "completed" and not err
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(60))
    assert served == 60, "both runners sent requests"
    log_text = (tmp_path / "runners.log").read_text()
    assert log_text.count('"runner.dispatching"') == 1
