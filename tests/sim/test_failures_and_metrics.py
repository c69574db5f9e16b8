"""Failure injection (rates, Retry-After, seeds, hangs) and the Prometheus /metrics a controller reads."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batch_gateway.runner.engine_metrics import EngineMeter
from tests.helpers import eventually
from tests.sim.conftest import chat, send_while_paused, stats

pytestmark = pytest.mark.slow  # the simulator's engine, in real time


def _statuses(url: str, count: int) -> list[httpx.Response]:
    with httpx.Client(base_url=url) as http:
        return [http.post("/v1/chat/completions", json=chat(max_tokens=1)) for _ in range(count)]


def test_injected_error_rates_and_retry_after(start_sim):
    server = start_sim(
        time_scale=0, error_rate_429=0.2, error_rate_500=0.1, error_rate_503=0.1, seed=3, retry_after_seconds=2
    )
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
    assert stats(server)["injected"] == {
        "429": codes.count(429),
        "500": codes.count(500),
        "503": codes.count(503),
        "timeout": 0,
    }


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
    hung = threading.Thread(
        target=lambda: httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=30), daemon=True
    )
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
    a = (("engine", "0"), ("model_name", "a"))  # vLLM's labels: the served model name and the engine index
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert samples[(gauge, a)] == 0 and (gauge, (("engine", "0"), ("model_name", "b"))) in samples
    counters = stats(server)["models"]["a"]
    assert samples[("vllm:prefix_cache_queries_total", a)] == counters["prefix_cache_queries"] > 0
    assert samples[("vllm:prefix_cache_hits_total", a)] == counters["prefix_cache_hits"] > 0
    assert samples[("vllm:prompt_tokens_total", a)] == counters["prompt_tokens"]
    assert samples[("vllm:generation_tokens_total", a)] == counters["generation_tokens"]
    assert samples[("vllm:num_preemptions_total", a)] == 0
    assert samples[("vllm:request_success_total", (*a[:1], ("finished_reason", "length"), *a[1:]))] == 2
    assert samples[("vllm:request_success_total", (*a[:1], ("finished_reason", "stop"), *a[1:]))] == 1
    assert samples[("vllm:e2e_request_latency_seconds_count", a)] == 3
    assert samples[("vllm:time_to_first_token_seconds_bucket", (*a[:1], ("le", "+Inf"), *a[1:]))] == 3


def test_the_runners_metrics_reader_sees_the_queue(start_sim):
    server = start_sim(max_num_seqs=1, time_scale=0.05)
    httpx.post(server.url + "/sim/pause")
    with httpx.Client(base_url=server.url, timeout=10) as http:
        import threading

        threads = [
            threading.Thread(target=http.post, args=("/v1/chat/completions",), kwargs={"json": chat(str(i))})
            for i in range(3)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while stats(server)["waiting"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        snapshot = EngineMeter().read(http.get("/metrics").text, at=0.0)
        http.post("/sim/resume")
        for t in threads:
            t.join()
    assert snapshot is not None
    queue = snapshot.reading
    assert (queue.waiting, queue.running, queue.kv_usage) == (3, 0, 0)
    assert queue.completed == 0  # nothing has finished yet
    assert not snapshot.slot_caches  # vLLM shares one prefix cache between all sequences


def test_llama_cpp_metrics_read_as_an_engine_with_a_cache_per_slot():
    text = (
        "# HELP llamacpp:requests_processing Number of requests processing.\n"
        "# TYPE llamacpp:requests_processing gauge\n"
        "llamacpp:requests_processing 8\n"
        "# HELP llamacpp:requests_deferred Number of requests deferred.\n# TYPE llamacpp:requests_deferred gauge\n"
        "llamacpp:requests_deferred 2\n"
    )
    snapshot = EngineMeter().read(text, at=0.0)
    assert snapshot is not None and (snapshot.reading.waiting, snapshot.reading.running, snapshot.slot_caches) == (
        2,
        8,
        True,
    )


# vLLM's buckets (vllm/v1/metrics/loggers.py), written out here rather than imported, so the test checks the code.
_VLLM_BUCKETS = {
    "vllm:time_to_first_token_seconds": [
        0.001,
        0.005,
        0.01,
        0.02,
        0.04,
        0.06,
        0.08,
        0.1,
        0.25,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        7.5,
        10.0,
        20.0,
        40.0,
        80.0,
        160.0,
        640.0,
        2560.0,
    ],
    **{
        name: [
            0.01,
            0.025,
            0.05,
            0.075,
            0.1,
            0.15,
            0.2,
            0.3,
            0.4,
            0.5,
            0.75,
            1.0,
            2.5,
            5.0,
            7.5,
            10.0,
            20.0,
            40.0,
            80.0,
        ]
        for name in (
            "vllm:inter_token_latency_seconds",
            "vllm:time_per_output_token_seconds",
            "vllm:request_time_per_output_token_seconds",
        )
    },
    **{
        name: [
            0.3,
            0.5,
            0.8,
            1.0,
            1.5,
            2.0,
            2.5,
            5.0,
            10.0,
            15.0,
            20.0,
            30.0,
            40.0,
            50.0,
            60.0,
            120.0,
            240.0,
            480.0,
            960.0,
            1920.0,
            7680.0,
        ]
        for name in ("vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds")
    },
}
_LABELS = (("engine", "0"), ("model_name", "sim-model"))


def _histogram(samples: dict, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(le, cumulative count) in order, then count and sum."""
    buckets = sorted(
        (float(dict(labels)["le"]), value) for (sample, labels), value in samples.items() if sample == name + "_bucket"
    )
    return buckets, samples[(name + "_count", _LABELS)], samples[(name + "_sum", _LABELS)]


