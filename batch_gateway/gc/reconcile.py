"""`batch-gateway reconcile --batch-id ID`: the Workflow's exit handler.

It runs after the runner pod ended, however it ended. If the batch reached a terminal status there is nothing to do.
Otherwise the runner died for good (Argo's retries are spent), so this pod resumes the batch itself: the runner code
picks up from the checkpoints and finishes it, or ends it expired or cancelled. Never left stuck.
"""

from __future__ import annotations

import structlog

from batch_gateway.runner.process import EXIT_OK, run_batch
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
    return await run_batch(settings, batch_id)
