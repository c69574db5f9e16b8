"""Prometheus metrics of the API: requests by route and status, latency, batches by status, files and bytes stored.

`/metrics` (no authentication, like the probes; keep it off the public ingress) refreshes the storage gauges from the
metadata store at scrape time, so every API replica reports the same figures.
"""

from __future__ import annotations

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from batch_gateway import wire

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "batch_gateway_http_requests_total", "HTTP requests by route and status.", ["method", "route", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "batch_gateway_http_request_duration_seconds",
    "HTTP request latency by route.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
BATCHES = Gauge("batch_gateway_batches", "Batches by status.", ["status"], registry=REGISTRY)
FILES = Gauge("batch_gateway_files", "Files stored, by purpose.", ["purpose"], registry=REGISTRY)
BYTES = Gauge("batch_gateway_file_bytes", "Bytes stored in files, by purpose.", ["purpose"], registry=REGISTRY)
STORAGE_UP = Gauge("batch_gateway_metadata_up", "1 when the metadata store answered the last scrape.", registry=REGISTRY)


def observe(method: str, route: str, status: int, seconds: float) -> None:
    REQUESTS.labels(method, route, str(status)).inc()
    LATENCY.labels(method, route).observe(seconds)


@get("/metrics")
async def metrics(request: Request) -> Response:
    services = request.app.state.services
    try:
        stats = await services.metadata.storage_stats()
    except Exception:
        STORAGE_UP.set(0)
    else:
        STORAGE_UP.set(1)
        for status in wire.BatchStatus.__args__:  # type: ignore[attr-defined]
            BATCHES.labels(status).set(stats.batches_by_status.get(status, 0))
        for purpose, (count, size) in stats.files_by_purpose.items():
            FILES.labels(purpose).set(count)
            BYTES.labels(purpose).set(size)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
