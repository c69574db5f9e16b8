"""What an engine's Prometheus `/metrics` says, turned into `EngineReading`s for the controller.

Gauges are read as they are (running, waiting, KV-cache use). Counters and histograms are read as changes since the
previous scrape of the same endpoint, which is what the controller needs over an interval:

* the mean inter-token latency (vLLM's `inter_token_latency_seconds`, or `time_per_output_token_seconds` before it
  was renamed: its sum over its count);
* the sequences decoding on average over the interval: every decoded token observes its step in that histogram, so
  its sum grows by (sequences decoding × step time) each step, and the change of the sum over the elapsed time is
  the time-averaged number of decoding sequences;
* the mean time the requests admitted meanwhile had waited (`request_queue_time_seconds`);
* the prompt tokens computed per step: vLLM's `prompt_tokens_total` less its `prefix_cache_hits_total` (tokens found
  in the cache), over the steps of the interval (its duration over the mean step); the step model (step_model.py)
  charges prefill to it, not to whoever was admitted;
* the engine's count of finished requests (`request_success_total`).

llama.cpp's server (`--metrics`) has no histograms, but `tokens_predicted_seconds_total` adds up each slot's
generation time, so the same two quotients give its per-token latency and its busy slots. An engine with a prefix
cache per slot is recognised by llama.cpp's names; how many slots it has, by `total_slots` in its `/props`.

The KV cache's size comes from vLLM's `vllm:cache_config_info`, a gauge of 1 whose labels are the engine's
CacheConfig (`num_gpu_blocks` × `block_size` tokens; `num_gpu_blocks` is "None" until the engine has profiled its
memory), one series per engine (label `engine`); what its sequences hold is `vllm:kv_cache_usage_perc` of the same
engine. Several engines behind one endpoint (data parallel) add up. The prefix window (prefix_window.py) uses both,
and the prefix cache's counters (`prefix_cache_queries_total`, `prefix_cache_hits_total`) over the interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from batch_gateway.runner.engine_reading import EngineReading

if TYPE_CHECKING:
    from batch_gateway.runner.upstream import UpstreamClient

_DEFERRED = "llamacpp:requests_deferred"  # requests that found no free slot
_WAITING = ("vllm:num_requests_waiting", _DEFERRED)
_RUNNING = ("vllm:num_requests_running", "llamacpp:requests_processing")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_COMPLETED = ("vllm:request_success_total", "vllm:e2e_request_latency_seconds_count")
_FINISHED_TOKENS = ("llamacpp:tokens_predicted_total",)  # counted as each request ends (vLLM's count as generated)
# (sum of per-token times, tokens) pairs, newest names first.
_TOKEN_TIMES = (
    ("vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count"),
    ("vllm:time_per_output_token_seconds_sum", "vllm:time_per_output_token_seconds_count"),
    ("llamacpp:tokens_predicted_seconds_total", "llamacpp:tokens_predicted_total"),
)
_QUEUE_TIMES = ("vllm:request_queue_time_seconds_sum", "vllm:request_queue_time_seconds_count")
_PROMPT_TOKENS, _CACHE_HITS = "vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total"
_CACHE_QUERIES = "vllm:prefix_cache_queries_total"
_CACHE_INFO = "vllm:cache_config_info"


@dataclass(frozen=True)
class _Scrape:
    at: float
    values: dict[str, float]


@dataclass(frozen=True)
class EngineSnapshot:
    reading: EngineReading
    slot_caches: bool  # llama.cpp: a prefix cache per slot, not one shared cache
    cache_tokens: float | None = None  # the KV cache's size in tokens, when the engine says
    cache_held: float | None = None  # tokens of it its running sequences hold
    cache_queried: float | None = None  # prompt tokens looked up in the prefix cache since the last scrape...
    cache_found: float | None = None  # ...and found there


@dataclass(frozen=True)
class _Parsed:
    values: dict[str, float]
    cache_tokens: float | None
    cache_held: float | None


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample's value, summed over its label sets (several models or engines behind one endpoint)."""
    return _parse(text).values


def _parse(text: str) -> _Parsed:
    values: dict[str, float] = {}
    sizes: dict[tuple[str, str], float] = {}  # (model_name, engine) -> KV cache tokens
    usage: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
            if sample.name == _CACHE_INFO and sample.value:
                tokens = _cache_tokens(sample.labels)
                if tokens is not None:
                    sizes[_engine(sample.labels)] = tokens
            elif sample.name in _KV_USAGE:
                usage.setdefault(_engine(sample.labels), sample.value)
    if not sizes:
        return _Parsed(values, None, None)
    held = 0.0
    for engine, tokens in sizes.items():
        # vLLM's info gauge has no model_name; the engine's usage then is the one with the same engine label.
        share = usage.get(engine, next((u for (_, e), u in usage.items() if e == engine[1]), 0.0))
        held += min(1.0, max(0.0, share)) * tokens
    return _Parsed(values, sum(sizes.values()), held)


