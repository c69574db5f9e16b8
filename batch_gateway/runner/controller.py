"""Adaptive concurrency for one upstream endpoint: fill the engine while the batch has it to itself; when others use
it, take only what keeps their slowdown within the interactive budget. A pure object: no I/O, no clock reads.

The policy (docs/controller.md explains it with figures) rests on what the engine shows at each reading of its
`/metrics` (`on_engine`), on what the other batch runners on the endpoint publish (`RunnerLoad`), and on our own
requests:

* **Who is using the engine.** Its load (running + waiting) minus the batch runners' requests in flight is everyone
  else's: interactive users. The engine's count of finished requests minus the runners' answers says the same for
  users whose requests are short. Either, on two readings running, means the engine is *shared*; it is *ours* (all
  batch runners') again `INTERACTIVE_HOLD` seconds after the last sign of anyone else.
* **Ours: fill to the knee.** Slow start doubles the batch's total once per service time until the engine queues
  (a waiting queue beside a full running batch, or a full KV cache); its running count then is the engine's
  capacity, and the total stays there, probed upward now and then. Past the knee more requests only queue.
* **Shared: the interactive budget.** Their inter-token latency is the engine's step time, `a + m·R` for R running
  sequences (`step_model.py` learns a and m online). Their requests last a number of steps, so without the batch
  fewer of theirs would run at once (Little's law): their slowdown works out to `1 + m·R_batch / a` whatever their
  load, and the batch may run `(slowdown - 1)·a/m` sequences. It never takes more than the room their load leaves
  (with headroom for its bursts), and when they queue it cuts at once and keeps the room free a while. When they
  arrive, the total drops at the next reading (every half second); in-flight requests finish within one of their
  service times, or with `--preempt` the excess is aborted at once.
* **Several batch runners** split the total by weighted max-min fairness (`share.py`), each computing the same split
  from the same board.
* **Hard backpressure** (429, 503, timeouts) halves what the runner takes, once per flight; it comes back by a quarter
  per reading.
* **Blind** (no usable `/metrics`): nobody else can be seen, so the runner behaves as a careful client of a hosted
  API: additive increase (+1 per limit's worth of answers), multiplicative decrease on backpressure.

With `fixed`, the limit never moves; signals are still recorded for the snapshot.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from batch_gateway.runner.share import RunnerLoad, allocate
from batch_gateway.runner.step_model import StepModel

BACKOFF = 0.5  # cut on hard backpressure, once per flight
BACKOFF_RECOVERY = 1.25  # per reading without backpressure, back toward 1
READINGS_TTL = 10.0  # the engine's gauges are in charge while readings come at least this often
QUEUE_STEPS = 3.0  # admitted requests that waited this many steps on average mean a queue
QUEUE_ALLOWANCE = 1.0  # without queue times: waiting requests that are only arrivals between two steps...
QUEUE_ALLOWANCE_SHARE = 0.01  # ...plus this share of the running batch
KV_FULL = 0.95  # KV-cache usage at which the engine starts preempting: as good as a queue
CAPACITY_MEMORY = 10.0  # seconds over which the largest running count stands for the engine's capacity
PROBE_SHARE = 0.05  # after the knee, the total is probed upward by this share of the capacity...
PROBE_HOLD = 10.0  # ...at most every this many seconds...
PROBE_SERVICE_TIMES = 3.0  # ...and every this many service times (an overshoot queues for a whole one)
UNSEEN_SHARE = 0.1  # our requests the gauges may not show yet (in transit) before growth waits for them
PRESENCE_MIN = 1.5  # others' requests in the engine that mean someone is there...
PRESENCE_SHARE = 0.02  # ...plus this share of the batch's (what runners publish lags a little)
PRESENCE_COMPLETIONS = 3  # or others' finished requests in the completion window
PEER_SLACK = 0.25  # share of the other runners' published limits that may be their growth since they published
COMPLETION_WINDOW = 3.0  # long enough to hold a few of their requests, short enough to notice they left
INTERACTIVE_HOLD = 5.0  # the engine counts as shared this long after the last sign of others
INTERACTIVE_SMOOTHING = 0.3  # weight of a new reading in the interactive-load estimate
STEP_SMOOTHING = 0.5  # weight of a new reading in the measured step time
BUDGET_MARGIN = 0.03  # aim this share of the allowed slowdown below it: their p99 spreads around the mean
HEADROOM_SIGMAS = 2.0  # room left for the interactive load's bursts, in standard deviations (Poisson: √load)
CORRECTION_GAIN = 0.2  # how fast the measured slowdown corrects the fit's budget...
CORRECTION_RANGE = (0.7, 1.3)  # ...and how far
MAX_GROWTH_PER_READING = 0.25  # shared: a budget increase moves at most this share of the batch per reading
LATENCY_SMOOTHING = 0.2  # weight of a new answer in the service-time estimate
BACKPRESSURE_KINDS = frozenset({"429", "503", "timeout"})


class Regime(enum.Enum):
    OURS = "ours"  # only batch runners use the engine: fill it to the knee
    SHARED = "shared"  # others use it too: the interactive budget rules
    BLIND = "blind"  # no usable gauges: additive increase, multiplicative decrease


@dataclass(frozen=True)
class EngineReading:
    """One reading of the engine's gauges (summed over its label sets)."""

    running: float
    waiting: float
    kv_usage: float | None = None
    step_seconds: float | None = None  # mean inter-token latency since the previous reading, if the engine says
    running_mean: float | None = None  # sequences decoding on average over that time (its ITL sum / the time)
    completed: float | None = None  # requests it finished, all clients, since it started
    queue_seconds: float | None = None  # mean time the requests admitted since the previous reading had waited


