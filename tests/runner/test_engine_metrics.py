"""Scrapes of an engine's /metrics turned into readings: gauges as they are, histograms as rates since the last."""

from __future__ import annotations

import pytest

from batch_gateway.runner.engine_metrics import EngineMeter


def vllm(
    running: float,
    waiting: float,
    itl_sum: float,
    itl_count: float,
    queue_sum: float = 0.0,
    queue_count: float = 0.0,
    success: float = 0.0,
    prompt: float | None = None,
    hits: float = 0.0,
    queries: float | None = None,
) -> str:
    labels = 'engine="0",model_name="m"'
    prompts = (
        [
            "# TYPE vllm:prompt_tokens counter",
            f"vllm:prompt_tokens_total{{{labels}}} {prompt}",
            "# TYPE vllm:prefix_cache_hits counter",
            f"vllm:prefix_cache_hits_total{{{labels}}} {hits}",
        ]
        if prompt is not None
        else []
    )
    if queries is not None:
        prompts += [
            "# TYPE vllm:prefix_cache_queries counter",
            f"vllm:prefix_cache_queries_total{{{labels}}} {queries}",
        ]
    return (
        "\n".join(
            [
                *prompts,
                "# TYPE vllm:num_requests_running gauge",
                f"vllm:num_requests_running{{{labels}}} {running}",
                "# TYPE vllm:num_requests_waiting gauge",
                f"vllm:num_requests_waiting{{{labels}}} {waiting}",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f"vllm:kv_cache_usage_perc{{{labels}}} 0.25",
                "# TYPE vllm:request_success counter",
                f'vllm:request_success_total{{finished_reason="stop",{labels}}} {success}',
                "# TYPE vllm:inter_token_latency_seconds histogram",
                f'vllm:inter_token_latency_seconds_bucket{{le="+Inf",{labels}}} {itl_count}',
                f"vllm:inter_token_latency_seconds_sum{{{labels}}} {itl_sum}",
                f"vllm:inter_token_latency_seconds_count{{{labels}}} {itl_count}",
                "# TYPE vllm:request_queue_time_seconds histogram",
                f'vllm:request_queue_time_seconds_bucket{{le="+Inf",{labels}}} {queue_count}',
                f"vllm:request_queue_time_seconds_sum{{{labels}}} {queue_sum}",
                f"vllm:request_queue_time_seconds_count{{{labels}}} {queue_count}",
            ]
        )
        + "\n"
    )


def test_vllm_histograms_give_the_step_time_and_the_sequences_decoding_over_the_interval():
    meter = EngineMeter()
    first = meter.read(vllm(40, 2, itl_sum=100.0, itl_count=5000, success=10), at=10.0)
    assert first.reading.step_seconds is None  # one scrape has no interval yet
    # Over 2 s: 40 sequences decoding 20-ms steps = 4,000 tokens whose latencies add up to 80 s.
    second = meter.read(vllm(40, 0, itl_sum=180.0, itl_count=9000, queue_sum=0.5, queue_count=10, success=30), at=12.0)
    reading = second.reading
    assert reading.step_seconds == pytest.approx(0.020) and reading.step_tokens == 4000
    assert reading.running_mean == pytest.approx(40.0)
    assert reading.queue_seconds == pytest.approx(0.05)
    assert (reading.running, reading.waiting, reading.kv_usage, reading.completed) == (40, 0, 0.25, 30)
    assert not reading.waiting_means_full  # vLLM's waiting requests include arrivals between two steps


def test_prompt_tokens_less_cache_hits_give_the_prompt_tokens_computed_per_step():
    meter = EngineMeter()
    assert meter.read(vllm(40, 0, itl_sum=100.0, itl_count=5000), at=10.0) is not None
    no_counts = meter.read(vllm(40, 0, itl_sum=180.0, itl_count=9000), at=12.0).reading
    assert no_counts.prompt_per_step is None  # an engine that does not count them: no regressor
    meter = EngineMeter()
    meter.read(vllm(40, 0, itl_sum=100.0, itl_count=5000, prompt=1000, hits=200), at=10.0)
    # Over 2 s of 20-ms steps (100 steps): 6,000 prompt tokens, 4,000 of them found in the prefix cache.
    reading = meter.read(vllm(40, 0, itl_sum=180.0, itl_count=9000, prompt=7000, hits=4200), at=12.0).reading
    assert reading.prompt_per_step == pytest.approx(20.0)


