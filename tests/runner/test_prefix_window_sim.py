"""The prefix window against the simulator over real HTTP: with a cache that holds a few of a batch's prompts, the real
runner keeps its followers' hits near the ideal, whether it reads the cache's size from /metrics or learns it."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from batch_gateway.sim.requests import _chat_text
from batch_gateway.sim.tokens import prompt_from_text
from tests.runner.stack import create_batch, results, run_stats, start_runner

GROUPS, PER_GROUP = 40, 6
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]


def ideal_hit_rate(data: bytes, block_size: int) -> float:
    """Each distinct block computed once (an unbounded cache), with the simulator's own tokens and blocks; at least
    one token of every prompt is computed."""
    seen: set[bytes] = set()
    hits = queries = 0
    for line in data.splitlines():
        prompt = prompt_from_text(_chat_text(json.loads(line)["body"]["messages"]), block_size)
        found = 0
        for block in prompt.block_hashes[: (prompt.tokens - 1) // block_size]:
            if block not in seen:
                break
            found += 1
        seen.update(prompt.block_hashes)
        hits += found * block_size
        queries += prompt.tokens
    return hits / queries


def grouped() -> bytes:
    """40 groups of 6 requests sharing a ~400-token system prompt, each with its own short question; shuffled."""
    rng = random.Random(11)
    systems = [f"You are assistant {g}. " + " ".join(rng.choice(WORDS) for _ in range(250)) for g in range(GROUPS)]
    lines = [
        {
            "custom_id": f"g{g}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "sim-model",
                "max_tokens": 4,
                "messages": [{"role": "system", "content": systems[g]}, {"role": "user", "content": f"question {i}"}],
            },
        }
        for g in range(GROUPS)
        for i in range(PER_GROUP)
    ]
    rng.shuffle(lines)
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


@pytest.mark.parametrize(
    "hide_cache_info,warm_up",
    [(False, True), (True, True), (False, False)],
    ids=["size_read", "size_learnt", "size_read_no_warm_ups"],
)
def test_a_small_cache_keeps_most_of_the_ideal_hit_rate(tmp_path, hide_cache_info, warm_up):
    # Each prompt is 24 blocks of 16 tokens; the prefix cache keeps 160 blocks: about 6 of the 40 prompts.
    config = SimConfig(time_scale=0.2, max_num_seqs=32, cache_blocks=160, hide_cache_info=hide_cache_info)
    data = grouped()
    with SimServer(config) as sim:
        settings = Settings(data_dir=str(tmp_path), upstream=[sim.url], log_format="json", prefix_warm_up=warm_up)
        batch_id = asyncio.run(create_batch(settings, data))
        with open(tmp_path / "runner.log", "ab") as log:
            assert start_runner(settings, batch_id, log).wait(180) == 0
        batch, out, err = asyncio.run(results(settings, batch_id))
        stats = httpx.get(sim.url + "/sim/stats").json()
        dispatch = asyncio.run(run_stats(settings, batch_id))
        window = next(iter(dispatch["endpoints"].values()))["prefix_window"]
    assert batch.status == "completed" and len(out) == GROUPS * PER_GROUP and not err
    # With warm-ups, each group's head first went as a one-token copy; the engine served those besides the lines.
    warm_ups = dispatch["prefix_warm_ups"]
    assert (warm_ups >= GROUPS if warm_up else warm_ups == 0) and not dispatch["prefix_warm_ups_failed"]
    assert stats["completed"] == GROUPS * PER_GROUP + warm_ups
    ideal = ideal_hit_rate(data, config.block_size)
    assert stats["prefix_cache_hit_rate"] >= 0.85 * ideal, (stats["prefix_cache_hit_rate"] / ideal, window)
    assert window["mode"] == ("learnt" if hide_cache_info else "cache_size"), window
