"""Priority hints: llm-d's inference gateway headers and vLLM's request priority, spliced into the body's bytes."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from batch_gateway.runner.hints import Hints, hints_for, parse_hints, with_priority
from batch_gateway.settings import Settings
from tests.helpers import chat_lines
from tests.runner.stack import create_batch, results, start_runner, upstream_server


def test_parse_hints_per_model():
    by_model = parse_hints(["llm-d", "llama=vllm-priority:5,llm-d:bulk"])
    assert hints_for(by_model, "other") == Hints(llm_d_objective="batch")
    assert hints_for(by_model, "llama") == Hints(llm_d_objective="bulk", vllm_priority=5)
    assert hints_for(parse_hints([]), "llama") == Hints()
    assert parse_hints(["vllm-priority"])["*"].vllm_priority == 10
    for bad in ("fast-lane", "vllm-priority:high"):
        with pytest.raises(ValueError, match="priority-hints"):
            parse_hints([bad])


def test_priority_is_spliced_into_the_bytes_and_the_rest_is_untouched():
    body = b'{"model": "m", "n": 12345678901234567890, "text": "caf\\u00e9"}'
    spliced = with_priority(body, 10)
    assert spliced == b'{"priority":10,"model": "m", "n": 12345678901234567890, "text": "caf\\u00e9"}'
    assert json.loads(spliced)["priority"] == 10
    assert with_priority(b"  {}", 3) == b'{"priority":3}'
    own = b'{"priority": -5, "model": "m"}'
    assert with_priority(own, 10) == own  # a line that sets its own priority keeps it


def test_llm_d_headers_name_the_objective_the_tenant_and_the_time_left():
    body, headers = Hints(llm_d_objective="batch").apply(b'{"a": 1}', tenant="acme", expires_at=1000.0, now=940.5)
    assert body == b'{"a": 1}'
    assert headers == {
        "x-gateway-inference-objective": "batch",
        "x-gateway-inference-fairness-id": "acme",
        "x-slo-ttft-ms": "59500",
    }


@pytest.mark.process
def test_the_runner_sends_the_hints_it_was_asked_for_and_nothing_else(tmp_path):
    """Through the real runner process, against a server that records what it receives."""
    seen: list[tuple[dict[str, str], bytes]] = []

    async def complete(request: web.Request) -> web.Response:
        body = await request.read()
        if body != b"{}":  # the runner's probe of what the upstream serves carries no batch line
            seen.append((dict(request.headers), body))
        return web.json_response(
            {
                "id": "c",
                "object": "chat.completion",
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )

    with upstream_server(complete) as url:
        settings = Settings(
            data_dir=str(tmp_path), upstream=[url], log_format="json", priority_hints=["llm-d:bulk,vllm-priority:7"]
        )
        batch_id = asyncio.run(create_batch(settings, chat_lines(5)))
        with open(tmp_path / "runner.log", "ab") as log:
            assert start_runner(settings, batch_id, log).wait(60) == 0
        batch, out, _ = asyncio.run(results(settings, batch_id))
    # Lines 0 and 4 share a system prompt: their group's head went first as a one-token warm-up, with the same hints.
    assert batch.status == "completed" and len(out) == 5 and len(seen) == 6
    assert sum(b'"max_tokens":1}' in body for _, body in seen) == 1
    for headers, body in seen:
        assert headers["x-gateway-inference-objective"] == "bulk"
        assert headers["x-gateway-inference-fairness-id"] == "t"
        assert 86_000_000 < int(headers["x-slo-ttft-ms"]) <= 86_400_000
        assert body.startswith(b'{"priority":7,"model":')
