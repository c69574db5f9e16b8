"""The engine model over real HTTP: the honest prefix cache, the queue and the knee, KV pressure, chunked prefill."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from batch_gateway.runner.engine_metrics import parse_metrics
from batch_gateway.sim.tokens import BYTES_PER_TOKEN
from tests.helpers import eventually
from tests.sim.conftest import SYSTEM, chat, post_all, send_while_paused, stats

pytestmark = pytest.mark.slow  # the simulator's engine, in real time


def test_same_step_both_miss_a_later_request_hits(start_sim):
    server = start_sim(time_scale=0.05)
    together = send_while_paused(server, [chat("first"), chat("second")])
    assert [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in together] == [0, 0]
    later = httpx.post(server.url + "/v1/chat/completions", json=chat("third")).json()["usage"]
    cached = later["prompt_tokens_details"]["cached_tokens"]
    shared_tokens = len(SYSTEM) // BYTES_PER_TOKEN
    assert cached % 16 == 0 and shared_tokens - 16 <= cached < later["prompt_tokens"]
    counters = stats(server)
    assert counters["prefix_cache_hits"] == cached
    assert (
        counters["prefix_cache_queries"] == sum(r["usage"]["prompt_tokens"] for r in together) + later["prompt_tokens"]
    )
    assert counters["kv_cache_usage"] == 0.0  # nothing running holds blocks; the cached ones are idle


def test_identical_prompt_recomputes_its_last_block_and_reset_forgets(start_sim):
    server = start_sim(time_scale=0.02)
    body = {"model": "sim-model", "prompt": "y" * 64 * 10, "max_tokens": 1}  # exactly 10 blocks of 16 tokens
    first = httpx.post(server.url + "/v1/completions", json=body).json()["usage"]
    second = httpx.post(server.url + "/v1/completions", json=body).json()["usage"]
    assert first["prompt_tokens"] == 160 and first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == 144  # one token must be computed: the last block is
    assert httpx.post(server.url + "/reset_prefix_cache").json()["reset_blocks"] == 10
    third = httpx.post(server.url + "/v1/completions", json=body).json()["usage"]
    assert third["prompt_tokens_details"]["cached_tokens"] == 0


def test_waiting_queue_grows_beyond_max_num_seqs(start_sim):
    server = start_sim(max_num_seqs=4, time_scale=0.05)

    async def run() -> tuple[dict, dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await http.post("/sim/pause")
            sending = [
                asyncio.ensure_future(http.post("/v1/chat/completions", json=chat(str(i), max_tokens=200)))
                for i in range(10)
            ]
            while (await http.get("/sim/stats")).json()["waiting"] < 10:
                await asyncio.sleep(0.005)
            paused = (await http.get("/sim/stats")).json()
            await http.post("/sim/resume")
            while (await http.get("/sim/stats")).json()["running"] < 4:
                await asyncio.sleep(0.002)
            running = (await http.get("/sim/stats")).json()
            responses = await asyncio.gather(*sending)
            assert all(r.status_code == 200 for r in responses)
            return paused, running

    paused, running = asyncio.run(run())
    assert (paused["running"], paused["waiting"]) == (0, 10)
    assert (running["running"], running["waiting"]) == (4, 6)
    final = stats(server)
    assert (final["running"], final["waiting"], final["completed"]) == (0, 0, 10)


def _latency_sums(server) -> tuple[float, float, float]:
    """(sum of end-to-end latency, sum of queue time, count) of the engine's own request histograms, as /metrics
    publishes them."""
    samples = parse_metrics(httpx.get(server.url + "/metrics").text)
    return (
        samples["vllm:e2e_request_latency_seconds_sum"],
        samples["vllm:request_queue_time_seconds_sum"],
        samples["vllm:e2e_request_latency_seconds_count"],
    )


def _closed_loop(server, concurrency: int, per_worker: int) -> tuple[float, float, float]:
    """(output tokens per second of the engine's busy time, the engine's mean request latency, its mean queue time) of
    `concurrency` workers each sending `per_worker` requests in turn.

    All are the engine's own figures, not the client's: the simulator shares this process with the clients, so on a
    busy machine the clients' wall clock measures the CPU and the clients' own time between requests, not the knee."""

    async def worker(http: httpx.AsyncClient, w: int) -> None:
        for i in range(per_worker):
            response = await http.post("/v1/chat/completions", json=chat(f"{w}-{i}", system="s", max_tokens=40))
            assert response.status_code == 200

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await asyncio.gather(*(worker(http, w) for w in range(concurrency)))

    before, sums_before = server.stats(), _latency_sums(server)
    asyncio.run(run())
    after, sums_after = server.stats(), _latency_sums(server)
    tokens = after["generation_tokens"] - before["generation_tokens"]
    e2e, queue, count = (a - b for a, b in zip(sums_after, sums_before, strict=True))
    return tokens / (after["busy_seconds"] - before["busy_seconds"]), e2e / count, queue / count


def test_throughput_knee_at_max_num_seqs(start_sim):
    # 40 steps of ~10 ms per request: a busy client's time between two of its requests stays small beside that, so
    # the engine has the concurrency asked of it (with 2.5 ms steps, eight clients once kept no queue at all).
    server = start_sim(max_num_seqs=4, time_scale=1.0)
    below = _closed_loop(server, 2, 3)
    knee = _closed_loop(server, 4, 3)
    beyond = _closed_loop(server, 8, 3)
    assert knee[0] > 1.5 * below[0]  # below the knee, concurrency buys throughput...
    assert beyond[0] < 1.25 * knee[0]  # ...past it, it does not...
    # ...and only the queue grows. With clients that answer at once, eight workers' requests wait 0.83 of a service
    # time on average (all but the first four wait one); clients slowed by a busy machine leave less of a queue (CI
    # once measured a latency only 1.42 times the knee's), so the bound is a quarter of one, against almost none at
    # the knee.
    assert knee[2] < 0.1 * knee[1]
    assert beyond[2] > 0.25 * knee[1], (knee, beyond)


def test_kv_cache_full_makes_requests_wait_and_preempts(start_sim):
    # 40 blocks of 16 tokens; each request holds ~13 blocks of prompt and grows by 5 more while decoding.
    server = start_sim(kv_blocks=40, max_num_seqs=8, time_scale=0.2)
    bodies = [{"model": "sim-model", "prompt": f"{i} " + "z" * 800, "max_tokens": 80} for i in range(6)]
    seen: list[dict] = []

    async def run() -> list[dict]:
        sending = asyncio.ensure_future(post_all(server.url, bodies, "/v1/completions"))
        async with httpx.AsyncClient(base_url=server.url) as http:
            while not sending.done():
                seen.append((await http.get("/sim/stats")).json())
                await asyncio.sleep(0.01)
        return await sending

    results = asyncio.run(run())
    assert all(r["usage"]["completion_tokens"] == 80 for r in results)
    assert any(s["waiting"] > 0 and s["running"] < 8 for s in seen)  # waiting on KV, not on slots
    assert max(s["kv_cache_usage"] for s in seen) > 0.8
    final = stats(server)
    assert final["preemptions"] > 0 and final["completed"] == 6 and final["kv_cache_usage"] == 0.0
    # As vLLM's prefix_cache_queries: each request's prompt once, not again when it is re-admitted after a preemption.
    assert final["prefix_cache_queries"] == sum(r["usage"]["prompt_tokens"] for r in results)


def test_long_prompt_is_prefilled_in_chunks(start_sim):
    server = start_sim(time_scale=0, max_num_batched_tokens=8192)
    body = {"model": "sim-model", "prompt": list(range(20_000)), "max_tokens": 1}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 200
    assert stats(server)["steps"] == 3  # 8192 + 8192 + 3616 prompt tokens; the last chunk yields the output token


def test_step_costs_follow_the_documented_model(start_sim):
    server = start_sim(
        time_scale=0.25, step_base_ms=40, per_seq_ms=1, prefill_ms_per_token=0.1, context_ms_per_token=0.01
    )
    body = {"model": "sim-model", "prompt": list(range(100)), "max_tokens": 11}
    started = time.monotonic()
    httpx.post(server.url + "/v1/completions", json=body)
    wall = time.monotonic() - started
    # Step 1 prefills 100 tokens (and samples token 1); steps 2..11 decode with 100..109 tokens of context.
    expected_ms = (40 + 1 + 0.1 * 100) + sum(40 + 1 + 0.01 * (100 + k) for k in range(10))
    counters = stats(server)
    assert counters["steps"] == 11
    assert counters["busy_seconds"] == pytest.approx(expected_ms / 1000)
    # The engine sleeps a quarter of the modelled time: at least that, and well short of all of it. The upper bound
    # leaves 0.35 s for a busy machine's scheduling (a CI run once took 0.12 s more than the sleeps).
    assert 0.25 * expected_ms / 1000 <= wall < expected_ms / 1000


def test_client_going_away_aborts_the_request(start_sim):
    server = start_sim(time_scale=1.0, max_num_seqs=1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=1000), timeout=0.2)
    eventually(lambda: stats(server)["aborted"] == 1, timeout=5, interval=0.005)
    assert stats(server)["running"] == 0  # the slot is free again
    assert httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200


def test_interactive_load_takes_slots(start_sim):
    server = start_sim(max_num_seqs=4, time_scale=0.05)
    httpx.post(server.url + "/sim/load", json={"sequences": 3, "context_tokens": 256})
    eventually(lambda: stats(server)["running"] == 3, timeout=5, interval=0.005)
    assert stats(server)["kv_cache_usage"] > 0
    send_while_paused(server, [chat(str(i), max_tokens=3) for i in range(2)])
    assert stats(server)["completed"] == 2  # one slot left: they ran one after the other, and both finished
    httpx.post(server.url + "/sim/load", json={"sequences": 0})
    eventually(lambda: stats(server)["running"] == 0, timeout=5, interval=0.005)
    assert stats(server)["kv_cache_usage"] == 0.0
    assert httpx.post(server.url + "/sim/load", json={"sequences": -1}).status_code == 400


def test_each_model_has_its_own_engine(start_sim):
    server = start_sim(models=["small", "large"], max_num_seqs=2, time_scale=0.02)
    asyncio.run(post_all(server.url, [chat(str(i), model="small") for i in range(3)] + [chat("x", model="large")]))
    per_model = stats(server)["models"]
    assert per_model["small"]["completed"] == 3 and per_model["large"]["completed"] == 1


def test_a_stream_closed_early_aborts_its_request(start_sim):
    server = start_sim(time_scale=1.0, max_num_seqs=1)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**chat(max_tokens=1000), "stream": True}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    eventually(lambda: stats(server)["aborted"] == 1, timeout=5, interval=0.005)
    assert stats(server)["running"] == 0  # the slot is free again
    assert stats(server)["generation_tokens"] < 1000
