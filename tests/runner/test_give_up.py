"""The runner that gives up a batch whose runners kept crashing (`--give-up`): it publishes every result they left
in checkpoints, lists every other line in the error file, and ends the batch `failed`, or `cancelled` if its tenant
cancelled it meanwhile (a cancelled batch ends cancelled, whatever its runners did)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from batch_gateway import ids, wire
from batch_gateway.services import Services
from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.helpers import chat_lines
from tests.runner.stack import create_batch, results, start_runner

pytestmark = pytest.mark.process

LINES = 120


async def completed(settings: Settings, batch_id: str) -> int:
    batch, _, _ = await results(settings, batch_id)
    return batch.request_counts.completed


async def cancel(settings: Settings, batch_id: str) -> None:
    services = await Services.open(settings)
    try:
        moved = await services.metadata.transition(
            batch_id, [wire.BatchStatus.IN_PROGRESS], wire.BatchStatus.CANCELLING, ids.now()
        )
        assert moved is not None
    finally:
        await services.close()


@pytest.mark.parametrize(
    ("cancelled", "ended", "code"), [(False, "failed", "batch_failed"), (True, "cancelled", "batch_cancelled")]
)
def test_giving_up_publishes_what_finished_and_ends_as_the_tenant_asked(tmp_path, cancelled, ended, code):
    with SimServer(SimConfig(time_scale=1.0, max_num_seqs=2, seed=3)) as sim:
        settings = Settings(
            data_dir=str(tmp_path),
            upstream=[sim.url],
            checkpoint_interval=0.2,
            runner_lease_seconds=2,  # the killed runner's lease, waited out by the one that gives up
            fixed_concurrency=2,
            log_format="json",
        )
        batch_id = asyncio.run(create_batch(settings, chat_lines(LINES, systems=3, max_tokens=16)))
        with open(tmp_path / "runner.log", "ab") as log:
            runner = start_runner(settings, batch_id, log)
            deadline = time.monotonic() + 60
            while asyncio.run(completed(settings, batch_id)) < 10:
                assert runner.poll() is None and time.monotonic() < deadline, "no progress saved"
                time.sleep(0.2)
            runner.send_signal(signal.SIGKILL)  # a crash it cannot checkpoint for
            runner.wait()
            if cancelled:
                asyncio.run(cancel(settings, batch_id))
            assert start_runner(settings, batch_id, log, "--give-up", "crashed").wait(60) == 0
    batch, out, err = asyncio.run(results(settings, batch_id))
    assert batch.status == ended
    assert len(out) >= 10 and {line["error"]["code"] for line in err} == {code}
    assert sorted(line["custom_id"] for line in out + err) == sorted(f"req-{i}" for i in range(LINES))
    assert (batch.request_counts.completed, batch.request_counts.failed) == (len(out), len(err))
    if cancelled:
        assert not batch.errors
    else:
        assert batch.errors and batch.errors[0].code == "runner_failed" and batch.errors[0].message == "crashed"
