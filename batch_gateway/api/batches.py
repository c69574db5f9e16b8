"""The four /v1/batches endpoints.

Creating a batch must never give the SDK a reason to send it again once it is stored: after `insert_batch` nothing
answers 5xx or 409 (the executor hand-off is best effort; the reconciler resubmits batches left in `validating`).
Retries that arrive anyway are folded into the first batch: by `Idempotency-Key` when the client sends one, otherwise
by the request's fingerprint when the SDK marks the request as a retry (`x-stainless-retry-count` > 0). Fingerprint
folding is a claim on a unique row (`claim_fold`), taken before the batch is stored, so of any number of concurrent
retries exactly one creates the batch and the others answer with it.

Idempotency-Key reused with a different request: 409 `idempotency_key_reused` with `x-should-retry: false` (the same
choice as Llama Stack; nothing was stored, and retrying could not help).
"""

from __future__ import annotations

import asyncio
import time

import structlog
from litestar import Request, Response, get, post

from batch_gateway import ids, wire
from batch_gateway.api.auth import PathId, Tenant
from batch_gateway.api.batch_create import completion_windows, parse_batch_create, window_label
from batch_gateway.api.context import BATCH_STATE
from batch_gateway.api.errors import json_response
from batch_gateway.api.state import services_of, upstreams_of
from batch_gateway.api.validation import query_int, query_str
from batch_gateway.errors import ApiError, Conflict, InvalidRequest, NotFound
from batch_gateway.services import Services
from batch_gateway.store.metadata import BatchRecord
from batch_gateway.wire import BatchStatus

log = structlog.get_logger("api.batches")

BATCHES_LIMIT_DEFAULT = 20
BATCHES_LIMIT_MAX = 100
RETRY_FOLD_WINDOW_SECONDS = 600
# How long a retry waits for the batch another request claimed to be stored before it takes the claim over.
FOLD_WAIT_SECONDS = 5.0
FOLD_POLL_SECONDS = 0.05
MAX_IDEMPOTENCY_KEY_CHARS = 255
CANCELLABLE = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
NO_RETRY = {"x-should-retry": "false"}
# Statuses whose runner may have progress the database has not seen yet.
_LIVE_STATUSES = wire.ACTIVE_STATUSES


def batch_not_found(batch_id: str) -> NotFound:
    return NotFound(f"No such Batch object: {batch_id}", param="id")


@post("/v1/batches", status_code=200)
async def create_batch(request: Request, tenant: Tenant) -> Response:
    services = services_of(request)
    windows = completion_windows(services.settings.completion_windows, services.settings.completion_window_seconds)
    spec = parse_batch_create(await request.body(), tuple(windows))
    fingerprint = spec.fingerprint(tenant)
    idempotency_key = _idempotency_key(request)
    batch_id = ids.new_batch_id()

    if idempotency_key is None:
        earlier = await _claim_or_fold(services, tenant, fingerprint, batch_id, retry=_retry_count(request) > 0)
        if earlier is not None:
            log.info("batch.retry_folded", batch_id=earlier.id)
            return json_response((await with_live_progress(services, [earlier]))[0])

    try:
        await _check_input_file(services, tenant, spec.input_file_id)
        await _check_endpoint_served(request, spec.endpoint)
    except ApiError:
        if idempotency_key is None:  # no batch will be stored under this claim: let a retry create one
            await services.metadata.release_fold(tenant, fingerprint, batch_id)
        raise
    created_at = ids.now()
    record = BatchRecord(
        id=batch_id,
        tenant=tenant,
        endpoint=spec.endpoint,
        input_file_id=spec.input_file_id,
        completion_window=window_label(windows[spec.completion_window]),
        status=BatchStatus.VALIDATING,
        created_at=created_at,
        expires_at=created_at + windows[spec.completion_window],
        metadata=spec.metadata,
        output_expires_after=spec.output_expires_after,
        fingerprint=fingerprint,
        idempotency_key=idempotency_key,
    )
    stored, created = await services.metadata.insert_batch(record)
    request.scope["state"][BATCH_STATE] = stored.id
    if not created:
        if stored.fingerprint != fingerprint:
            raise Conflict(
                f"Idempotency-Key '{idempotency_key}' was already used for a different request.",
                param="Idempotency-Key",
                code="idempotency_key_reused",
                headers=NO_RETRY,
            )
        log.info("batch.idempotent_replay", batch_id=stored.id)
        if stored.status == BatchStatus.VALIDATING:
            await _submit(services, stored)  # the first attempt's hand-off may have failed; submitting is idempotent
        return json_response((await with_live_progress(services, [stored]))[0])

    # -- persisted: from here on, only a 200 --
    log.info("batch.created", batch_id=stored.id, endpoint=stored.endpoint, input_file_id=stored.input_file_id)
    await _submit(services, stored)
    return json_response(stored.to_wire())


@get("/v1/batches")
async def list_batches(request: Request, tenant: Tenant) -> Response:
    limit = query_int(request, "limit", default=BATCHES_LIMIT_DEFAULT, minimum=1, maximum=BATCHES_LIMIT_MAX)
    services = services_of(request)
    records, has_more = await services.metadata.list_batches(tenant, after=query_str(request, "after"), limit=limit)
    data = await with_live_progress(services, records)
    page = wire.ListPage(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )
    return json_response(page)


@get("/v1/batches/{batch_id:str}")
async def retrieve_batch(request: Request, batch_id: PathId, tenant: Tenant) -> Response:
    services = services_of(request)
    record = await services.metadata.get_batch(batch_id, tenant)
    if record is None:
        raise batch_not_found(batch_id)
    return json_response((await with_live_progress(services, [record]))[0])