class ConcurrencyController:
    def __init__(
        self,
        *,
        initial: int = 8,
        minimum: int = 1,
        maximum: int = 256,
        fixed: int | None = None,
        slowdown: float = 1.3,
    ) -> None:
        if fixed is not None:
            if fixed < 1:
                raise ValueError(f"fixed concurrency must be at least 1, got {fixed}")
            initial = minimum = maximum = fixed
        if minimum < 1 or maximum < minimum:
            raise ValueError(f"concurrency bounds must satisfy 1 <= minimum <= maximum, got {minimum}..{maximum}")
        if slowdown <= 1:
            raise ValueError(f"the interactive slowdown must be above 1, got {slowdown}")
        self.minimum, self.maximum, self.slowdown = minimum, maximum, slowdown
        self.fixed = fixed is not None
        self._limit = float(max(minimum, min(maximum, initial)))
        self._sends = 0  # the n-th send gets epoch n
        self._inflight = 0
        self._inflight_area = 0.0  # ∫ in-flight dt since the last reading
        self._accounted_at = 0.0
        self._cut_epoch = 0  # sends up to this epoch were out at the last backpressure cut
        self._backoff = 1.0
        self._answered = 0  # our successes on this endpoint, all time
        self._since_increase = 0  # blind: answers since the last additive increase
        self.service_time: float | None = None  # smoothed latency of our requests
        self._own_per_token: list[float] = []  # since the last reading: our step-time evidence without the engine's
        # The engine.
        self.model = StepModel()
        self._previous: tuple[float, EngineReading] | None = None
        self._step: float | None = None  # smoothed measured step time
        self._lowest_step = math.inf
        self._running_seen: deque[tuple[float, float]] = deque()  # (time, running), decreasing: head is the max
        self._queued_readings = 0
        self.capacity: float | None = None  # the engine's concurrency at its knee, once a queue has shown it
        self._slow_start = True
        self._probe_at = -math.inf
        self._total = float(self._limit)  # what all batch runners together take
        # Others.
        self._completions: deque[tuple[float, float, float]] = deque()  # (time, engine's count, runners' count)
        self._presence_readings = 0
        self._others_seen_at = -math.inf
        self._completion_rate: float | None = None  # the engine's finished requests per second, all clients
        self.interactive_load = 0.0  # smoothed
        self._interactive_now = 0.0
        self._cap_until = -math.inf  # shared: after a queue, the total stays at its cut this long
        self._cap = math.inf
        self._correction = 1.0  # shared: learnt factor on the fit's budget
        self.regime = Regime.BLIND
        # Reported.
        self.last_budget: dict[str, float] | None = None
        self.increases = 0
        self.decreases = {"backpressure": 0, "queue": 0, "budget": 0}
        self.backpressure = {kind: 0 for kind in sorted(BACKPRESSURE_KINDS)}

    @property
    def limit(self) -> int:
        return max(self.minimum, int(self._limit))

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def answered(self) -> int:
        """Our requests answered successfully on this endpoint, all time (published for the other runners)."""
        return self._answered

    @property
    def step_seconds(self) -> float | None:
        """The engine's step time (inter-token latency), smoothed."""
        return self._step

    @property
    def excess(self) -> int:
        """Requests in flight beyond the limit: what `--preempt` may abort while the engine is shared."""
        return max(0, self._inflight - self.limit) if self.regime is Regime.SHARED else 0

    # --- our requests -----------------------------------------------------------------------------

    def on_send(self, now: float) -> int:
        """A request goes out; returns its epoch. Close every send with exactly one of on_success, on_backpressure
        or on_other."""
        self._account(now)
        self._sends += 1
        self._inflight += 1
        return self._sends

    def on_success(
        self,
        now: float,
        *,
        latency: float,
        output_tokens: int,
        prompt_tokens: int = 0,
        cached_tokens: int = 0,
        epoch: int,
    ) -> None:
        if latency < 0 or output_tokens < 0 or prompt_tokens < 0 or cached_tokens < 0:
            raise ValueError("latency and token counts must not be negative")
        self._close(now)
        self._answered += 1
        self.service_time = (
            latency
            if self.service_time is None
            else (self.service_time + LATENCY_SMOOTHING * (latency - self.service_time))
        )
        if output_tokens > 1:
            self._own_per_token.append(latency / output_tokens)
        if self._previous is None or now - self._previous[0] > READINGS_TTL:
            self.regime = Regime.BLIND  # the gauges are gone (or never came): nobody else can be seen
        if self.regime is Regime.BLIND and not self.fixed:
            self._since_increase += 1
            if self._since_increase >= self._limit and self._inflight + 1 >= self._limit / 2:  # not app-limited
                self._since_increase = 0
                self._set(self._limit + 1)

    def on_backpressure(self, now: float, *, epoch: int, kind: str) -> None:
        """429, 503 or a timeout: take half as much, once per flight (a failure of a request sent before the last cut
        was answered by that cut)."""
        if kind not in BACKPRESSURE_KINDS:
            raise ValueError(f"unknown backpressure kind {kind!r}; expected one of {sorted(BACKPRESSURE_KINDS)}")
        self._close(now)
        self.backpressure[kind] += 1
        if self.fixed or epoch <= self._cut_epoch:
            return
        self._cut_epoch = self._sends
        self.decreases["backpressure"] += 1
        self._slow_start = False
        if self.regime is Regime.BLIND:
            self._set(self._limit * BACKOFF)
        else:
            self._backoff *= BACKOFF
            self._set(self._limit * BACKOFF)

    def on_other(self, now: float, *, epoch: int) -> None:
        """An answer that says nothing about load (a 4xx, a 500 for a broken request, no connection at all)."""
        self._close(now)

    def _close(self, now: float) -> None:
        self._account(now)
        self._inflight = max(0, self._inflight - 1)

    def _account(self, now: float) -> None:
        """Integrate our in-flight count over time: its mean between readings is our load on the engine."""
        if now > self._accounted_at:
            self._inflight_area += self._inflight * (now - self._accounted_at)
            self._accounted_at = now

    def _mean_inflight(self, now: float, since: float | None) -> float:
        self._account(now)
        span = now - since if since is not None else 0.0
        mean = self._inflight_area / span if span > 0 else float(self._inflight)
        self._inflight_area = 0.0
        return mean

    # --- the engine -------------------------------------------------------------------------------

    def on_engine(
        self,
        now: float,
        reading: EngineReading,
        *,
        peers: Sequence[RunnerLoad] = (),
        demand: float | None = None,
        weight: float = 1.0,
    ) -> None:
        """A reading of the engine's gauges taken at `now`, with the other batch runners' published loads and what
        this runner could use (`demand`: its remaining work, None = unbounded)."""
        if reading.waiting < 0 or reading.running < 0:
            raise ValueError("waiting and running must not be negative")
        previous, self._previous = self._previous, (now, reading)
        interval = now - previous[0] if previous else None
        self._learn_step(now, reading, previous, peers)
        # The other runners as they published themselves, up to a reading ago: each fills up to its limit within
        # moments, or drains down to it over a service time, so the larger of the two is what it holds now, or more.
        batch_inflight = self._inflight + sum(max(p.inflight, p.limit) for p in peers)
        self._watch_others(now, reading, peers, batch_inflight)
        self.regime = Regime.SHARED if now - self._others_seen_at <= INTERACTIVE_HOLD else Regime.OURS
        queued = self._watch_queue(now, reading)
        if self.fixed:
            return
        self._backoff = min(1.0, self._backoff * BACKOFF_RECOVERY)
        if self.regime is Regime.OURS:
            total = self._total_alone(now, reading, batch_inflight, queued, interval)
        else:
            total = self._total_shared(now, reading, batch_inflight, queued)
        self._total = total
        mine = demand if demand is not None else self.maximum
        shares = allocate(total, [mine, *(p.demand for p in peers)], [weight, *(p.weight for p in peers)])
        self._set(shares[0] * self._backoff)

    def _learn_step(
        self,
        now: float,
        reading: EngineReading,
        previous: tuple[float, EngineReading] | None,
        peers: Sequence[RunnerLoad],
    ) -> None:
        """Feed the step model: the engine's mean inter-token latency since the last reading (or, without it, our own
        answers' latency per output token) against the batch's and everyone else's sequences over that time."""
        own, self._own_per_token = self._own_per_token, []
        batch = self._mean_inflight(now, previous[0] if previous else None) + sum(p.inflight for p in peers)
        step = reading.step_seconds
        if step is None and own:
            step = sorted(own)[len(own) // 2]
        if step is None or step <= 0:
            return
        # Over the interval, not at its two ends: two snapshots of a count that moved in between would bias the
        # slopes toward zero (errors in the regressors).
        if reading.running_mean is not None:
            running = reading.running_mean
        else:
            running = (reading.running + previous[1].running) / 2 if previous else reading.running
        self.model.observe(step, batch=min(batch, running), others=max(0.0, running - batch))
        self._step = step if self._step is None else self._step + STEP_SMOOTHING * (step - self._step)
        self._lowest_step = min(self._lowest_step, self._step)

    def _watch_others(
        self, now: float, reading: EngineReading, peers: Sequence[RunnerLoad], batch_inflight: float
    ) -> None:
        excess = reading.running + reading.waiting - batch_inflight
        others_finished = engine_finished = 0.0
        if reading.completed is not None:
            runners = float(self._answered + sum(p.completed for p in peers))
            window = self._completions
            if window and reading.completed < window[-1][1]:
                window.clear()  # the engine restarted
            window.append((now, reading.completed, runners))
            while now - window[0][0] > COMPLETION_WINDOW:
                window.popleft()
            engine_finished = reading.completed - window[0][1]
            others_finished = engine_finished - (runners - window[0][2])
            span = now - window[0][0]
            self._completion_rate = (reading.completed - window[0][1]) / span if span > 0 else None
        # Other runners publish a reading or two late, and one that ramps up meanwhile holds more than it said: a
        # share of what they hold is not taken for someone else's.
        threshold = PRESENCE_MIN + PRESENCE_SHARE * batch_inflight + PEER_SLACK * sum(p.limit for p in peers)
        # Twice the threshold is someone there beyond doubt: the batch yields at this reading. A weaker sign (or any
        # sign while other runners share the engine) must show twice.
        certain = excess >= 2 * threshold and not peers
        # Others' finished requests show users whose requests are too short to be caught running. Only without other
        # runners: their published counts lag the engine's by up to a reading, which reads as others' requests.
        finished = not peers and others_finished >= PRESENCE_COMPLETIONS + PRESENCE_SHARE * engine_finished
        present = certain or excess >= threshold or finished
        self._presence_readings = self._presence_readings + 1 if present else 0
        if certain or self._presence_readings >= 2:
            self._others_seen_at = now
        self._interactive_now = max(0.0, excess)
        self.interactive_load += INTERACTIVE_SMOOTHING * (self._interactive_now - self.interactive_load)

    def _watch_queue(self, now: float, reading: EngineReading) -> bool:
        """Whether the engine is at its knee, so that its running count is its capacity: the requests it admitted
        waited several steps for a place (vLLM's queue-time histogram), or, where the engine does not say, requests
        waited at three readings running (arrivals between two steps wait too, but rarely that often); or its KV
        cache is full."""
        seen = self._running_seen
        while seen and seen[-1][1] <= reading.running:
            seen.pop()
        seen.append((now, reading.running))
        while now - seen[0][0] > CAPACITY_MEMORY:
            seen.popleft()
        step = self._step
        if reading.queue_seconds is not None and step:
            waited = reading.queue_seconds > QUEUE_STEPS * step and reading.waiting > 0
            needed = 2
        else:
            waited = reading.waiting > QUEUE_ALLOWANCE + QUEUE_ALLOWANCE_SHARE * reading.running
            needed = 3
        kv_full = reading.kv_usage is not None and reading.kv_usage >= KV_FULL
        self._queued_readings = self._queued_readings + 1 if (waited and reading.running >= 1) or kv_full else 0
        if self._queued_readings < (1 if kv_full else needed):
            return False
        if self.regime is Regime.OURS:
            # Only the batch's own queue shows the knee: beside others, a burst of theirs queues at any running count.
            self.capacity = seen[0][1]
        if self.service_time is not None:  # before our first answers, the queue is someone else's doing
            self._slow_start = False
        return True

    def _total_alone(
        self, now: float, reading: EngineReading, batch_inflight: float, queued: bool, interval: float | None
    ) -> float:
        total = self._total
        if queued:
            assert self.capacity is not None
            if total > self.capacity:
                self.decreases["queue"] += 1
            self._probe_at = now + max(PROBE_HOLD, PROBE_SERVICE_TIMES * (self.service_time or 0.0))
            return self.capacity
        if self.capacity is not None and total < self.capacity:
            return self.capacity  # given back to interactive users who have left: take it again at once
        using = batch_inflight >= 0.9 * total
        unseen = batch_inflight - reading.running - reading.waiting > 1 + UNSEEN_SHARE * batch_inflight
        if not using or unseen:
            return total  # the last increase is not in use (or not in the engine's gauges) yet
        if self._slow_start:
            # Double once per service time, as TCP does once per round trip: a request that overshoots the knee waits
            # a whole service time in the queue, and cannot be called back.
            if self.service_time is None or interval is None:
                return total
            self.increases += 1
            return max(total + 1, total * 2 ** (min(interval, self.service_time) / max(self.service_time, 1e-3)))
        if now >= self._probe_at:
            self._probe_at = now + max(PROBE_HOLD, PROBE_SERVICE_TIMES * (self.service_time or 0.0))
            self.increases += 1
            return total + max(1.0, PROBE_SHARE * (self.capacity or total))
        return total

    def _total_shared(self, now: float, reading: EngineReading, batch_inflight: float, queued: bool) -> float:
        interactive = self.interactive_load
        capacity = self.capacity if self.capacity is not None else math.inf
        # Room for their load with headroom for its bursts (a Poisson load's spread is its square root), and for
        # their load as it is right now: a rise is yielded to at once.
        room = min(
            capacity - interactive - HEADROOM_SIGMAS * math.sqrt(interactive) - 1.0,
            capacity - self._interactive_now - 1.0,
        )
        fit = self.model.fit
        if fit is not None and self._step is not None:
            # Without the batch their requests would also be shorter, so fewer of theirs would run at once (Little's
            # law, for requests whose time is mostly decoding): with r = their running count per second of step,
            # step_alone = a + m·r·step_alone, so step_alone = a / (1 - m·r). The step with the batch is
            # (a + m·R_batch) / (1 - m·r), so their slowdown is 1 + m·R_batch / a, whatever their load: the batch may
            # run (slowdown - 1)·a/m sequences. A slow correction takes up what the linear fit misses (others'
            # requests costing more or less per sequence than ours), learnt only while this budget is what holds the
            # batch and the batch is at it (no wind-up while something else holds it back).
            a, m = fit.fixed, fit.per_batch
            share = min(0.95, fit.per_other * interactive / self._step)
            alone = a / (1.0 - share)
            measured = self._step / alone
            aim = 1.0 + (self.slowdown - 1.0) * (1.0 - BUDGET_MARGIN)
            budget = (aim - 1.0) * a / m
            if budget * self._correction <= room and now >= self._cap_until and batch_inflight >= 0.9 * self._total:
                step = min(1.1, max(0.9, (aim / measured) ** CORRECTION_GAIN))
                self._correction = min(CORRECTION_RANGE[1], max(CORRECTION_RANGE[0], self._correction * step))
            budget *= self._correction
            self.last_budget = {
                "step_alone_s": alone,
                "step_now_s": self._step,
                "slowdown_now": measured,
                "per_batch_sequence_s": m,
                "per_other_sequence_s": fit.per_other,
                "fixed_s": a,
                "correction": self._correction,
            }
        elif self._step is not None:
            # No fit yet (the load has not varied enough): grow while the step stays within the budget of the lowest
            # step seen (which erred low: others were there), else shrink.
            budget = batch_inflight * (2.0 if self._step < self.slowdown * self._lowest_step else 0.75)
        else:
            budget = batch_inflight
        total = min(room, budget)
        if not queued and self._burst_queued(reading):
            # More wait than arrivals between two steps explain: their queue must empty at once.
            queued = True
        if queued:
            # Others wait: keep the queue empty, and keep what was given up free for a while.
            self._cap = max(0.0, batch_inflight - reading.waiting)
            self._cap_until = now + max(PROBE_HOLD, PROBE_SERVICE_TIMES * (self.service_time or 0.0))
            self.decreases["queue"] += 1
        if now < self._cap_until:
            total = min(total, self._cap)
        if total > self._total:
            total = min(total, self._total + max(2.0, MAX_GROWTH_PER_READING * self._total))
        elif total < self._total:
            self.decreases["budget"] += 1
        return max(0.0, total)

    def _burst_queued(self, reading: EngineReading) -> bool:
        """One reading with more requests waiting than the arrivals of one step would explain (Poisson: mean plus
        three standard deviations): with others on the engine, a queue is not waited for twice."""
        if self._step is None or self._completion_rate is None:
            return False
        arrivals = self._completion_rate * self._step
        return reading.waiting > QUEUE_ALLOWANCE + arrivals + 3.0 * math.sqrt(arrivals)

    def _set(self, value: float) -> None:
        value = float(min(self.maximum, max(self.minimum, value)))
        if value < self._limit:
            self._cut_epoch = max(self._cut_epoch, self._sends)
        elif value > self._limit:
            self.increases += 1
        self._limit = value

    def snapshot(self) -> dict:
        previous = self._previous[1] if self._previous else None
        fit = self.model.fit
        return {
            "limit": self.limit,
            "inflight": self._inflight,
            "regime": "fixed" if self.fixed else self.regime.value,
            "total_for_batch": round(self._total, 1),
            "capacity": self.capacity,
            "slow_start": self._slow_start,
            "interactive_load": round(self.interactive_load, 2),
            "step_s": self._step,
            "step_fit": {
                "fixed_s": fit.fixed,
                "per_batch_sequence_s": fit.per_batch,
                "per_other_sequence_s": fit.per_other,
            }
            if fit
            else None,
            "budget": self.last_budget,
            "waiting": previous.waiting if previous else None,
            "running": previous.running if previous else None,
            "kv_usage": previous.kv_usage if previous else None,
            "increases": self.increases,
            "decreases": dict(self.decreases),
            "backpressure": dict(self.backpressure),
        }