def _engine(labels: dict[str, str]) -> tuple[str, str]:
    return labels.get("model_name", ""), labels.get("engine", "")


def _cache_tokens(labels: dict[str, str]) -> float | None:
    """Tokens of KV cache from cache_config_info's labels; None while unknown ("None" before profiling)."""
    if labels.get("enable_prefix_caching", "True") == "False":
        return None  # no prefix cache: nothing to keep warm
    try:
        blocks, size = int(labels["num_gpu_blocks"]), int(labels["block_size"])
    except (KeyError, ValueError):
        return None
    return float(blocks * size) if blocks > 0 and size > 0 else None


class EngineMeter:
    """Turns successive scrapes of one endpoint's `/metrics` into readings: gauges now, rates since the last."""

    def __init__(self) -> None:
        self._last: _Scrape | None = None

    def read(self, text: str, at: float) -> EngineSnapshot | None:
        """The reading of a scrape taken at `at`, or None when it has no queue gauges (not an engine we know)."""
        try:
            parsed = _parse(text)
        except ValueError:
            return None
        values = parsed.values
        waiting = _first(values, _WAITING)
        if waiting is None:
            return None
        last, self._last = self._last, _Scrape(at, values)
        step = step_tokens = running_mean = queue = prompt = queried = found = None
        if last is not None and at > last.at:
            for total_name, count_name in _TOKEN_TIMES:
                seconds, tokens = _change(values, last.values, total_name), _change(values, last.values, count_name)
                if seconds is not None and tokens is not None:
                    if tokens > 0:
                        step, step_tokens = seconds / tokens, tokens
                        running_mean = seconds / (at - last.at)
                    break
            prompted, found = _change(values, last.values, _PROMPT_TOKENS), _change(values, last.values, _CACHE_HITS)
            queried = _change(values, last.values, _CACHE_QUERIES)
            if step is not None and prompted is not None and found is not None:
                prompt = max(0.0, prompted - found) * step / (at - last.at)
            seconds, admitted = (_change(values, last.values, name) for name in _QUEUE_TIMES)
            if seconds is not None and admitted:
                queue = seconds / admitted
        reading = EngineReading(
            running=_first(values, _RUNNING) or 0.0,
            waiting=waiting,
            kv_usage=_first(values, _KV_USAGE),
            step_seconds=step,
            step_tokens=step_tokens,
            running_mean=running_mean,
            completed=_first(values, _COMPLETED),
            finished_tokens=_first(values, _FINISHED_TOKENS),
            queue_seconds=queue,
            prompt_per_step=prompt,
            waiting_means_full=_DEFERRED in values and "vllm:num_requests_waiting" not in values,
        )
        return EngineSnapshot(
            reading,
            slot_caches=any(name.startswith("llamacpp:") for name in values),
            cache_tokens=parsed.cache_tokens,
            cache_held=parsed.cache_held,
            cache_queried=queried if found is not None else None,
            cache_found=found if queried is not None else None,
        )

    async def scrape(self, client: UpstreamClient, endpoint: str, at: float) -> EngineSnapshot | None:
        """Read the endpoint's /metrics; None when it has none usable (or did not answer in time)."""
        text = await client.get_text(endpoint + "/metrics", timeout=5.0)
        return None if text is None else self.read(text, at)


class _Props(msgspec.Struct):
    total_slots: int | None = None


async def stated_slots(client: UpstreamClient, endpoint: str) -> int | None:
    """How many requests a llama.cpp server runs at once (`total_slots` in its /props); None if it does not say."""
    text = await client.get_text(endpoint + "/props", timeout=2.0)  # it answered /metrics: /props takes milliseconds
    if text is None:
        return None
    try:
        slots = msgspec.json.decode(text, type=_Props).total_slots
    except msgspec.DecodeError:  # includes msgspec.ValidationError
        return None
    return slots if slots and slots > 0 else None


def _first(values: dict[str, float], names: tuple[str, ...]) -> float | None:
    return next((values[n] for n in names if n in values), None)


def _change(values: dict[str, float], before: dict[str, float], name: str) -> float | None:
    """A counter's increase since the previous scrape; None if absent or reset (the engine restarted)."""
    if name not in values or name not in before or values[name] < before[name]:
        return None
    return values[name] - before[name]
