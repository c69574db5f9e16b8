"""The one-token copy of a group's head that warms its prefix (batch_gateway/runner/warm_up.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from batch_gateway.runner.dispatch import WARM_UP_MISSES
from batch_gateway.runner.warm_up import warm_up_body
from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.helpers import chat_lines
from tests.runner.stack import create_batch, results, run_stats, start_runner


def warm(path: str, body: dict) -> dict | None:
    out = warm_up_body(path, json.dumps(body).encode())
    return None if out is None else json.loads(out)


def test_the_copy_keeps_the_prompt_and_generates_one_token():
    chat = {
        "model": "m",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "max_completion_tokens": 500,
        "n": 3,
        "min_tokens": 20,
        "stream": True,
        "temperature": 0.2,
    }
    copy = warm("/v1/chat/completions", chat)
    assert copy == {
        "model": "m",
        "messages": chat["messages"],
        "tools": chat["tools"],
        "max_completion_tokens": 1,
        "temperature": 0.2,
    }
    assert warm("/v1/chat/completions", {"model": "m", "messages": []})["max_tokens"] == 1  # no limit given
    both = warm("/v1/chat/completions", {"model": "m", "messages": [], "max_tokens": 9, "max_completion_tokens": 9})
    assert both["max_tokens"] == both["max_completion_tokens"] == 1
    assert warm("/v1/completions", {"model": "m", "prompt": "p", "best_of": 4, "max_tokens": 64}) == {
        "model": "m",
        "prompt": "p",
        "max_tokens": 1,
    }
    assert warm("/v1/responses", {"model": "m", "input": "i", "max_output_tokens": 64, "background": True}) == {
        "model": "m",
        "input": "i",
        "max_output_tokens": 1,
        "store": False,
    }


def test_no_copy_where_none_is_needed_or_the_body_is_not_an_object():
    assert warm("/v1/embeddings", {"model": "m", "input": "i"}) is None  # answered once the prompt is computed
    assert warm_up_body("/v1/chat/completions", b"[1, 2]") is None
    assert warm_up_body("/v1/chat/completions", b"{not json") is None


@pytest.mark.process
def test_an_endpoint_whose_warm_ups_keep_failing_gets_no_more(tmp_path):
    # Every request fails: after WARM_UP_MISSES failed warm-ups in a row the runner stops sending them (those already
    # in flight still count), so a failing engine is not given a second request per group.
    lines = 80
    with SimServer(SimConfig(time_scale=0.02, error_rate_500=1.0)) as sim:
        settings = Settings(data_dir=str(tmp_path), upstream=[sim.url], log_format="json", max_attempts=1)
        batch_id = asyncio.run(create_batch(settings, chat_lines(lines, systems=40)))
        with open(tmp_path / "runner.log", "ab") as log:
            assert start_runner(settings, batch_id, log).wait(120) == 0
        batch, out, err = asyncio.run(results(settings, batch_id))
        stats = asyncio.run(run_stats(settings, batch_id))
    assert batch.status == "completed" and not out and len(err) == lines
    assert (
        WARM_UP_MISSES
        <= stats["prefix_warm_ups"]
        == stats["prefix_warm_ups_failed"]
        <= 2 * settings.initial_concurrency
    )
    assert (tmp_path / "runner.log").read_text().count('"runner.prefix_warm_ups_stopped"') == 1
