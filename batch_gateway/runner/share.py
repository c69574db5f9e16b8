"""Splitting the batch share of one engine between the batch runners that use it.

Every runner on an endpoint publishes what it holds and what it could use (`RunnerLoad`) on a board in the metadata
store, and reads everyone else's. From the same engine gauges each works out the same total for all batch work
(beside interactive users, from the mean of the budgets their step-time fits give, which they publish too), and
takes its own part of the same split: weighted max-min fairness, so a runner that needs less than an equal part (a
batch near its end) leaves the rest to the others, and none waits for a probe to find the room.
"""

from __future__ import annotations

from batch_gateway.store.metadata import RunnerLoad

__all__ = ["RunnerLoad", "allocate"]


def allocate(total: float, demands: list[float], weights: list[float] | None = None) -> list[float]:
    """Weighted max-min fair split of `total` between claimants asking for `demands`: nobody gets more than it asks,
    and what someone does not need is shared by the others in proportion to their weights."""
    n = len(demands)
    weights = weights or [1.0] * n
    shares = [0.0] * n
    remaining = max(0.0, total)
    open_ = sorted(range(n), key=lambda i: demands[i] / weights[i] if weights[i] > 0 else float("inf"))
    weight_left = sum(weights[i] for i in open_)
    for i in open_:
        if weight_left <= 0:
            break
        fair = remaining * weights[i] / weight_left
        shares[i] = min(max(0.0, demands[i]), fair)
        remaining -= shares[i]
        weight_left -= weights[i]
    return shares
