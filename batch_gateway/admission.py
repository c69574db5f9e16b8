"""Which waiting batch starts next: earliest deadline first, within weighted fair sharing between tenants.

Both executors obey the same order (`plan`): the local executor starts its subprocesses in it, and the Argo executor
creates Workflows in it, holding the others back in the API, so Argo only ever sees batches that may run now. The
rule, one runner slot (`--max-concurrent-runners`) at a time:

1. A tenant at its cap (`max_running`, `batch-gateway keys tenant NAME --max-running N`) takes no slot.
2. The slots are shared between the tenants that have batches, running or waiting, by weighted max-min fairness
   (their `weight`): a tenant that wants fewer than its part leaves the rest to the others.
3. Of the tenants below their fair part, the one missing the largest share of it takes the slot; between equals, the
   one whose next batch has the earliest deadline. When none is below its part (every tenant has it and slots are
   left), the earliest deadline of all takes it.
4. Except for urgent batches, those that have waited through half their window: they go first, earliest deadline
   first, even when their tenant has its part already, by one slot at most (a flood of them cannot take every slot).

What a tenant holds is the larger of the slots it holds now and its share of the slots held lately (`SlotUsage`, over
`--fair-share-window` seconds) times the slots: with fewer slots than tenants, a tenant whose batch just ended is not
below its part again at once, so the tenants take turns. Within a tenant, batches go by deadline, then by arrival.
A tenant flooding the queue gets its fair part and no more while others wait, so another tenant's single batch waits
at most until the next slot frees up. `--admission-order fifo` starts batches in arrival order instead.

Batches being cancelled, or already past their deadline, start at once outside the slots: their runner only ends them.
Queue positions and projected starts beyond the free slots are estimates: they assume the runs end when their runners
project, and the tenant most above its fair part gives a slot back first.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from batch_gateway.store.metadata import BatchRecord, TenantPolicy

DEFAULT_POLICY = TenantPolicy()
URGENT_SHARE = 0.5  # a waiting batch with less than this share of its window left is urgent


@dataclass(frozen=True)
class Waiting:
    """A batch that has no runner yet."""

    batch_id: str
    tenant: str
    deadline: float  # its expires_at
    arrived: float  # its created_at
    model: str | None = None

    @classmethod
    def of(cls, batch: BatchRecord) -> Waiting:
        return cls(batch.id, batch.tenant, batch.expires_at, batch.created_at, batch.model)

    @property
    def key(self) -> tuple[float, float, str]:
        return (self.deadline, self.arrived, self.batch_id)

    def urgent(self, now: float) -> bool:
        """In the last `URGENT_SHARE` of its window: waiting any longer, it may not make its deadline."""
        return self.deadline - now < URGENT_SHARE * (self.deadline - self.arrived)


@dataclass(frozen=True)
class Running:
    """A batch with a runner: who it is for, and when its runner projects it to end (None: not known yet)."""

    tenant: str
    started: float | None = None
    projected_end: float | None = None


@dataclass(frozen=True)
class Place:
    """A waiting batch's place in the queue: 1 starts next."""

    batch: Waiting
    position: int
    projected_start: float | None


@dataclass(frozen=True)
class Plan:
    start: list[Waiting]  # start these now, in this order
    queue: list[Place]  # the others, in the order they will start

    def place_of(self, batch_id: str) -> Place | None:
        return next((place for place in self.queue if place.batch.batch_id == batch_id), None)


