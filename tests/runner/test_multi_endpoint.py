"""Several upstream pods for one model: prefix groups stick to one pod (its cache stays warm) and pods share the
work."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.runner.stack import create_batch, results, run_stats, start_runner

pytestmark = pytest.mark.process

SYSTEM = "You are the assistant of team {g}. Follow the team handbook. " * 12


def grouped(groups: int, per_group: int) -> bytes:
    lines = [
        {
            "custom_id": f"g{g}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "sim-model",
                "max_tokens": 8,
                "messages": [{"role": "system", "content": SYSTEM.format(g=g)}, {"role": "user", "content": f"q{i}"}],
            },
        }
        for g in range(groups)
        for i in range(per_group)
    ]
    random.Random(4).shuffle(lines)
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def test_groups_stick_to_one_endpoint_and_both_endpoints_work(tmp_path):
    config = SimConfig(time_scale=0.2, max_num_seqs=8)
    with SimServer(config) as a, SimServer(config) as b:
        settings = Settings(data_dir=str(tmp_path), upstream=[f"sim-model={a.url},{b.url}"], log_format="json")
        batch_id = asyncio.run(create_batch(settings, grouped(groups=12, per_group=10)))
        with open(tmp_path / "runner.log", "ab") as log:
            assert start_runner(settings, batch_id, log).wait(120) == 0
        batch, out, err = asyncio.run(results(settings, batch_id))
        stats = [httpx.get(s.url + "/sim/stats").json() for s in (a, b)]
        warm_ups = asyncio.run(run_stats(settings, batch_id))["prefix_warm_ups"]
    assert batch.status == "completed" and len(out) == 120 and not err
    assert all(s["completed"] >= 20 for s in stats), [s["completed"] for s in stats]
    # Each line once, besides one warm-up per group and endpoint it went to (a group joined by the other endpoint is
    # warmed there too).
    assert 12 <= warm_ups <= 24
    assert stats[0]["completed"] + stats[1]["completed"] == 120 + warm_ups
    # Affinity: each group's prefix is computed on one endpoint only, so both caches stay hot.
    for s in stats:
        assert s["prefix_cache_hit_rate"] > 0.75, s
