"""`batch-gateway reconcile --batch-id ID`: the Workflow's exit handler.

It runs after the runner pod ended, however it ended. If the batch reached a terminal status there is nothing to do.
Otherwise this pod resumes the batch itself, as a runner: the runner code picks up from the checkpoints and finishes
it, or ends it expired or cancelled. If that crashes too (Argo's retries are spent already), the batch is given up: it
ends `failed` with every result its runners left published, so nothing is ever left stuck or silently dropped. A
runner that exits "retry later" (storage down) or finds another live runner on the batch leaves it to them and to the
next gc pass.
"""

from __future__ import annotations

import structlog

from batch_gateway.runner.exits import EXIT_CRASHED, EXIT_OK
from batch_gateway.runner.process import run_batch
from batch_gateway.services import Services
from batch_gateway.settings import Settings

log = structlog.get_logger("reconcile")


async def reconcile_batch(settings: Settings, batch_id: str) -> int:
    services = await Services.open(settings)
    try:
        batch = await services.metadata.get_batch(batch_id, None)
    finally:
        await services.close()
    if batch is None or batch.terminal:
        log.info("reconcile.nothing_to_do", batch_id=batch_id, status=batch.status if batch else None)
        return EXIT_OK
    log.warning("reconcile.resuming", batch_id=batch_id, status=batch.status)
    code = await run_batch(settings, batch_id)
    if code != EXIT_CRASHED:
        return code
    log.error("reconcile.giving_up", batch_id=batch_id)
    return await run_batch(
        settings, batch_id, give_up="The batch runner crashed repeatedly; see the runner's logs for this batch id."
    )
