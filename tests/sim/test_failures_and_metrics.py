"""Failure injection (rates, Retry-After, seeds, hangs) and the Prometheus /metrics a controller reads."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batch_gateway.runner.engine_metrics import parse_queue_metrics
from tests.sim.conftest import chat, stats


def _statuses(url: str, count: int) -> list[httpx.Response]:
    with httpx.Client(base_url=url) as http:
        return [http.post("/v1/chat/completions", json=chat(max_tokens=1)) for _ in range(count)]


def test_injected_error_rates_and_retry_after(start_sim):
    server = start_sim(time_scale=0, error_rate_429=0.2, error_rate_500=0.1, error_rate_503=0.1, seed=3,
                       retry_after_seconds=2)
    responses = _statuses(server.url, 400)
    codes = [r.status_code for r in responses]
    assert 55 <= codes.count(429) <= 105 and 20 <= codes.count(500) <= 60 and 20 <= codes.count(503) <= 60
    assert codes.count(200) == 400 - codes.count(429) - codes.count(500) - codes.count(503)
    for response in responses:
        if response.status_code in (429, 503):
            assert response.headers["retry-after"] == "2"
            assert response.json()["error"]["type"] in ("rate_limit_error", "server_error")
        elif response.status_code == 500:
            assert "retry-after" not in response.headers
    assert stats(server)["injected"] == {"429": codes.count(429), "500": codes.count(500), "503": codes.count(503),
                                         "timeout": 0}


def test_same_seed_same_failures(start_sim):
    first = start_sim(time_scale=0, error_rate_500=0.3, seed=11)
    second = start_sim(time_scale=0, error_rate_500=0.3, seed=11)
    other = start_sim(time_scale=0, error_rate_500=0.3, seed=12)
    runs = [[r.status_code for r in _statuses(s.url, 60)] for s in (first, second, other)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_injected_timeout_hangs_until_the_client_gives_up(start_sim):
    server = start_sim(time_scale=0, timeout_rate=1.0, timeout_seconds=600)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=0.3)
    assert time.monotonic() - started >= 0.3
    short = start_sim(time_scale=0, timeout_rate=1.0, timeout_seconds=0.2)
    response = httpx.post(short.url + "/v1/chat/completions", json=chat(), timeout=5)
    assert response.status_code == 504 and response.json()["error"]["type"] == "server_error"


def test_stop_does_not_wait_for_a_hung_request(start_sim):
    import threading

    server = start_sim(time_scale=0, timeout_rate=1.0, timeout_seconds=600)
    hung = threading.Thread(target=lambda: httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=30),
                            daemon=True)
    hung.start()
    time.sleep(0.2)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_carry_vllm_names_per_model(start_sim):
    server = start_sim(models=["a", "b"], time_scale=0.02)
    httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=3, model="a"))
    httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=None, model="a"))
    httpx.post(server.url + "/v1/chat/completions", json=chat(max_tokens=3, model="a"))
    response = httpx.get(server.url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    a = (("model_name", "a"),)
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert samples[(gauge, a)] == 0 and (gauge, (("model_name", "b"),)) in samples
    counters = stats(server)["models"]["a"]
    assert samples[("vllm:prefix_cache_queries_total", a)] == counters["prefix_cache_queries"] > 0
    assert samples[("vllm:prefix_cache_hits_total", a)] == counters["prefix_cache_hits"] > 0
    assert samples[("vllm:prompt_tokens_total", a)] == counters["prompt_tokens"]
    assert samples[("vllm:generation_tokens_total", a)] == counters["generation_tokens"]
    assert samples[("vllm:num_preemptions_total", a)] == 0
    assert samples[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "a")))] == 2
    assert samples[("vllm:request_success_total", (("finished_reason", "stop"), ("model_name", "a")))] == 1
    assert samples[("vllm:e2e_request_latency_seconds_count", a)] == 3
    assert samples[("vllm:time_to_first_token_seconds_bucket", (("le", "+Inf"), ("model_name", "a")))] == 3


def test_the_runners_metrics_reader_sees_the_queue(start_sim):
    server = start_sim(max_num_seqs=1, time_scale=0.05)
    httpx.post(server.url + "/sim/pause")
    with httpx.Client(base_url=server.url, timeout=10) as http:
        import threading

        threads = [threading.Thread(target=http.post, args=("/v1/chat/completions",), kwargs={"json": chat(str(i))})
                   for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while stats(server)["waiting"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        queue = parse_queue_metrics(http.get("/metrics").text)
        http.post("/sim/resume")
        for t in threads:
            t.join()
    assert queue is not None and (queue.waiting, queue.running, queue.kv_usage) == (3, 0, 0)
    assert queue.completed == 0  # the e2e latency histogram's count: nothing has finished yet
    assert not queue.slot_caches  # vLLM shares one prefix cache between all sequences


def test_llama_cpp_metrics_read_as_an_engine_with_a_cache_per_slot():
    text = (
        "# HELP llamacpp:requests_processing Number of requests processing.\n# TYPE llamacpp:requests_processing gauge\n"
        "llamacpp:requests_processing 8\n"
        "# HELP llamacpp:requests_deferred Number of requests deferred.\n# TYPE llamacpp:requests_deferred gauge\n"
        "llamacpp:requests_deferred 2\n"
    )
    queue = parse_queue_metrics(text)
    assert queue is not None and (queue.waiting, queue.running, queue.slot_caches) == (2, 8, True)
