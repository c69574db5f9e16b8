"""`GET /metrics`: Prometheus text with vLLM's V1 metric names, labels and histogram buckets.

Every series carries vLLM's labels `model_name` and `engine` ("0": each model is its own engine, as one vLLM process
per model would be). Names, buckets and what is observed follow vllm/v1/metrics/loggers.py (PrometheusStatLogger):

- `vllm:inter_token_latency_seconds` (vLLM 0.11 on) observes, for each sequence that gets a token in a step after its
  first, the time since its previous token. `vllm:time_per_output_token_seconds` is the same data under the name vLLM
  used up to 0.10 (V0 and V1); 0.11 publishes both, 0.12 hides the old name behind --show-hidden-metrics-for-version,
  0.13 drops it. Both are published here, so readers of either generation work.
- `vllm:request_time_per_output_token_seconds` (0.11 on): per finished request, its decode time over its output
  tokens after the first.
- `vllm:time_to_first_token_seconds`, `vllm:e2e_request_latency_seconds`, `vllm:request_queue_time_seconds` (the
  latter two observed when the request finishes, as vLLM does).
- `vllm:prefix_cache_queries_total` / `vllm:prefix_cache_hits_total` (0.9 on) count prompt tokens looked up and found
  at a request's first admission; re-admissions after a preemption are not counted (vLLM counts those apart).
- `vllm:cache_config_info`: a gauge of 1 whose labels describe the KV cache (see `cache_info`); left out with
  `hide_cache_info`, as an engine that does not say its cache size.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batch_gateway.sim.config import SimConfig
    from batch_gateway.sim.engine import Engine

ENGINE_INDEX = "0"

# vLLM's bucket boundaries, in seconds; each histogram has its own.
TTFT_BUCKETS: tuple[float, ...] = (
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
)
TOKEN_LATENCY_BUCKETS: tuple[float, ...] = (  # inter-token latency and time per output token
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
)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (  # e2e and queue time
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
)


class Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """`times` observations of `value` at once (every sequence of a step sees the same inter-token latency)."""
        index = bisect.bisect_left(self.bounds, value)  # a value on a bound belongs to that bucket (le)
        if index < len(self.bounds):
            self.counts[index] += times
        self.count += times
        self.sum += value * times


def cache_info(config: SimConfig) -> dict[str, str]:
    """The labels of `vllm:cache_config_info` (vLLM puts every CacheConfig field there; these are the ones that
    describe the cache and mean the same in every version since 0.8, plus 0.11's `kv_cache_size_tokens`).

    `num_gpu_blocks` is the KV cache in blocks. With `--cache-blocks` the prefix cache is capped below the KV cache
    (running sequences still get all of `kv_blocks`), and then `num_gpu_blocks` reports the cap: in vLLM the prefix
    cache is the KV cache, so a reader takes `num_gpu_blocks` as how many prompt blocks the engine can keep, and the cap
    is that number here. `vllm:kv_cache_usage_perc` stays a share of `kv_blocks`.
    """
    blocks = min(config.kv_blocks, config.cache_blocks) if config.cache_blocks else config.kv_blocks
    return {
        "block_size": str(config.block_size),
        "cache_dtype": "auto",
        "enable_prefix_caching": "True",
        "kv_cache_size_tokens": str(blocks * config.block_size),
        "num_cpu_blocks": "0",
        "num_gpu_blocks": str(blocks),
    }


def _gauges() -> list[tuple[str, str, Callable[[Engine], float]]]:
    return [
        ("vllm:num_requests_running", "Number of requests in model execution batches.", lambda e: e.num_running),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lambda e: e.num_waiting),
        ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lambda e: e.kv_usage),
    ]


def _counters() -> list[tuple[str, str, Callable[[Engine], float]]]:
    return [
        (
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            lambda e: e.stats.prefix_queries,
        ),
        (
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            lambda e: e.stats.prefix_hits,
        ),
        ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", lambda e: e.stats.preemptions),
        ("vllm:prompt_tokens", "Number of prefill tokens processed.", lambda e: e.stats.prompt_tokens),
        ("vllm:generation_tokens", "Number of generation tokens processed.", lambda e: e.stats.generation_tokens),
    ]


def _histograms() -> list[tuple[str, str, str]]:
    return [
        ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", "ttft"),
        ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", "itl"),
        (
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.DEPRECATED: Use vllm:inter_token_latency_seconds instead.",
            "itl",
        ),
        (
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            "tpot",
        ),
        ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", "e2e"),
        ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", "queue"),
    ]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: dict[str, str]) -> str:
    return ",".join(f'{name}="{_label(value)}"' for name, value in pairs.items())


def render(engines: Iterable[Engine]) -> str:
    engines = list(engines)
    labels = {e.model: _labels({"model_name": e.model, "engine": ENGINE_INDEX}) for e in engines}
    out: list[str] = []
    name = "vllm:cache_config_info"
    shown = [e for e in engines if not e.config.hide_cache_info]
    if shown:
        out += [f"# HELP {name} Information of the LLMEngine CacheConfig", f"# TYPE {name} gauge"]
    # vLLM's gauge has no model_name (one process, one model); here it tells the engines of several models apart.
    out += [
        f"{name}{{{_labels({**cache_info(e.config), 'engine': ENGINE_INDEX, 'model_name': e.model})}}} 1.0"
        for e in shown
    ]
    for name, help_text, read in _gauges():
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        out += [f"{name}{{{labels[e.model]}}} {float(read(e))}" for e in engines]
    for name, help_text, read in _counters():
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        out += [f"{name}_total{{{labels[e.model]}}} {float(read(e))}" for e in engines]
    name = "vllm:request_success"
    out += [f"# HELP {name} Count of successfully processed requests.", f"# TYPE {name} counter"]
    for e in engines:
        for reason in ("stop", "length"):
            out.append(
                f'{name}_total{{{labels[e.model]},finished_reason="{reason}"}} {float(e.stats.finished.get(reason, 0))}'
            )
    for name, help_text, attribute in _histograms():
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for e in engines:
            histogram: Histogram = getattr(e.stats, attribute)
            cumulative = 0
            for bound, count in zip(histogram.bounds, histogram.counts, strict=True):
                cumulative += count
                out.append(f'{name}_bucket{{{labels[e.model]},le="{bound}"}} {float(cumulative)}')
            out.append(f'{name}_bucket{{{labels[e.model]},le="+Inf"}} {float(histogram.count)}')
            out.append(f"{name}_sum{{{labels[e.model]}}} {histogram.sum}")
            out.append(f"{name}_count{{{labels[e.model]}}} {float(histogram.count)}")
    return "\n".join(out) + "\n"
