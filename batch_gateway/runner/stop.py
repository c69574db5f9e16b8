"""Why a run stops before every line has a result, decided once, and told to dispatch at once.

The lease's heartbeat (another runner took the batch over), the watch loop (a cancel, the expiry) and the process's
signal handler (a shutdown) may each decide it; the first reason wins.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from batch_gateway.runner.dispatch import Dispatcher


class StopReason(enum.StrEnum):
    """Why dispatch ended (run_stats' `ended`), and so how the batch ends."""

    COMPLETED = "completed"  # every line has a result
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    FAILED = "failed"  # given up: its runners kept crashing
    LEASE_LOST = "lease_lost"  # another runner took the batch over: this one leaves it alone
    SHUTDOWN = "shutdown"  # a signal: checkpoint and exit; the next runner resumes


class Stop:
    """The run's stop switch: call it with a reason; `reason` keeps the first."""

    def __init__(self, log: structlog.typing.FilteringBoundLogger) -> None:
        self.log = log
        self.reason: StopReason | None = None
        self._dispatcher: Dispatcher | None = None

    def dispatching(self, dispatcher: Dispatcher) -> None:
        """Dispatch has started: a stop reaches it from now on."""
        self._dispatcher = dispatcher

    @property
    def dispatch_started(self) -> bool:
        return self._dispatcher is not None

    def __call__(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
            self.log.info("runner.stopping", reason=reason)
        if self._dispatcher is not None:
            self._dispatcher.stop()
