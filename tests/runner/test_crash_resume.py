"""Kill the runner with SIGKILL at many random moments; the batch still ends with every line exactly once, and
with the same results as an uninterrupted run (ignoring ids and timestamps)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import httpx
import pytest

from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.helpers import chat_lines
from tests.runner.stack import create_batch, results, start_runner

pytestmark = pytest.mark.process

LINES = 240


def normalise(lines: list[dict]) -> dict[str, tuple]:
    """custom_id → what must not depend on crashes: status and the generated content."""
    out = {}
    for line in lines:
        body = line["response"]["body"]
        out[line["custom_id"]] = (
            line["response"]["status_code"],
            body["choices"][0]["message"]["content"],
            body["usage"]["completion_tokens"],
        )
    return out


@pytest.fixture
def sim():
    with SimServer(SimConfig(time_scale=0.5, max_num_seqs=8, seed=2)) as server:
        yield server


def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path, sim):
    data = chat_lines(LINES, systems=6, max_tokens=12)
    base = dict(
        upstream=[sim.url], checkpoint_interval=0.3, runner_lease_seconds=2, log_format="json", fixed_concurrency=8
    )

    reference_settings = Settings(data_dir=str(tmp_path / "reference"), **base)
    reference_id = asyncio.run(create_batch(reference_settings, data))
    with open(tmp_path / "reference.log", "ab") as log:
        assert start_runner(reference_settings, reference_id, log).wait(120) == 0
    reference, ref_out, ref_err = asyncio.run(results(reference_settings, reference_id))
    assert reference.status == "completed" and len(ref_out) == LINES and not ref_err

    served_before = httpx.get(sim.url + "/sim/stats").json()["requests"]
    settings = Settings(data_dir=str(tmp_path / "crashy"), **base)
    batch_id = asyncio.run(create_batch(settings, data))
    rng = random.Random(int(os.environ.get("CRASH_SEED", "11")))
    kills = 0
    with open(tmp_path / "crashy.log", "ab") as log:
        process = start_runner(settings, batch_id, log)
        while kills < 8:
            time.sleep(rng.choice([0.05, 0.2, 0.5, 1.0, 1.5]) * rng.random() + 0.02)
            if process.poll() is not None:
                break
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            process = start_runner(settings, batch_id, log)
        assert process.wait(180) == 0
    batch, out, err = asyncio.run(results(settings, batch_id))
    assert kills >= 3, "the batch finished before the test could kill it often enough"
    assert batch.status == "completed", batch
    assert not err
    custom_ids = [line["custom_id"] for line in out]
    assert len(custom_ids) == len(set(custom_ids)) == LINES
    assert normalise(out) == normalise(ref_out)
    assert batch.request_counts.completed == LINES and batch.request_counts.failed == 0

    resent = httpx.get(sim.url + "/sim/stats").json()["requests"] - served_before - LINES
    print(f"{kills} kills, {resent} requests re-sent")
    assert resent <= kills * 8 + kills * 8 * 2, "each kill may only redo what was in flight or not yet checkpointed"
