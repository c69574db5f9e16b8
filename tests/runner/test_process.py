"""The runner as a process: what must never stop it from running its batch."""

from __future__ import annotations

import asyncio
import socket

import pytest

from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.helpers import chat_lines
from tests.runner.stack import create_batch, results, start_runner

pytestmark = pytest.mark.process


def test_a_busy_metrics_port_costs_the_metrics_not_the_batch(tmp_path):
    with socket.socket() as taken, SimServer(SimConfig(time_scale=0.02)) as sim:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]  # another runner on this host serves its metrics here
        settings = Settings(data_dir=str(tmp_path), upstream=[sim.url], log_format="json", runner_metrics_port=port)
        batch_id = asyncio.run(create_batch(settings, chat_lines(5)))
        with open(tmp_path / "runner.log", "ab") as log:
            assert start_runner(settings, batch_id, log).wait(60) == 0, (tmp_path / "runner.log").read_text()
        batch, out, _ = asyncio.run(results(settings, batch_id))
    assert batch.status == "completed" and len(out) == 5
    assert "runner.metrics_port_unavailable" in (tmp_path / "runner.log").read_text()
