"""--preempt: when others arrive on the engine, in-flight batch requests beyond the budget are aborted at once and
sent again later; every line still ends exactly once, and the run says how much work was thrown away."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.helpers import chat_lines
from tests.runner.stack import create_batch, results, run_stats, start_runner

pytestmark = pytest.mark.process


def test_preempted_requests_are_sent_again_and_every_line_ends_once(tmp_path):
    with SimServer(SimConfig(time_scale=0.5, max_num_seqs=16)) as sim:
        settings = Settings(data_dir=str(tmp_path), upstream=[sim.url], log_format="json", preempt=True)
        batch_id = asyncio.run(create_batch(settings, chat_lines(300, systems=300, max_tokens=64)))

        def users_arrive() -> None:
            while httpx.get(sim.url + "/sim/stats").json()["running"] < 14:  # the batch has filled the engine
                time.sleep(0.1)
            httpx.post(sim.url + "/sim/load", json={"sequences": 12})
            time.sleep(4)
            httpx.post(sim.url + "/sim/load", json={"sequences": 0})

        with open(tmp_path / "runner.log", "ab") as log:
            runner = start_runner(settings, batch_id, log)
            threading.Thread(target=users_arrive, daemon=True).start()
            assert runner.wait(180) == 0
        batch, out, err = asyncio.run(results(settings, batch_id))
        stats = asyncio.run(run_stats(settings, batch_id))
    assert batch.status == "completed" and not err
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(300))
    assert stats["preempted"] > 0 and stats["preempted_tokens_estimate"] > 0
