"""The runner as a process: open storage, run one batch, exit 0 once the batch is terminal."""

from __future__ import annotations

import asyncio
import signal

import structlog

from batch_gateway.runner.run import BatchRunner, Interrupted, LeaseLost
from batch_gateway.services import Services
from batch_gateway.settings import Settings

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_LEASE_LOST = 3


async def run_batch(settings: Settings, batch_id: str) -> int:
    # Every line this process logs, whichever module writes it, carries the batch id.
    structlog.contextvars.bind_contextvars(batch_id=batch_id)
    log = structlog.get_logger("runner")
    if settings.runner_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.runner_metrics_port, addr="0.0.0.0" if settings.executor == "argo" else "127.0.0.1")
    services = await Services.open(settings)
    runner = BatchRunner(services, batch_id)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal() -> None:
        # A pod being stopped: checkpoint what finished and exit; the next runner resumes where this one stopped.
        log.info("runner.signal_received")
        if not runner.shutdown() and main_task is not None:
            main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        status = await runner.run()
        return EXIT_OK if status != "missing" else EXIT_CRASHED
    except LeaseLost as exc:
        log.warning("runner.lease_lost", error=str(exc))
        return EXIT_LEASE_LOST
    except Interrupted:
        log.info("runner.interrupted")
        return EXIT_CRASHED
    except asyncio.CancelledError:
        log.info("runner.interrupted")
        return EXIT_CRASHED
    except Exception:
        log.exception("runner.crashed")
        return EXIT_CRASHED
    finally:
        await services.close()

