"""The runner's Prometheus metrics, served on --runner-metrics-port while it runs. Every series is per runner pod, and
the pod (Workflow) is labelled with the batch id, so no batch-id label is needed here."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

INFLIGHT = Gauge("batch_runner_requests_in_flight", "Requests sent to the upstream and not yet answered.")
LIMIT = Gauge("batch_runner_concurrency_limit", "In-flight limit chosen by the adaptive controller.", ["endpoint"])
STEP = Gauge("batch_runner_engine_step_seconds", "The engine's mean inter-token latency (its step time).", ["endpoint"])
SLOWDOWN = Gauge(
    "batch_runner_interactive_slowdown",
    "Estimated slowdown of others' (interactive users') tokens caused by the batch: step now / step without it.",
    ["endpoint"],
)
INTERACTIVE = Gauge(
    "batch_runner_interactive_load", "Requests on the engine that are not batch runners' (smoothed).", ["endpoint"]
)
SHARED = Gauge(
    "batch_runner_engine_shared", "1 while others use the engine (the interactive budget rules).", ["endpoint"]
)
WAITING = Gauge(
    "batch_runner_upstream_waiting", "Requests waiting in the engine's queue (vLLM /metrics).", ["endpoint"]
)
PREEMPTED = Counter("batch_runner_preempted_total", "Batch requests aborted to make room for others (--preempt).")
CIRCUIT_OPEN = Gauge(
    "batch_runner_upstream_unavailable",
    '1 while the endpoint\'s circuit is open (it said "not now"), else 0.',
    ["endpoint"],
)
# Every attempt that got no 2xx, by HTTP status or "timeout" / "connection" (no answer). With the `ok` results of
# REQUESTS it gives the share of attempts that failed: each attempt is either one or the other.
UPSTREAM_ERRORS = Counter("batch_runner_upstream_errors_total", "Upstream attempts without a 2xx, by status.", ["code"])
RETRIES = Counter("batch_runner_retries_total", "Upstream requests retried after a transient failure.")
REQUESTS = Counter("batch_runner_requests_total", "Requests with a final result.", ["outcome"])
TOKENS = Counter("batch_runner_tokens_total", "Tokens of successful requests.", ["kind"])  # prompt, cached, completion
PREFIX_HIT_RATE = Gauge(
    "batch_runner_prefix_cache_hit_rate", "Share of prompt tokens served from the engine's prefix cache."
)

# The batch's deadline (runner/deadline.py).
PROJECTED_END = Gauge(
    "batch_runner_projected_completion_timestamp_seconds", "When the batch ends at its current pace (Unix time)."
)
NEED_SHARE = Gauge(
    "batch_runner_deadline_need_share",
    "Share of the engine's batch share the batch needs to end by its deadline (above 1: it cannot).",
)
DEADLINE_AT_RISK = Gauge("batch_runner_deadline_at_risk", "1 while the batch would end after its deadline at its pace.")
DEADLINE_UNREACHABLE = Gauge(
    "batch_runner_deadline_unreachable", "1 once even the engine's whole batch share would not end the batch in time."
)


PREFIX_OPEN_GROUPS = Gauge(
    "batch_runner_prefix_open_groups", "Prefix groups open at once on the endpoint (the prefix window).", ["endpoint"]
)
PREFIX_WORKING_TOKENS = Gauge(
    "batch_runner_prefix_working_tokens",
    "KV-cache tokens the open groups' prefixes and the running requests hold, as the prefix window counts them.",
    ["endpoint"],
)
PREFIX_CACHE_TOKENS = Gauge(
    "batch_runner_prefix_cache_tokens", "The engine's KV cache in tokens, as its /metrics says.", ["endpoint"]
)


def record_prefix_window(endpoint: str, snapshot: dict) -> None:
    """The prefix window of one endpoint (runner/prefix_window.py), after a reading."""
    PREFIX_OPEN_GROUPS.labels(endpoint=endpoint).set(snapshot["open_groups"])
    PREFIX_WORKING_TOKENS.labels(endpoint=endpoint).set(snapshot["working_tokens"])
    if snapshot["cache_tokens"] is not None:
        PREFIX_CACHE_TOKENS.labels(endpoint=endpoint).set(snapshot["cache_tokens"])


def record_controller(endpoint: str, snapshot: dict) -> None:
    """The controller's view of one endpoint, after a reading."""
    LIMIT.labels(endpoint=endpoint).set(snapshot["limit"])
    SHARED.labels(endpoint=endpoint).set(1 if snapshot["regime"] == "shared" else 0)
    INTERACTIVE.labels(endpoint=endpoint).set(snapshot["interactive_load"])
    if snapshot["waiting"] is not None:
        WAITING.labels(endpoint=endpoint).set(snapshot["waiting"])
    if snapshot["step_s"] is not None:
        STEP.labels(endpoint=endpoint).set(snapshot["step_s"])
    budget = snapshot["budget"]
    if budget is not None:
        SLOWDOWN.labels(endpoint=endpoint).set(budget["slowdown_now"])
