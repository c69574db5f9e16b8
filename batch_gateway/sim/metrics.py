"""`GET /metrics`: Prometheus text with vLLM's metric names, one label set per model (`model_name`)."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batch_gateway.sim.engine import Engine

# Seconds; close to vLLM's buckets for request latencies.
BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class Histogram:
    __slots__ = ("counts", "count", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(BUCKETS, value)
        if index < len(BUCKETS):
            self.counts[index] += 1
        self.count += 1
        self.sum += value


def _gauges() -> list[tuple[str, str, Callable[[Engine], float]]]:
    return [
        ("vllm:num_requests_running", "Number of requests in model execution batches.", lambda e: e.num_running),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lambda e: e.num_waiting),
        ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lambda e: e.kv_usage),
    ]


def _counters() -> list[tuple[str, str, Callable[[Engine], float]]]:
    return [
        ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", lambda e: e.stats.prefix_queries),
        ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", lambda e: e.stats.prefix_hits),
        ("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", lambda e: e.stats.preemptions),
        ("vllm:prompt_tokens", "Number of prefill tokens processed.", lambda e: e.stats.prompt_tokens),
        ("vllm:generation_tokens", "Number of generation tokens processed.", lambda e: e.stats.generation_tokens),
    ]


def _histograms() -> list[tuple[str, str, str]]:
    return [
        ("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", "e2e"),
        ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", "ttft"),
        ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", "queue"),
    ]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(engines: Iterable[Engine]) -> str:
    engines = list(engines)
    labels = {e.model: f'model_name="{_label(e.model)}"' for e in engines}
    out: list[str] = []
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
            out.append(f'{name}_total{{finished_reason="{reason}",{labels[e.model]}}} {float(e.stats.finished.get(reason, 0))}')
    for name, help_text, attribute in _histograms():
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for e in engines:
            histogram: Histogram = getattr(e.stats, attribute)
            cumulative = 0
            for bound, count in zip(BUCKETS, histogram.counts):
                cumulative += count
                out.append(f'{name}_bucket{{le="{bound}",{labels[e.model]}}} {float(cumulative)}')
            out.append(f'{name}_bucket{{le="+Inf",{labels[e.model]}}} {float(histogram.count)}')
            out.append(f"{name}_sum{{{labels[e.model]}}} {histogram.sum}")
            out.append(f"{name}_count{{{labels[e.model]}}} {float(histogram.count)}")
    return "\n".join(out) + "\n"
