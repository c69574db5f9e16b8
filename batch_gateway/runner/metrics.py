"""The runner's Prometheus metrics (served on --metrics-port while it runs)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

INFLIGHT = Gauge("batch_runner_requests_in_flight", "Requests sent to the upstream and not yet answered.")
LIMIT = Gauge("batch_runner_concurrency_limit", "In-flight limit chosen by the controller.", ["endpoint"])
RETRIES = Counter("batch_runner_retries_total", "Retried upstream requests.")
REQUESTS = Counter("batch_runner_requests_total", "Requests with a final result.", ["outcome"])