class SlotUsage:
    """Each tenant's runner slots held, averaged over the last `window` seconds (an exponential moving average)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._usage: dict[str, float] = {}
        self._holding: dict[str, int] = {}  # as last observed: what was held since
        self._at: float | None = None

    def observe(self, holding: Mapping[str, int], now: float) -> dict[str, float]:
        """Account for the slots held since the last observation, and note `holding` (tenant -> slots held now);
        returns the averages."""
        if self._at is not None and now > self._at and self.window > 0:
            keep = math.exp(-(now - self._at) / self.window)
            for tenant in set(self._usage) | set(self._holding):
                value = self._usage.get(tenant, 0.0) * keep + self._holding.get(tenant, 0) * (1.0 - keep)
                if value < 1e-9:
                    self._usage.pop(tenant, None)
                else:
                    self._usage[tenant] = value
        if self._at is None or now >= self._at:
            self._at = now
            self._holding = {t: n for t, n in holding.items() if n > 0}
        return dict(self._usage)


def needs_runner_now(batch: BatchRecord, now: float) -> bool:
    """Its runner only ends it (cancelled, or past its deadline): it takes no slot."""
    return batch.status == "cancelling" or batch.expires_at <= now


def plan(
    waiting: Sequence[Waiting],
    running: Sequence[Running],
    slots: int,
    policies: Mapping[str, TenantPolicy],
    now: float,
    usage: Mapping[str, float] | None = None,
    fifo: bool = False,
) -> Plan:
    """Which of `waiting` start now, given `running`, `slots` runner slots and the tenants' recent `usage` of them
    (`SlotUsage`), and the order of the rest; `fifo`: arrival order alone (`--admission-order fifo`)."""
    if slots <= 0:  # nothing runs: the queue in the order it would start
        ordered = sorted(waiting, key=lambda b: b.key)
        return Plan([], [Place(b, i + 1, None) for i, b in enumerate(ordered)])
    if fifo:
        ordered = sorted(waiting, key=lambda b: (b.arrived, b.batch_id))
        free = max(0, slots - len(running))
        starts = _projected_starts(len(ordered) - free, running, 0, now) if len(ordered) > free else []
        places = [Place(b, i + 1, t) for i, (b, t) in enumerate(zip(ordered[free:], starts, strict=True))]
        return Plan(ordered[:free], places)
    # What each tenant held lately, as its share of all the slots held lately: the window's length cancels out.
    held = sum((usage or {}).values())
    standing = {t: slots * u / held for t, u in (usage or {}).items()} if held > 0 else {}
    queues: dict[str, list[Waiting]] = {}
    for batch in sorted(waiting, key=lambda b: b.key):
        queues.setdefault(batch.tenant, []).append(batch)
    holding = Counter(r.tenant for r in running)
    busy = len(running)
    order: list[Waiting] = []
    start: list[Waiting] = []
    projected = False  # from here on, the order assumes runs that have not ended yet
    while any(queues.values()):
        if busy >= slots:
            _end_one(_gives_back(holding, policies), holding, standing)
            busy -= 1
            projected = True
        pick = _choose(queues, holding, standing, slots, policies, now)
        if pick is None:  # every tenant with waiting batches is at its cap: one of its own runs must end first
            _end_one(min((t for t, q in queues.items() if q), key=lambda t: queues[t][0].key), holding, standing)
            busy -= 1
            projected = True
            continue
        order.append(pick)
        holding[pick.tenant] += 1
        busy += 1
        if not projected:
            start.append(pick)
    queued = order[len(start) :]
    starts = _projected_starts(len(queued), running, slots - len(running) - len(start), now)
    return Plan(start, [Place(b, i + 1, t) for i, (b, t) in enumerate(zip(queued, starts, strict=True))])


def _policy(policies: Mapping[str, TenantPolicy], tenant: str) -> TenantPolicy:
    return policies.get(tenant, DEFAULT_POLICY)


def _choose(
    queues: dict[str, list[Waiting]],
    holding: Counter[str],
    usage: Mapping[str, float],
    slots: int,
    policies: Mapping[str, TenantPolicy],
    now: float,
) -> Waiting | None:
    def capped(tenant: str) -> bool:
        cap = _policy(policies, tenant).max_running
        return cap is not None and holding[tenant] >= cap

    eligible = [t for t, queue in queues.items() if queue and not capped(t)]
    if not eligible:
        return None
    tenants = sorted({t for t, n in holding.items() if n > 0} | {t for t, q in queues.items() if q})
    demands = []
    for tenant in tenants:
        cap = _policy(policies, tenant).max_running
        wanted = holding[tenant] + len(queues.get(tenant, ()))
        demands.append(float(wanted if cap is None else min(wanted, cap)))
    fair = dict(zip(tenants, fair_parts(slots, demands, [_policy(policies, t).weight for t in tenants]), strict=True))
    # Near its deadline, a batch may take one slot beyond its tenant's part, earliest deadline first.
    urgent = [t for t in eligible if queues[t][0].urgent(now) and holding[t] < fair[t] + 1 - 1e-9]
    # Below its part, the tenant missing the largest share of it goes first (parts of a slot are taken in turn).
    owed = {t: (fair[t] - max(holding[t], usage.get(t, 0.0))) / fair[t] for t in eligible if fair[t] > 0}
    below = [t for t, share in owed.items() if share > 1e-9]
    if below:
        most = max(owed[t] for t in below)
        below = [t for t in below if owed[t] >= most - 1e-9]
    tenant = min(urgent or below or eligible, key=lambda t: queues[t][0].key)
    return queues[tenant].pop(0)


def fair_parts(total: float, demands: list[float], weights: list[float]) -> list[float]:
    """Weighted max-min fair parts of `total`: nobody gets more than it asks, and what someone does not need goes to
    the others by their weights. (The runner splits an engine the same way, `runner/share.py`; the executors may not
    import the runner.)"""
    parts = [0.0] * len(demands)
    left = max(0.0, total)
    weight_left = sum(weights)
    for i in sorted(range(len(demands)), key=lambda i: demands[i] / weights[i] if weights[i] > 0 else float("inf")):
        if weight_left <= 0:
            break
        parts[i] = min(max(0.0, demands[i]), left * weights[i] / weight_left)
        left -= parts[i]
        weight_left -= weights[i]
    return parts


def _end_one(tenant: str, holding: Counter[str], standing: dict[str, float]) -> None:
    """A projected end of one of `tenant`'s runs: it gives the slot back, and counts as having held it lately."""
    standing[tenant] = max(standing.get(tenant, 0.0), float(holding[tenant]))
    holding[tenant] -= 1


def _gives_back(holding: Counter[str], policies: Mapping[str, TenantPolicy]) -> str:
    """The tenant assumed to free the next slot: the one holding most for its weight."""
    return max((t for t, n in holding.items() if n > 0), key=lambda t: (holding[t] / _policy(policies, t).weight, t))


def _projected_starts(count: int, running: Sequence[Running], free: int, now: float) -> list[float | None]:
    """When each of the next `count` queued batches may start: as slots free up, at the runs' projected ends, each
    queued batch then taking about as long as the running ones take."""
    frees = [now] * max(0, free) + [r.projected_end for r in running if r.projected_end is not None]
    heapq.heapify(frees)
    durations = [r.projected_end - r.started for r in running if r.projected_end is not None and r.started is not None]
    typical = statistics.median(durations) if durations else None
    starts: list[float | None] = []
    for _ in range(count):
        if not frees:
            starts.append(None)
            continue
        at = max(now, heapq.heappop(frees))
        starts.append(at)
        if typical is not None:
            heapq.heappush(frees, at + typical)
    return starts
