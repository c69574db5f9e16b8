"""Prometheus metrics of the API: requests by route and status, latency, batches by status and by deadline, files and
bytes stored, and whether storage answers.

`/metrics` (no authentication, like the probes; keep it off the public ingress) refreshes the storage gauges from the
metadata store at scrape time, so every API replica reports the same figures. The alerts (charts/batch-gateway,
docs/operations.md) are written against these names.
"""

from __future__ import annotations

import asyncio
import collections

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from batch_gateway import wire
from batch_gateway.api.state import services_of
from batch_gateway.services import Services
from batch_gateway.store.metadata import StorageStats

REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "batch_gateway_http_requests_total",
    "HTTP requests by route and status.",
    ["method", "route", "status"],
    registry=REGISTRY,
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
OVERDUE = Gauge(
    "batch_gateway_batches_overdue", "Batches not yet ended whose completion window has passed.", registry=REGISTRY
)
NEAR_DEADLINE = Gauge(
    "batch_gateway_batches_near_deadline",
    "Batches not yet ended in the last fifth of their completion window (at risk of expiring).",
    registry=REGISTRY,
)
# Deadlines (admission.py, runner/deadline.py): one series per running batch (as many as runner slots) and per waiting
# batch at the head of the queue, refreshed at every scrape; the rest of a long queue only in its tenant's count
# (each batch's run_stats gives its place).
QUEUE_SERIES = 100
WAITING = Gauge(
    "batch_gateway_batches_waiting",
    "Batches waiting in the admission queue, by tenant.",
    ["tenant"],
    registry=REGISTRY,
)
QUEUE_POSITION = Gauge(
    "batch_gateway_batch_queue_position",
    f"A waiting batch's place in the admission queue (1 starts next), for the first {QUEUE_SERIES}.",
    ["batch_id", "tenant"],
    registry=REGISTRY,
)
PROJECTED_START = Gauge(
    "batch_gateway_batch_projected_start_timestamp_seconds",
    "When a waiting batch is projected to start (Unix time), where the runs ahead of it tell.",
    ["batch_id", "tenant"],
    registry=REGISTRY,
)
PROJECTED_END = Gauge(
    "batch_gateway_batch_projected_completion_timestamp_seconds",
    "When a running batch ends at its pace, as its runner last projected (Unix time).",
    ["batch_id", "tenant"],
    registry=REGISTRY,
)
AT_RISK = Gauge(
    "batch_gateway_batch_deadline_at_risk",
    "1 when a running batch would end after its deadline at its pace, else 0.",
    ["batch_id", "tenant"],
    registry=REGISTRY,
)
UNREACHABLE = Gauge(
    "batch_gateway_batch_deadline_unreachable",
    "1 when even the engine's whole batch share would not end the batch in time, else 0.",
    ["batch_id", "tenant"],
    registry=REGISTRY,
)
STORAGE_UP = Gauge(
    "batch_gateway_metadata_up", "1 when the metadata store answered the last scrape.", registry=REGISTRY
)
OBJECTS_UP = Gauge(
    "batch_gateway_object_store_up", "1 when the object store answered the last scrape.", registry=REGISTRY
)
OBJECT_STORE_TIMEOUT_SECONDS = 3.0
RUNNING_STATUSES = (wire.BatchStatus.IN_PROGRESS, wire.BatchStatus.FINALIZING)


def observe(method: str, route: str, status: int, seconds: float) -> None:
    REQUESTS.labels(method, route, str(status)).inc()
    LATENCY.labels(method, route).observe(seconds)


@get("/metrics")
async def metrics(request: Request) -> Response:
    services = services_of(request)
    stats, objects_up = await asyncio.gather(_storage_stats(services), _object_store_up(services))
    OBJECTS_UP.set(1 if objects_up else 0)
    if stats is None:
        STORAGE_UP.set(0)
    else:
        STORAGE_UP.set(1)
        for status in wire.BatchStatus:
            BATCHES.labels(status).set(stats.batches_by_status.get(status, 0))
        for purpose, (count, size) in stats.files_by_purpose.items():
            FILES.labels(purpose).set(count)
            BYTES.labels(purpose).set(size)
        OVERDUE.set(stats.overdue_batches)
        NEAR_DEADLINE.set(stats.near_deadline_batches)
    await _deadlines(services)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


async def _deadlines(services: Services) -> None:
    for gauge in (WAITING, QUEUE_POSITION, PROJECTED_START, PROJECTED_END, AT_RISK, UNREACHABLE):
        gauge.clear()  # batches that started or ended since the last scrape drop out
    if services.executor is not None:
        queue = services.executor.queue()
        for tenant, count in collections.Counter(place.batch.tenant for place in queue).items():
            WAITING.labels(tenant).set(count)
        for place in queue[:QUEUE_SERIES]:
            labels = (place.batch.batch_id, place.batch.tenant)
            QUEUE_POSITION.labels(*labels).set(place.position)
            if place.projected_start is not None:
                PROJECTED_START.labels(*labels).set(place.projected_start)
    try:
        running = await services.metadata.batches_with_status(RUNNING_STATUSES)
        forecasts = await services.metadata.forecasts([b.id for b in running])
    except Exception:  # the storage gauges above say so
        return
    for batch in running:
        forecast = forecasts.get(batch.id)
        if forecast is None:
            continue
        labels = (batch.id, batch.tenant)
        if forecast.projected_end_at is not None:
            PROJECTED_END.labels(*labels).set(forecast.projected_end_at)
        AT_RISK.labels(*labels).set(1 if forecast.at_risk else 0)
        UNREACHABLE.labels(*labels).set(1 if forecast.unreachable else 0)


async def _storage_stats(services: Services) -> StorageStats | None:
    try:
        return await services.metadata.storage_stats()
    except Exception:
        return None


async def _object_store_up(services: Services) -> bool:
    try:
        await asyncio.wait_for(services.objects.ping(), OBJECT_STORE_TIMEOUT_SECONDS)
    except Exception:  # any failure, timeouts included, means "down"
        return False
    return True
