"""Two real runners on one simulated engine, one batch with a tight deadline and one with a day to spare: the tight one
takes the share of the engine it needs (runner/deadline.py, through the load board) and ends in time, where an equal
share would have made it expire."""

from __future__ import annotations

import asyncio
import datetime
import json
import time

import pytest

from batch_gateway.services import Services
from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.helpers import chat_lines
from tests.runner.stack import create_batch, results, run_stats, start_runner

# Real runner processes beside a simulator, for tens of seconds.
pytestmark = pytest.mark.process

LINES = 1000  # about 12 s of the whole engine (16 sequences of ~0.19 s): 24 s at an equal share
TIGHT = 20  # seconds: the tight batch needs about 60% of the engine


async def progress(settings: Settings, batch_ids: list[str]):
    services = await Services.open(settings)
    try:
        return [await services.metadata.get_batch(b, None) for b in batch_ids]
    finally:
        await services.close()


def test_a_batch_that_would_miss_its_deadline_at_an_equal_share_gets_more_and_ends_in_time(tmp_path):
    with SimServer(SimConfig(time_scale=1.0, max_num_seqs=16)) as sim:
        settings = Settings(data_dir=str(tmp_path), upstream=[sim.url], log_format="json")
        loose = asyncio.run(create_batch(settings, chat_lines(LINES, max_tokens=16, prefix="loose")))
        tight = asyncio.run(create_batch(settings, chat_lines(LINES, max_tokens=16, prefix="tight"), expires_in=TIGHT))
        with open(tmp_path / "runners.log", "ab") as log:
            runners = [start_runner(settings, loose, log), start_runner(settings, tight, log)]
            loose_done_then = None
            deadline = time.monotonic() + 120
            while loose_done_then is None and time.monotonic() < deadline:
                tight_batch, loose_batch = asyncio.run(progress(settings, [tight, loose]))
                if tight_batch.terminal:
                    loose_done_then = loose_batch.request_counts.completed
                time.sleep(0.25)
            assert all(r.wait(120) == 0 for r in runners)
        tight_batch, _, _ = asyncio.run(results(settings, tight))
        loose_batch, _, _ = asyncio.run(results(settings, loose))
        stats = asyncio.run(run_stats(settings, tight))
    log_text = (tmp_path / "runners.log").read_text()
    assert tight_batch.status == "completed", (tight_batch.status, tight_batch.request_counts, log_text[-3000:])
    assert loose_batch.status == "completed"
    # While the tight batch ran, the loose one yielded: at an equal share both would be about done together.
    assert loose_done_then is not None and loose_done_then < 0.7 * LINES, loose_done_then
    assert stats["deadline"]["unreachable"] is False and stats["deadline"]["expires_at"] == tight_batch.expires_at


def test_a_batch_that_cannot_make_its_deadline_even_alone_is_flagged_long_before_it_expires(tmp_path):
    with SimServer(SimConfig(time_scale=1.0, max_num_seqs=16)) as sim:
        settings = Settings(data_dir=str(tmp_path), upstream=[sim.url], log_format="json")
        # About 36 s of the whole engine, in 20 s.
        batch_id = asyncio.run(create_batch(settings, chat_lines(3 * LINES, max_tokens=16), expires_in=20))
        with open(tmp_path / "runner.log", "ab") as log:
            assert start_runner(settings, batch_id, log).wait(120) == 0
        batch, out, err = asyncio.run(results(settings, batch_id))

        async def outbox():
            services = await Services.open(settings)
            try:
                return await services.metadata.claim_webhook_events(time.time() + 60, 30, 10)
            finally:
                await services.close()

        events = asyncio.run(outbox())
    assert batch.status == "expired" and len(out) + len(err) == 3 * LINES
    records = [json.loads(line) for line in (tmp_path / "runner.log").read_text().splitlines() if line.startswith("{")]
    (flagged,) = [r for r in records if r["event"] == "runner.deadline_unreachable"]
    said_at = datetime.datetime.fromisoformat(flagged["timestamp"]).timestamp()
    assert said_at < batch.expires_at - 3, "flagged only at expiry"
    assert flagged["level"] == "error" and flagged["need_share"] > 1
    assert [(e.batch_id, e.type) for e in events] == [
        (batch_id, "batch.deadline_unreachable"),
        (batch_id, "batch.expired"),
    ]