def test_the_prefix_cache_counters_give_the_tokens_looked_up_and_found_since_the_last_scrape():
    meter = EngineMeter()
    meter.read(vllm(40, 0, itl_sum=100.0, itl_count=5000, prompt=1000, hits=200, queries=900), at=10.0)
    snapshot = meter.read(vllm(40, 0, itl_sum=180.0, itl_count=9000, prompt=7000, hits=4200, queries=6900), at=12.0)
    assert (snapshot.cache_queried, snapshot.cache_found) == (6000, 4000)
    meter = EngineMeter()  # without the lookups' counter, the hits alone say nothing of the ratio
    meter.read(vllm(40, 0, itl_sum=100.0, itl_count=5000, prompt=1000, hits=200), at=10.0)
    snapshot = meter.read(vllm(40, 0, itl_sum=180.0, itl_count=9000, prompt=7000, hits=4200), at=12.0)
    assert snapshot.cache_queried is None and snapshot.cache_found is None


def test_a_restarted_engine_resets_its_counters_without_a_bogus_rate():
    meter = EngineMeter()
    meter.read(vllm(40, 0, itl_sum=500.0, itl_count=20000), at=10.0)
    after = meter.read(vllm(3, 0, itl_sum=0.1, itl_count=5), at=11.0).reading
    assert after.step_seconds is None and after.running_mean is None


def test_llama_cpp_generation_time_gives_its_per_token_latency_and_busy_slots():
    def scrape(seconds: float, tokens: float) -> str:
        return (
            "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 4\n"
            "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 1\n"
            "# TYPE llamacpp:tokens_predicted_seconds_total counter\n"
            f"llamacpp:tokens_predicted_seconds_total {seconds}\n"
            f"# TYPE llamacpp:tokens_predicted_total counter\nllamacpp:tokens_predicted_total {tokens}\n"
        )

    meter = EngineMeter()
    meter.read(scrape(10.0, 100), at=0.0)
    snapshot = meter.read(scrape(14.0, 140), at=1.0)  # 4 slots busy for 1 s: 40 tokens at 100 ms each
    assert snapshot.slot_caches and snapshot.reading.waiting_means_full  # deferred: no slot was free
    assert snapshot.reading.step_seconds == pytest.approx(0.1) and snapshot.reading.running_mean == pytest.approx(4.0)
    assert snapshot.reading.step_tokens == 40  # the tokens of the requests that ended: users' share is told from it
    # It counts no finished requests, only their output tokens as each ends: what shows users there (presence.py).
    assert snapshot.reading.completed is None and snapshot.reading.finished_tokens == 140


def test_an_endpoint_without_queue_gauges_gives_no_reading():
    assert EngineMeter().read("# TYPE foo counter\nfoo_total 1\n", at=0.0) is None
    assert EngineMeter().read("not prometheus {{{", at=0.0) is None


def cache_info(engine: str, blocks: str, block_size: int = 16, caching: str = "True") -> str:
    # vLLM's cache_config_info: every CacheConfig field as a label, plus `engine`; no model_name.
    return (
        f'vllm:cache_config_info{{block_size="{block_size}",cache_dtype="auto",enable_prefix_caching="{caching}",'
        f'engine="{engine}",gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="{blocks}"}} 1.0\n'
    )


def test_the_kv_cache_size_and_what_its_sequences_hold_per_engine():
    text = (
        "# TYPE vllm:cache_config_info gauge\n"
        + cache_info("0", "1000")
        + cache_info("1", "3000", block_size=32)
        + "# TYPE vllm:num_requests_waiting gauge\n"
        + 'vllm:num_requests_waiting{engine="0",model_name="m"} 0\n'
        + 'vllm:num_requests_waiting{engine="1",model_name="m"} 0\n'
        + "# TYPE vllm:kv_cache_usage_perc gauge\n"
        + 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
        + 'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25\n'
    )
    snapshot = EngineMeter().read(text, at=0.0)
    assert snapshot is not None
    assert snapshot.cache_tokens == 1000 * 16 + 3000 * 32  # two data-parallel engines behind one endpoint
    assert snapshot.cache_held == 0.5 * 16_000 + 0.25 * 96_000


@pytest.mark.parametrize("info", [cache_info("0", "None"), cache_info("0", "1000", caching="False"), ""])
def test_no_cache_size_while_the_engine_does_not_say(info):
    # "None" before vLLM has profiled its memory; no prefix caching means nothing to keep warm.
    text = "# TYPE vllm:cache_config_info gauge\n" + info + vllm(running=1, waiting=0, itl_sum=0, itl_count=0)
    snapshot = EngineMeter().read(text, at=0.0)
    assert snapshot is not None and snapshot.cache_tokens is None and snapshot.cache_held is None
