"""The simulator over real HTTP: OpenAI shapes, the honest prefix cache, the knee, failure injection, metrics."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batch_gateway.sim import SimConfig, SimServer

SYSTEM = "You are a careful assistant. " * 40  # ~280 tokens: many full cache blocks


@pytest.fixture
def sim():
    with SimServer(SimConfig(time_scale=0.05, seed=1)) as server:
        yield server


def chat(system: str, user: str, max_tokens: int = 4) -> dict:
    return {"model": "sim-model", "max_tokens": max_tokens, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}


def test_openai_shapes(sim):
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="x")
    completion = client.chat.completions.create(**chat("hi", "there", max_tokens=6))
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.usage.completion_tokens == 6 and completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    text = client.completions.create(model="sim-model", prompt="Once upon a time", max_tokens=3)
    assert text.object == "text_completion" and text.usage.completion_tokens == 3
    embedding = client.embeddings.create(model="sim-model", input=["a", "b"])
    assert len(embedding.data) == 2 and len(embedding.data[0].embedding) == 8
    assert [m.id for m in client.models.list()] == ["sim-model"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**{**chat("a", "b"), "model": "nope"})
    assert caught.value.code == "model_not_found"
    assert httpx.get(sim.url + "/health").status_code == 200


def test_prefix_cache_reuses_blocks_only_after_the_step_that_computed_them(sim):
    async def run():
        async with httpx.AsyncClient(base_url=sim.url) as http:
            # Sent together: admitted in the same step, so both compute the prefix.
            first = await asyncio.gather(*(http.post("/v1/chat/completions", json=chat(SYSTEM, f"q{i}")) for i in range(2)))
            # Sent after they finished: the prefix is cached now.
            later = await http.post("/v1/chat/completions", json=chat(SYSTEM, "q9"))
            return [r.json()["usage"] for r in first], later.json()["usage"]

    together, later = asyncio.run(run())
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in together] == [0, 0]
    assert later["prompt_tokens_details"]["cached_tokens"] >= later["prompt_tokens"] - 32
    stats = httpx.get(sim.url + "/sim/stats").json()
    assert stats["prefix_cache_hits"] == later["prompt_tokens_details"]["cached_tokens"]


def test_knee_waiting_queue_and_throughput():
    config = SimConfig(max_num_seqs=4, time_scale=0.05)

    async def burst(url: str, concurrency: int) -> float:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            started = time.monotonic()
            await asyncio.gather(*(http.post("/v1/chat/completions", json=chat("s", str(i), max_tokens=20)) for i in range(concurrency)))
            return concurrency / (time.monotonic() - started)

    with SimServer(config) as server:
        at_knee = asyncio.run(burst(server.url, 4))
        beyond = asyncio.run(burst(server.url, 16))

        async def peek() -> int:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                tasks = [asyncio.create_task(http.post("/v1/chat/completions", json=chat("s", str(i), max_tokens=50))) for i in range(10)]
                await asyncio.sleep(0.05)
                waiting = (await http.get("/sim/stats")).json()["waiting"]
                await asyncio.gather(*tasks)
                return waiting

        assert asyncio.run(peek()) == 6
    assert beyond < at_knee * 1.3  # past the knee throughput is flat; only the queue grows


def test_failure_injection_rates(sim_config=None):
    with SimServer(SimConfig(time_scale=0.01, error_rate_429=0.2, error_rate_503=0.1, seed=3)) as server:
        statuses = [httpx.post(server.url + "/v1/chat/completions", json=chat("s", "u", 1)).status_code for _ in range(300)]
        retry_after = httpx.post(server.url + "/v1/chat/completions", json=chat("s", "u", 1))
    assert 40 <= statuses.count(429) <= 80
    assert 15 <= statuses.count(503) <= 45
    assert statuses.count(200) + statuses.count(429) + statuses.count(503) == 300


def test_metrics_have_vllm_names(sim):
    httpx.post(sim.url + "/v1/chat/completions", json=chat("s", "u"))
    text = httpx.get(sim.url + "/metrics").text
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
            "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"} <= names


def test_synthetic_interactive_load_takes_slots():
    with SimServer(SimConfig(max_num_seqs=4, time_scale=0.05)) as server:
        httpx.post(server.url + "/sim/load", json={"sequences": 3})
        time.sleep(0.1)
        assert httpx.get(server.url + "/sim/stats").json()["running"] == 3
        httpx.post(server.url + "/sim/load", json={"sequences": 0})
        time.sleep(0.1)
        assert httpx.get(server.url + "/sim/stats").json()["running"] == 0
