"""The runner as a process: open storage, run one batch, exit 0 once the batch is terminal.

The exit code tells the executor what to do next (`exits.py`).

A runner started by `serve` (local executor) dies with it: `BATCH_GATEWAY_RUNNER_PARENT` names the parent's pid, and
the kernel sends the runner SIGTERM when that process goes (Linux's PR_SET_PDEATHSIG; elsewhere the runner polls its
parent). The runner then checkpoints and exits, so a `serve` killed with SIGKILL (or by the OOM killer) leaves no
orphan holding its batch, and the restarted `serve` resumes the batch at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

import structlog

from batch_gateway import tracing
from batch_gateway.runner.exits import EXIT_CRASHED, EXIT_LEASE_HELD, EXIT_OK, EXIT_RETRY_LATER, PARENT_ENV
from batch_gateway.runner.lease import LeaseLost
from batch_gateway.runner.patience import Interrupted, StorageGaveUp, with_patience
from batch_gateway.runner.run import BatchRunner
from batch_gateway.services import Services
from batch_gateway.settings import Settings

_PR_SET_PDEATHSIG = 1
PARENT_POLL_SECONDS = 1.0


async def run_batch(settings: Settings, batch_id: str, *, give_up: str | None = None) -> int:
    """Run the batch (or, with `give_up`, end it `failed` with that reason, publishing what finished)."""
    # Every line this process logs, whichever module writes it, carries the batch id.
    structlog.contextvars.bind_contextvars(batch_id=batch_id)
    log = structlog.get_logger("runner")
    tracing.configure(settings, "batch-gateway-runner")
    if settings.runner_metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(
                settings.runner_metrics_port, addr="0.0.0.0" if settings.executor == "argo" else "127.0.0.1"
            )
        except OSError as exc:  # metrics are worth a warning, never the batch (another runner on this host has it)
            log.warning("runner.metrics_port_unavailable", port=settings.runner_metrics_port, error=str(exc))
    main_task = asyncio.current_task()
    runner: BatchRunner | None = None

    def on_signal() -> None:
        # A pod being stopped, or `serve` gone: checkpoint what finished and exit; the next runner resumes.
        log.info("runner.signal_received")
        if (runner is None or not runner.shutdown()) and main_task is not None:
            main_task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    watchdog = _tie_to_parent(on_signal)
    services: Services | None = None
    try:
        services = await with_patience(
            "open storage", lambda: Services.open(settings), log=log, patience=settings.storage_retry_seconds
        )
        runner = BatchRunner(services, batch_id)
        await (runner.give_up(give_up) if give_up is not None else runner.run())
        return EXIT_OK
    except LeaseLost as exc:
        log.warning("runner.lease_held_elsewhere", error=str(exc))
        return EXIT_LEASE_HELD
    except (Interrupted, asyncio.CancelledError):
        log.info("runner.interrupted")
        return EXIT_RETRY_LATER
    except StorageGaveUp as exc:
        log.error("runner.retry_later", error=str(exc))
        return EXIT_RETRY_LATER
    except Exception:
        log.exception("runner.crashed")
        return EXIT_CRASHED
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if services is not None:
            await services.close()
        tracing.shutdown()  # sends the spans still buffered


def _tie_to_parent(on_parent_gone: Callable[[], None]) -> asyncio.Task[None] | None:
    """Die with the process that started us, if it said so (see the module docstring)."""
    raw = os.environ.get(PARENT_ENV)
    if not raw:
        return None
    parent = int(raw)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
                if os.getppid() != parent:  # gone before prctl took effect
                    on_parent_gone()
                return None

    async def poll() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(PARENT_POLL_SECONDS)
        on_parent_gone()

    return asyncio.create_task(poll())