def test_latency_histograms_have_vllms_names_labels_and_buckets(sim):
    httpx.post(sim.url + "/v1/chat/completions", json=chat(max_tokens=5))
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(sim.url + "/metrics").text)}
    for name, bounds in _VLLM_BUCKETS.items():
        family = families[name]
        assert family.type == "histogram"
        buckets = [s for s in family.samples if s.name == name + "_bucket"]
        assert [s.labels["le"] for s in buckets] == [str(b) for b in bounds] + ["+Inf"]
        assert all({k: v for k, v in s.labels.items() if k != "le"} == dict(_LABELS) for s in family.samples)
        counts = [s.value for s in buckets]
        assert counts == sorted(counts)  # cumulative
        assert counts[-1] == next(s.value for s in family.samples if s.name == name + "_count")
        # One request of 5 tokens: one of each per request, and an inter-token latency for each token after the first.
        assert counts[-1] == (
            4 if name in ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds") else 1
        )


def test_cache_config_info_describes_the_kv_cache(start_sim):
    def info(server) -> dict[str, str]:
        family = next(
            f
            for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
            if f.name == "vllm:cache_config_info"
        )
        (sample,) = family.samples
        assert family.type == "gauge" and sample.value == 1
        return sample.labels

    labels = info(start_sim(time_scale=0, block_size=32, kv_blocks=1000, models=["m"]))
    assert labels["block_size"] == "32" and labels["num_gpu_blocks"] == "1000"
    assert labels["kv_cache_size_tokens"] == "32000" and labels["enable_prefix_caching"] == "True"
    assert labels["engine"] == "0" and labels["model_name"] == "m"
    # A capped prefix cache is what a reader sizing its prefix working set must see.
    capped = info(start_sim(time_scale=0, kv_blocks=1000, cache_blocks=300))
    assert capped["num_gpu_blocks"] == "300" and capped["kv_cache_size_tokens"] == str(300 * 16)


