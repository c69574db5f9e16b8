"""What each kind of upstream failure does to a line.

- "Not now" (no connection, a reset, 429, 502-504) is waited for: an upstream that is down for a while costs no line,
  and a dead one holds its lines until the batch ends (then they are `batch_expired`), never `upstream_unreachable`.
- A 500 (or a timeout) is retried a few times within a per-batch budget, then reported with the upstream's answer.
"""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import httpx
import pytest

from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.fixtures.proxy import Proxy
from tests.helpers import chat_lines, free_port
from tests.runner.stack import create_batch, results, start_runner

pytestmark = pytest.mark.process


def run(tmp_path, upstream: str, lines: int, *, expires_in: int = 86400, during=None, **settings) -> tuple:
    """Run a batch with the real runner process; `during(runner)` runs in a thread while it works."""
    config = Settings(data_dir=str(tmp_path), upstream=[upstream], log_format="json", **settings)
    batch_id = asyncio.run(create_batch(config, chat_lines(lines), expires_in=expires_in))
    started = time.monotonic()
    with open(tmp_path / "runner.log", "ab") as log:
        runner = start_runner(config, batch_id, log)
        if during is not None:
            threading.Thread(target=during, args=(runner,), daemon=True).start()
        try:
            assert runner.wait(120) == 0, (tmp_path / "runner.log").read_text()
        except subprocess.TimeoutExpired:
            runner.kill()
            raise
    return (*asyncio.run(results(config, batch_id)), time.monotonic() - started)


def test_transient_errors_are_retried_until_they_succeed(tmp_path):
    with SimServer(SimConfig(time_scale=0.02, error_rate_429=0.3, error_rate_503=0.2, seed=5)) as sim:
        batch, out, err, _ = run(tmp_path, sim.url, 30, max_attempts=10)
        served = httpx.get(sim.url + "/sim/stats").json()
    assert batch.status == "completed" and len(out) == 30 and not err
    assert served["injected"]["429"] + served["injected"]["503"] > 0  # failures really happened


def test_not_now_answers_use_up_no_attempts(tmp_path):
    # Half of all answers are 503: with 2 attempts per line, lines would fail if "not now" counted as an attempt.
    with SimServer(SimConfig(time_scale=0.02, error_rate_503=0.5, seed=3)) as sim:
        batch, out, err, _ = run(tmp_path, sim.url, 40, max_attempts=2)
        served = httpx.get(sim.url + "/sim/stats").json()
    assert batch.status == "completed" and len(out) == 40 and not err
    assert served["injected"]["503"] >= 20


def test_server_errors_are_retried_within_the_budget_then_reported(tmp_path):
    with SimServer(SimConfig(time_scale=0.02, error_rate_500=1.0)) as sim:
        # Without prefix warm-ups: this counts what the lines themselves sent.
        batch, out, err, _ = run(tmp_path, sim.url, 150, max_attempts=5, retry_budget=0.1, prefix_warm_up=False)
        served = httpx.get(sim.url + "/sim/stats").json()
    assert batch.status == "completed" and not out and len(err) == 150
    assert all(line["response"]["status_code"] == 500 for line in err)
    retries = served["injected"]["500"] - 150
    assert 0 < retries <= 100  # the budget: max(100, 10% of 150)


def test_an_upstream_down_for_a_few_seconds_costs_no_line(tmp_path):
    with SimServer(SimConfig(time_scale=0.05, max_num_seqs=8)) as sim, Proxy(("127.0.0.1", sim.port)) as proxy:

        def outage(runner: subprocess.Popen) -> None:
            while httpx.get(sim.url + "/sim/stats").json()["completed"] < 20:
                time.sleep(0.05)
            proxy.down()  # refused, and in-flight requests cut: a vLLM pod restarting
            time.sleep(3)
            proxy.up()

        batch, out, err, _ = run(tmp_path, f"http://127.0.0.1:{proxy.port}", 200, max_attempts=2, during=outage)
    assert batch.status == "completed", batch
    assert not err
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(200))
    assert "runner.upstream_unavailable" in (tmp_path / "runner.log").read_text()


def test_a_dead_upstream_holds_its_lines_until_the_batch_expires(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    batch, out, err, seconds = run(tmp_path, dead, 20, max_attempts=3, expires_in=4, cancel_grace=0.5)
    assert batch.status == "expired" and not out and len(err) == 20
    for line in err:
        assert line["response"] is None and line["error"]["code"] == "batch_expired"
    assert 3 <= seconds < 30


def test_a_proxy_error_page_reaches_the_operator_not_the_tenant(tmp_path):
    from aiohttp import web

    from tests.runner.stack import upstream_server

    async def refuse(request: web.Request) -> web.Response:
        page = "<html><body>400 Bad Request from backend vllm-7.internal:8000 (10.4.2.19)</body></html>"
        return web.Response(status=400, text=page, content_type="text/html")

    with upstream_server(refuse) as url:
        batch, out, err, _ = run(tmp_path, url, 3)
    assert batch.status == "completed" and not out and len(err) == 3
    for line in err:
        assert line["response"]["status_code"] == 400
        message = line["response"]["body"]["error"]["message"]
        assert "not a JSON object" in message and "10.4.2.19" not in message and "internal" not in message
    assert "10.4.2.19" in (tmp_path / "runner.log").read_text()  # for the operator