@post("/v1/batches/{batch_id:str}/cancel", status_code=200)
async def cancel_batch(request: Request, batch_id: PathId, tenant: Tenant) -> Response:
    services = services_of(request)
    record = await services.metadata.get_batch(batch_id, tenant)
    if record is None:
        raise batch_not_found(batch_id)
    # A compare-and-set can lose to the runner moving the batch on; look again and decide on what won.
    for _ in range(5):
        if record.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return json_response(record.to_wire())
        if record.status not in CANCELLABLE:
            raise Conflict(f"Cannot cancel a batch with status '{record.status}'.", headers=NO_RETRY)
        previous_status = record.status
        moved = await services.metadata.transition(batch_id, CANCELLABLE, BatchStatus.CANCELLING, ids.now())
        if moved is not None:
            log.info("batch.cancelling", batch_id=batch_id, previous_status=previous_status)
            await _signal_cancel(services, batch_id)
            return json_response(moved.to_wire())
        refreshed = await services.metadata.get_batch(batch_id, tenant)
        if refreshed is None:
            raise batch_not_found(batch_id)
        record = refreshed
    raise Conflict(f"Batch {batch_id} changed status while being cancelled; try again.")


async def _claim_or_fold(
    services: Services, tenant: str, fingerprint: str, batch_id: str, *, retry: bool
) -> BatchRecord | None:
    """Claim the request's fingerprint for `batch_id` (None: the caller creates the batch), or return the batch an SDK
    retry folds into. A first try always claims; a retry claims only when no batch was created from the same request
    within the fold window. A claimed batch may not be stored yet: wait for it, and take the claim over if it never
    appears (its request failed or died)."""
    metadata = services.metadata
    deadline = time.monotonic() + FOLD_WAIT_SECONDS
    while True:
        now = ids.now()
        holder = await metadata.claim_fold(
            tenant, fingerprint, batch_id, now, older_than=now - RETRY_FOLD_WINDOW_SECONDS if retry else None
        )
        if holder == batch_id:
            return None
        if holder is not None:
            earlier = await metadata.get_batch(holder, tenant)
            if earlier is not None:
                return earlier
            if time.monotonic() >= deadline:
                log.warning("batch.retry_fold_taken_over", stale_batch_id=holder)
                await metadata.release_fold(tenant, fingerprint, holder)
                deadline = time.monotonic() + FOLD_WAIT_SECONDS
                continue
        await asyncio.sleep(FOLD_POLL_SECONDS)


async def with_live_progress(services: Services, records: list[BatchRecord]) -> list[wire.Batch]:
    """The wire batches, with running ones' counts and usage brought up to date from the live signals. Live data
    can only be ahead of the database, so the larger value wins."""
    batches = [r.to_wire() for r in records]
    live_ids = [b.id for b in batches if b.status in _LIVE_STATUSES]
    if not live_ids:
        return batches
    progress = await services.signals.read_progress(live_ids)
    for batch in batches:
        if batch.id not in progress:
            continue
        counts, usage = progress[batch.id]
        db = batch.request_counts
        batch.request_counts = wire.RequestCounts(
            total=max(db.total, counts.total),
            completed=max(db.completed, counts.completed),
            failed=max(db.failed, counts.failed),
        )
        if usage is not None and (batch.usage is None or usage.total_tokens >= batch.usage.total_tokens):
            batch.usage = usage
    return batches


async def _check_input_file(services: Services, tenant: str, file_id: str) -> None:
    record = await services.metadata.get_file(file_id, tenant)
    if record is None:
        raise InvalidRequest(
            f"Invalid 'input_file_id': no file with id '{file_id}' exists, or you do not have access to it.",
            param="input_file_id",
            code="invalid_value",
        )
    if record.purpose != "batch":
        raise InvalidRequest(
            f"Invalid 'input_file_id': file '{file_id}' has purpose '{record.purpose}', but a batch input file "
            "must be uploaded with purpose 'batch'.",
            param="input_file_id",
            code="invalid_value",
        )


async def _check_endpoint_served(request: Request, endpoint: str) -> None:
    """Refuse a batch no upstream can run: the endpoint is in OpenAI's list, but no model server here answers it."""
    problem = await upstreams_of(request).endpoint_problem(endpoint)
    if problem is not None:
        raise InvalidRequest(
            f"The endpoint '{endpoint}' cannot be used with this gateway: {problem}",
            param="endpoint",
            code="invalid_value",
        )


async def _submit(services: Services, batch: BatchRecord) -> None:
    if services.executor is None:
        log.warning("batch.no_executor", batch_id=batch.id, note="the batch waits in validating for the reconciler")
        return
    try:
        await services.executor.submit(batch.id, tenant=batch.tenant, model=None, deadline=batch.expires_at)
    except Exception:
        log.exception("batch.submit_failed", batch_id=batch.id, note="the reconciler resubmits it")


async def _signal_cancel(services: Services, batch_id: str) -> None:
    try:
        await services.signals.request_cancel(batch_id)
    except Exception:
        log.exception("batch.cancel_signal_failed", batch_id=batch_id)
    if services.executor is not None:
        try:
            await services.executor.cancel(batch_id)
        except Exception:
            log.exception("batch.executor_cancel_failed", batch_id=batch_id)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None or not key.strip():
        return None
    key = key.strip()
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequest(
            f"The Idempotency-Key header is too long (at most {MAX_IDEMPOTENCY_KEY_CHARS} characters).",
            param="Idempotency-Key",
        )
    return key


def _retry_count(request: Request) -> int:
    try:
        return int(request.headers.get("x-stainless-retry-count", "0"))
    except ValueError:
        return 0
