"""`GET /v1/batches/{batch_id}/partial_results`: the successful results finished so far, while the batch runs.

An extension, off OpenAI's paths, so SDK users are unaffected. It streams the output lines of the checkpoint parts
the runner has made durable (a result appears within `--checkpoint-interval` seconds of finishing), each line once.
Once the batch is terminal, the checkpoints are gone and this streams the output file instead. Lines have exactly the
output file's format; order is not guaranteed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from litestar import Request, Response, get
from litestar.response import Stream

from batch_gateway.api.auth import PathId, Tenant
from batch_gateway.api.batches import batch_not_found
from batch_gateway.api.files import services_of
from batch_gateway.errors import NotFound
from batch_gateway.runner.checkpoint import OUTPUT, Checkpoints
from batch_gateway.store.objects import ObjectMissing, batch_prefix, file_key, run_stats_key

JSONL = "application/jsonl"


@get("/v1/batches/{batch_id:str}/partial_results")
async def partial_results(request: Request, tenant: Tenant, batch_id: PathId) -> Response | Stream:
    services = services_of(request)
    batch = await services.metadata.get_batch(batch_id, tenant)
    if batch is None:
        raise batch_not_found(batch_id)
    if batch.terminal:
        if batch.output_file_id is None:
            return Response(b"", media_type=JSONL)
        return Stream(await services.objects.stream(file_key(tenant, batch.output_file_id)), media_type=JSONL)
    checkpoints = Checkpoints(services.objects, batch_prefix(tenant, batch_id), owner="reader")
    keys = await checkpoints.part_keys()

    async def lines() -> AsyncIterator[bytes]:
        seen: set[int] = set()
        async for line, kind, _, result in checkpoints.records(keys):
            if line not in seen:
                seen.add(line)
                if kind == OUTPUT:
                    yield result + b"\n"

    return Stream(lines(), media_type=JSONL)


@get("/v1/batches/{batch_id:str}/run_stats")
async def run_stats(request: Request, tenant: Tenant, batch_id: PathId) -> Response:
    """Another extension: the final figures of the batch's run (404 until the batch has ended)."""
    services = services_of(request)
    if await services.metadata.get_batch(batch_id, tenant) is None:
        raise batch_not_found(batch_id)
    try:
        body = await services.objects.get_bytes(run_stats_key(tenant, batch_id))
    except ObjectMissing:
        raise NotFound(f"Batch {batch_id} has no run statistics yet; they are written when it ends.", param="id") from None
    return Response(body, media_type="application/json")
