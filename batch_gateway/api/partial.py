"""`GET /v1/batches/{batch_id}/partial_results`: the successful results finished so far, while the batch runs.

An extension, off OpenAI's paths, so SDK users are unaffected. It streams the output lines of the checkpoint parts
the runner has made durable (a result appears within `--checkpoint-interval` seconds of finishing), each line once.
Once the batch is terminal, the checkpoints are gone and this streams the output file instead. Lines have exactly the
output file's format; order is not guaranteed.

It never fails for want of results: a batch with no output file, or whose output file was deleted (by its owner, or
when it expired), answers 200 with an empty body, as a batch with nothing finished yet does. A batch that ends while
its parts are being streamed (its runner deletes them once the output file is written) gets the rest of its lines
from the output file, so a response never misses a line that was durable when it started.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from litestar import Request, Response, get
from litestar.response import Stream

from batch_gateway.api.auth import PathId, Tenant
from batch_gateway.api.batches import batch_not_found
from batch_gateway.api.state import services_of
from batch_gateway.errors import NotFound
from batch_gateway.services import Services
from batch_gateway.store.metadata import BatchRecord
from batch_gateway.store.objects import ObjectMissing, batch_prefix, run_stats_key
from batch_gateway.store.parts import Parts, ResultKind, lines

JSONL = "application/jsonl"


@get("/v1/batches/{batch_id:str}/partial_results")
async def partial_results(request: Request, tenant: Tenant, batch_id: PathId) -> Response | Stream:
    services = services_of(request)
    batch = await services.metadata.get_batch(batch_id, tenant)
    if batch is None:
        raise batch_not_found(batch_id)
    if batch.terminal:
        chunks = await _output_file(services, batch)
        return Response(b"", media_type=JSONL) if chunks is None else Stream(chunks, media_type=JSONL)
    parts = Parts(services.objects, batch_prefix(tenant, batch_id))
    keys = await parts.part_keys()

    async def results() -> AsyncIterator[bytes]:
        seen: set[int] = set()
        sent: set[int] = set()  # hashes of the result lines sent, to skip them in the output file
        async for line, kind, _, result in parts.records(keys):
            if line not in seen:
                seen.add(line)
                if kind == ResultKind.OUTPUT:
                    sent.add(hash(result))
                    yield result + b"\n"
        ended = await services.metadata.get_batch(batch_id, tenant)
        chunks = await _output_file(services, ended) if ended is not None and ended.terminal else None
        if chunks is not None:  # the batch ended meanwhile, and its parts may have gone before they were read
            async for result in lines(chunks):
                if hash(result) not in sent:
                    yield result + b"\n"

    return Stream(results(), media_type=JSONL)


async def _output_file(services: Services, batch: BatchRecord) -> AsyncIterator[bytes] | None:
    """The chunks of a terminal batch's output file, or None if it has none or it was deleted."""
    if batch.output_file_id is None:
        return None
    record = await services.metadata.get_file(batch.output_file_id, batch.tenant)
    if record is None:
        return None
    try:
        return await services.objects.stream(record.object_key)
    except ObjectMissing:
        return None


@get("/v1/batches/{batch_id:str}/run_stats")
async def run_stats(request: Request, tenant: Tenant, batch_id: PathId) -> Response:
    """Another extension: the final figures of the batch's run once it has ended; before that, where it stands
    (`live_run_stats`)."""
    services = services_of(request)
    batch = await services.metadata.get_batch(batch_id, tenant)
    if batch is None:
        raise batch_not_found(batch_id)
    if not batch.terminal:
        return Response(msgspec.json.encode(await live_run_stats(services, batch)), media_type="application/json")
    try:
        body = await services.objects.get_bytes(run_stats_key(tenant, batch_id))
    except ObjectMissing:
        raise NotFound(
            f"Batch {batch_id} has no run statistics yet; they are written when it ends.", param="id"
        ) from None
    return Response(body, media_type="application/json")


async def live_run_stats(services: Services, batch: BatchRecord) -> dict:
    """A batch that has not ended: its place in the admission queue while it waits for a runner (`position` 1 starts
    next; `projected_start_at` is an estimate, null when nothing tells yet), and its runner's latest forecast once it
    runs (when it ends at its pace, the share of the engine it needs, whether it is at risk or cannot make it)."""
    place = services.executor.queue_place(batch.id) if services.executor is not None else None
    forecast = (await services.metadata.forecasts([batch.id])).get(batch.id)
    return {
        "ended": None,
        "status": batch.status,
        "expires_at": batch.expires_at,
        "queue": {"position": place.position, "projected_start_at": _whole(place.projected_start)} if place else None,
        "deadline": msgspec.to_builtins(forecast) if forecast is not None else None,
    }


def _whole(value: float | None) -> int | None:
    return None if value is None else round(value)
