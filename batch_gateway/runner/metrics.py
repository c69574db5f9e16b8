"""The runner's Prometheus metrics, served on --runner-metrics-port while it runs. Every series is per runner pod, and
the pod (Workflow) is labelled with the batch id, so no batch-id label is needed here."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

INFLIGHT = Gauge("batch_runner_requests_in_flight", "Requests sent to the upstream and not yet answered.")
LIMIT = Gauge("batch_runner_concurrency_limit", "In-flight limit chosen by the adaptive controller.", ["endpoint"])
LATENCY = Gauge("batch_runner_per_token_latency_seconds", "Latest window median of latency per output token.", ["endpoint"])
BASELINE = Gauge("batch_runner_per_token_baseline_seconds", "The controller's no-load per-token latency baseline.", ["endpoint"])
WAITING = Gauge("batch_runner_upstream_waiting", "Requests waiting in the engine's queue (vLLM /metrics), smoothed.", ["endpoint"])
CIRCUIT_OPEN = Gauge(
    "batch_runner_upstream_unavailable", "1 while the endpoint's circuit is open (it said \"not now\"), else 0.", ["endpoint"]
)
# Every attempt that got no 2xx, by HTTP status or "timeout" / "connection" (no answer). With the `ok` results of
# REQUESTS it gives the share of attempts that failed: each attempt is either one or the other.
UPSTREAM_ERRORS = Counter("batch_runner_upstream_errors_total", "Upstream attempts without a 2xx, by status.", ["code"])
RETRIES = Counter("batch_runner_retries_total", "Upstream requests retried after a transient failure.")
REQUESTS = Counter("batch_runner_requests_total", "Requests with a final result.", ["outcome"])
TOKENS = Counter("batch_runner_tokens_total", "Tokens of successful requests.", ["kind"])  # prompt, cached, completion
PREFIX_HIT_RATE = Gauge("batch_runner_prefix_cache_hit_rate", "Share of prompt tokens served from the engine's prefix cache.")
