"""A batch's deadline, seen from its runner: the share of the engine it needs to end in time, when it will end at its
pace, and the weight it asks for on the load board.

Runners on one engine split its batch share by the weights they publish (`share.allocate`, in the controller). A
runner's fair weight is its tenant's weight (`keys tenant NAME --weight`), split between that tenant's runners on the
engine, so tenants share the engine by their weights however many batches each runs. Its *need* is the part of the
batch share that would end its remaining requests by the deadline: by Little's law, requests left / seconds left ×
seconds per request is the number of requests it must keep in flight, over what all the batch runners hold. A runner
whose need exceeds its fair part asks for a weight that gives it exactly its need (with a margin) against the others'
published weights; one with slack keeps its fair weight, and so yields to it. What they split stays what the
controller allows the batch as a whole (the interactive budget, when others use the engine); only the split changes.

Each reading also projects the batch's end at its measured pace: a batch that would end after its deadline is *at
risk* (a warning, once); one that needs more than the whole batch share is *unreachable* (an error, once, and a
`batch.deadline_unreachable` webhook event), known minutes after it starts, not at expiry. The forecast is kept
beside the batch every few seconds, for run_stats, metrics and the projected starts of the batches queued behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence

import structlog

from batch_gateway.errors import StorageUnavailable
from batch_gateway.runner import metrics as runner_metrics
from batch_gateway.store.metadata import BatchForecast, BatchRecord, MetadataStore, RunnerLoad
from batch_gateway.webhooks import EXTENSION_EVENT_TYPES

PACE_WINDOW = 30.0  # seconds of progress the pace is measured over
WARMUP_SECONDS = 10.0  # nothing is flagged before this much dispatch...
WARMUP_SERVICE_TIMES = 5.0  # ...and this many service times (slow start doubles once per service time)...
WARMUP_ANSWERS = 20  # ...and this many results: the controller is still finding the engine's size
UNREACHABLE_READINGS = 6  # readings in a row that need more than the whole batch share (3 s)
NEED_MARGIN = 1.25  # an urgent runner asks this much more than its need: measurements lag, and it must catch up
MAX_NEED = 0.9  # ...but never for more than this share of the batch share: the others keep a little
MAX_BOOST = 50.0  # nor a weight above this many times its fair weight
SAVE_INTERVAL = 5.0  # seconds between forecasts kept beside the batch (and re-reads of the tenant's weight)
CLOSE_WAIT = 1.0  # seconds the last forecast may take to save when dispatch ends
UNREACHABLE_EVENT = EXTENSION_EVENT_TYPES[0]  # batch.deadline_unreachable


def unreachable_event_id(batch_id: str) -> str:
    """The same id for every runner of the batch, so the event is sent once."""
    return "evt_" + hashlib.blake2b(f"{batch_id}:{UNREACHABLE_EVENT}".encode(), digest_size=16).hexdigest()


class DeadlineTracker:
    def __init__(
        self,
        metadata: MetadataStore,
        batch: BatchRecord,
        log: structlog.typing.FilteringBoundLogger,
        clock: Callable[[], float] = time.time,
        shares: bool = True,
    ) -> None:
        self.metadata = metadata
        self.shares = shares  # off (--no-deadline-shares): every runner takes an equal share
        self.batch = batch
        self.log = log
        self.clock = clock
        self.tenant_weight = 1.0
        self._progress: deque[tuple[float, int]] = deque()  # (time, results so far)
        self._started: float | None = None
        self._remaining = 0
        self._need: float | None = None  # share of the batch share needed, at the last reading
        self._need_of_engine: float | None = None  # share of the whole engine's capacity needed (if it is known)
        self._service_time = 0.0
        self._over = 0  # readings in a row needing more than the whole batch share
        self.at_risk_said = False
        self.unreachable = False
        self._saved_at = -math.inf
        self._saving: asyncio.Task | None = None

    # --- fed by dispatch ------------------------------------------------------------------------

    def progress(self, now: float, done: int, remaining: int) -> None:
        """Results so far in this run (`done`) and requests left, at a reading; keeps the forecast fresh."""
        if self._started is None:
            self._started = now
        self._remaining = remaining
        window = self._progress
        window.append((now, done))
        while len(window) > 2 and now - window[1][0] >= PACE_WINDOW:
            window.popleft()
        self._judge(now)
        if now - self._saved_at >= SAVE_INTERVAL and (self._saving is None or self._saving.done()):
            self._saved_at = now
            self._saving = asyncio.create_task(self._save(self.forecast(now)))

    def weight(
        self,
        now: float,
        *,
        remaining: int,
        service_time: float | None,
        limit: int,
        peers: Sequence[RunnerLoad],
        capacity: float | None = None,
    ) -> float:
        """The weight to take this endpoint's batch share with (and publish): the tenant's, split between its runners
        here, or more where the deadline needs it. `remaining` are the requests left for this endpoint; `capacity` the
        engine's concurrency at its knee, when the controller has found it."""
        fair = self.tenant_weight / (1 + sum(1 for p in peers if p.tenant == self.batch.tenant))
        if not self.shares:
            fair = 1.0
        total = limit + sum(p.limit for p in peers)  # what all the batch runners here hold: the batch share
        left = self.batch.expires_at - now
        if service_time is None or total <= 0:
            return fair
        in_flight = remaining * service_time / left if left > 0 else math.inf
        need = in_flight / total
        self._need = need
        self._service_time = service_time
        # Unreachable means beyond the whole batch share, and beyond the engine's capacity where it is known: a
        # controller still growing its total must not make a batch look hopeless.
        self._need_of_engine = in_flight / max(total, capacity or 0.0)
        others = sum(p.weight for p in peers)
        if not peers or others <= 0 or not self.shares:
            return fair
        asked = min(MAX_NEED, need * NEED_MARGIN)
        return min(max(fair, asked * others / (1.0 - asked)), fair * MAX_BOOST)

    # --- what it sees -----------------------------------------------------------------------------

    def pace(self) -> float | None:
        """Results per second over the last `PACE_WINDOW` seconds."""
        if len(self._progress) < 2:
            return None
        (t0, d0), (t1, d1) = self._progress[0], self._progress[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 and d1 > d0 else None

    def forecast(self, now: float) -> BatchForecast:
        pace = self.pace()
        end = now + self._remaining / pace if pace else (now if self._remaining == 0 else None)
        return BatchForecast(
            at=now,
            remaining=self._remaining,
            projected_end_at=round(end, 1) if end is not None else None,
            need_share=round(self._need, 3) if self._need is not None and math.isfinite(self._need) else None,
            at_risk=end is not None and end > self.batch.expires_at and self._warm(now),
            unreachable=self.unreachable,
        )

    def summary(self) -> dict:
        """For run_stats."""
        forecast = self.forecast(self._progress[-1][0] if self._progress else self.clock())
        return {
            "expires_at": self.batch.expires_at,
            "projected_end_at": forecast.projected_end_at,
            "need_share": forecast.need_share,
            "at_risk": forecast.at_risk or self.at_risk_said,
            "unreachable": self.unreachable,
            "tenant_weight": self.tenant_weight,
        }

    def _warm(self, now: float) -> bool:
        done = self._progress[-1][1] - self._progress[0][1] if self._progress else 0
        warmup = max(WARMUP_SECONDS, WARMUP_SERVICE_TIMES * self._service_time)
        return self._started is not None and now - self._started >= warmup and done >= WARMUP_ANSWERS

    def _judge(self, now: float) -> None:
        forecast = self.forecast(now)
        runner_metrics.DEADLINE_AT_RISK.set(1 if forecast.at_risk else 0)
        if forecast.projected_end_at is not None:
            runner_metrics.PROJECTED_END.set(forecast.projected_end_at)
        if forecast.need_share is not None:
            runner_metrics.NEED_SHARE.set(forecast.need_share)
        if forecast.at_risk and not self.at_risk_said:
            self.at_risk_said = True
            self.log.warning(
                "runner.deadline_at_risk",
                projected_end_at=forecast.projected_end_at,
                expires_at=self.batch.expires_at,
                need_share=forecast.need_share,
                remaining=self._remaining,
            )
        hopeless = self._need_of_engine is not None and self._need_of_engine > 1.0
        self._over = self._over + 1 if hopeless and self._warm(now) else 0
        if self._over >= UNREACHABLE_READINGS and not self.unreachable:
            self.unreachable = True
            runner_metrics.DEADLINE_UNREACHABLE.set(1)
            self.log.error(
                "runner.deadline_unreachable",
                need_share=forecast.need_share,
                projected_end_at=forecast.projected_end_at,
                expires_at=self.batch.expires_at,
                remaining=self._remaining,
                note="even the engine's whole batch share would not end it in time",
            )
            self._saved_at = -math.inf  # said at once, beside the batch too

    async def _save(self, forecast: BatchForecast) -> None:
        try:
            await self.metadata.save_forecast(self.batch.id, forecast)
            if forecast.unreachable:
                await self.metadata.add_webhook_event(
                    unreachable_event_id(self.batch.id),
                    self.batch.id,
                    self.batch.tenant,
                    UNREACHABLE_EVENT,
                    int(forecast.at),
                )
            policy = (await self.metadata.tenant_policies()).get(self.batch.tenant)
            self.tenant_weight = policy.weight if policy is not None else 1.0
        except StorageUnavailable as exc:  # the next save tries again; the weight stays as last read
            self.log.warning("runner.forecast_not_saved", error=str(exc))

    async def close(self) -> None:
        """Keep the last forecast (dispatch ended), if the database answers at once: finalising must not wait for it."""
        if self._saving is not None and not self._saving.done():
            self._saving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._saving
        if self._progress:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._save(self.forecast(self._progress[-1][0])), CLOSE_WAIT)