def test_the_runner_reads_the_cache_size_unless_the_simulator_hides_it(start_sim):
    shown = EngineMeter().read(httpx.get(start_sim(time_scale=0, kv_blocks=1000).url + "/metrics").text, at=0.0)
    assert shown is not None and shown.cache_tokens == 16_000 and shown.cache_held == 0
    hidden = start_sim(time_scale=0, kv_blocks=1000, hide_cache_info=True)
    text = httpx.get(hidden.url + "/metrics").text
    assert "vllm:cache_config_info" not in text and "vllm:prefix_cache_hits_total" in text
    snapshot = EngineMeter().read(text, at=0.0)
    assert snapshot is not None and snapshot.cache_tokens is None  # the window learns from cached_tokens instead


def test_inter_token_latency_is_the_step_time_of_the_cost_model(start_sim):
    # Four sequences decode together: every step costs 25 + 4 × 2.5 = 35 ms of model time, 17.5 ms at this scale.
    server = start_sim(time_scale=0.5, step_base_ms=25, per_seq_ms=2.5, context_ms_per_token=0, prefill_ms_per_token=0)
    step = (25 + 4 * 2.5) / 1000 * 0.5
    bodies = [{"model": "sim-model", "prompt": [i] * 100, "max_tokens": 11} for i in range(4)]
    send_while_paused(server, bodies, "/v1/completions")
    samples = _samples(httpx.get(server.url + "/metrics").text)
    buckets, count, total = _histogram(samples, "vllm:inter_token_latency_seconds")
    assert count == 4 * 10  # one latency per token after each sequence's first
    _, ttft_count, ttft_total = _histogram(samples, "vllm:time_to_first_token_seconds")
    assert ttft_count == 4 and ttft_total / 4 >= step * 0.95  # the prefill step, plus the time to get going
    # The steps the cost model gives; a busy machine only makes them longer (the upper bound is loose on purpose:
    # timing belongs to benchmarks). The simulator keeps a schedule, so the step after a late one is short: a
    # sequence's latencies after a late first token add up to less than its ten steps (in one CI run, 0.93 of them),
    # but with that first token, no less than all eleven (the last one comes no sooner than planned).
    assert (ttft_total + total) / 4 >= 11 * step * 0.95
    assert total / count < step * 3
    assert buckets[-1][1] == count
    assert _histogram(samples, "vllm:time_per_output_token_seconds") == (buckets, count, total)  # the old name
    _, requests, per_request = _histogram(samples, "vllm:request_time_per_output_token_seconds")
    assert requests == 4 and per_request * 10 == pytest.approx(total)  # each request's latencies over its 10 tokens


def test_queue_and_e2e_latency_are_observed_when_a_request_finishes(start_sim):
    server = start_sim(time_scale=0.1)  # 1 ms steps: 2,000 tokens leave a busy client 2 s to pause it mid-way
    httpx.post(server.url + "/sim/pause")
    with httpx.Client(base_url=server.url, timeout=10) as http:
        import threading

        thread = threading.Thread(
            target=http.post, args=("/v1/chat/completions",), kwargs={"json": chat(max_tokens=2000)}
        )
        thread.start()
        eventually(lambda: stats(server)["waiting"] == 1, timeout=5, interval=0.005)
        http.post("/sim/resume")
        eventually(lambda: stats(server)["generation_tokens"] >= 2, timeout=5, interval=0.005)
        http.post("/sim/pause")  # mid-way: admitted and decoding, not finished
        assert stats(server)["running"] == 1
        running = _samples(http.get("/metrics").text)
        http.post("/sim/resume")
        thread.join()
        done = _samples(http.get("/metrics").text)
    assert running[("vllm:time_to_first_token_seconds_count", _LABELS)] == 1
    assert running[("vllm:request_queue_time_seconds_count", _LABELS)] == 0  # vLLM: counted at the finish
    assert running[("vllm:e2e_request_latency_seconds_count", _LABELS)] == 0
    assert done[("vllm:request_queue_time_seconds_count", _LABELS)] == 1
    assert done[("vllm:e2e_request_latency_seconds_count", _LABELS)] == 1
