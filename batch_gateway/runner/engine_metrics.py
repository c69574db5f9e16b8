"""Read an engine's queue gauges from its Prometheus `/metrics`: vLLM names, with llama.cpp's as a fallback; and
vLLM's count of finished requests, against which a runner measures its share of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from batch_gateway.runner.upstream import UpstreamClient

_WAITING = ("vllm:num_requests_waiting", "llamacpp:requests_deferred")
_RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_COMPLETED = ("vllm:request_success_total", "vllm:e2e_request_latency_seconds_count")


@dataclass
class QueueMetrics:
    waiting: float
    running: float | None
    kv_usage: float | None
    completed: float | None = None  # requests finished so far, all clients together
    slot_caches: bool = False  # llama.cpp: a prefix cache per slot, not one shared cache


def parse_queue_metrics(text: str) -> QueueMetrics | None:
    """Sum each gauge over its label sets (several models or engines behind one endpoint)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value

    def first(names: tuple[str, ...]) -> float | None:
        return next((values[n] for n in names if n in values), None)

    waiting = first(_WAITING)
    if waiting is None:
        return None
    return QueueMetrics(
        waiting=waiting,
        running=first(_RUNNING),
        kv_usage=first(_KV_USAGE),
        completed=first(_COMPLETED),
        slot_caches=any(name.startswith("llamacpp:") for name in values),
    )


async def read_queue_metrics(client: UpstreamClient, endpoint: str) -> QueueMetrics | None:
    """None when the endpoint has no usable /metrics (or did not answer in time)."""
    text = await client.get_text(endpoint + "/metrics", timeout=5.0)
    if text is None:
        return None
    try:
        return parse_queue_metrics(text)
    except ValueError:
        return None
