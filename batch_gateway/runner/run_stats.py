"""A run's figures: logged when dispatch ends, and kept beside the batch when it ends
(GET /v1/batches/{id}/run_stats shows them).

Shown to the tenant: endpoint names, never addresses, and nothing about this host.
"""

from __future__ import annotations

from typing import Any

import msgspec

from batch_gateway.runner.checkpoint import Totals
from batch_gateway.runner.dispatch import Dispatcher, Endpoint
from batch_gateway.runner.stop import StopReason


class DispatchStats(msgspec.Struct):
    dispatch_seconds: float
    requests_sent_this_run: int
    resumed_with_done: int
    retries: int
    preempted: int
    preempted_tokens_estimate: int
    prefix_warm_ups: int  # one-token copies of group heads sent (runner/warm_up.py)
    prefix_warm_ups_failed: int
    prefix_joins: int  # groups an endpoint took over from another's (its own stand-in head: the prefix once more)
    ended: StopReason
    deadline: dict[str, Any] | None  # the deadline tracker's outlook (runner/deadline.py); None without a tracker
    endpoints: dict[str, dict[str, Any]]  # by name: the controller's figures, the circuit's, the prefix window's

    @classmethod
    def of(
        cls,
        dispatcher: Dispatcher,
        endpoints: list[Endpoint],
        *,
        sent: int,
        resumed_with_done: int,
        seconds: float,
        ended: StopReason,
        deadline: dict[str, Any] | None,
        now: float,
    ) -> DispatchStats:
        return cls(
            dispatch_seconds=round(seconds, 3),
            requests_sent_this_run=sent,
            resumed_with_done=resumed_with_done,
            retries=dispatcher.retries,
            preempted=dispatcher.preempted,
            preempted_tokens_estimate=round(dispatcher.preempted_tokens),
            prefix_warm_ups=dispatcher.warm_ups,
            prefix_warm_ups_failed=dispatcher.warm_ups_failed,
            prefix_joins=dispatcher.scheduler.joins,
            ended=ended,
            deadline=deadline,
            endpoints={
                ep.name: {
                    **ep.controller.snapshot(),
                    "upstream_unavailable": ep.circuit.snapshot(now),
                    "prefix_window": window.snapshot(),
                }
                for ep, window in zip(endpoints, dispatcher.scheduler.windows, strict=True)
            },
        )

    def loggable(self) -> dict[str, Any]:
        """The figures for the log, without the per-endpoint detail."""
        return {name: value for name, value in msgspec.structs.asdict(self).items() if name != "endpoints"}


def final_stats(dispatch: DispatchStats | None, totals: Totals) -> bytes:
    """The run's final figures, as JSON: its dispatch (none when nothing was sent) and the batch's totals."""
    usage = totals.usage
    return msgspec.json.encode(
        {
            **(msgspec.structs.asdict(dispatch) if dispatch is not None else {}),
            "completed": totals.completed,
            "failed": totals.failed,
            "prefix_cache_hit_rate": usage.input_tokens_details.cached_tokens / usage.input_tokens
            if usage.input_tokens
            else None,
        }
    )
