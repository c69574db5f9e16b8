"""Adaptive concurrency for one upstream endpoint. A pure object: no I/O and no clock reads (callers pass `now`).

Goal: keep the engine's batch full (running ≈ its max-num-seqs) and its queue empty. Below that knee, more requests
in flight buy throughput. Past it they only wait in the engine's queue, where they also delay interactive users. The
controller therefore settles at the knee and backs off as soon as a queue forms.

Why not "latency over a no-load baseline": with continuous batching, every added sequence makes every engine step a
bit slower. A batch client's own load raises per-token latency long before the knee. On the simulator's default cost
model it is 2.3x the no-load value at 128 sequences; on a CPU llama.cpp server it is 5.7x at 8 slots, which is still
where its throughput peaks. A "tolerance x baseline" rule would stop far short of the knee. What changes at the knee
is the *shape*: past it, per-token latency grows in proportion to the load (pure queueing, elasticity 1), while below
it, it grows more slowly. So the controller follows, strongest signal first:

1. **Hard backpressure** (`on_backpressure`: 429, 503, 5xx, timeouts, resets): halve the limit (`BACKOFF`), at most
   once per flight. Every send gets an increasing epoch. A failure of a request sent before the last decrease (of any
   cause) reflects load that decrease already answered, so it is ignored.

2. **The engine's queue** (`on_queue_metrics`: vLLM's `num_requests_waiting`, `num_requests_running` and
   `kv_cache_usage_perc`, or llama.cpp's `requests_deferred` and `requests_processing`). This measures the knee
   directly, so while readings keep coming (within `QUEUE_METRICS_TTL`) it alone decides, on each reading:
   * The *queue* is the waiting requests the engine has no room for, beyond an allowance of `QUEUE_ALLOWANCE` +
     `QUEUE_ALLOWANCE_SHARE` x running. Room is the largest `running` of the last `CAPACITY_MEMORY` seconds minus
     the current `running`. The room matters because arrivals wait for the next step boundary even when slots are
     free, and fixed-length outputs finish in bursts whose refill is briefly "waiting".
   * A queue seen in two consecutive readings cuts the limit to `inflight - queue x share`, at most half off per
     reading. The share, inflight / (running + waiting), is our part of the engine's load (erring high, as some of
     ours are still on their way: the queue is then cut a bit more). Every batch client that sees the queue cuts its
     own part of it, so together they cut what the queue is (each cutting the whole queue would cut it once per
     client), and the larger cuts more. The cut is absolute, not relative, so a reading taken before an earlier cut
     took effect does not cut twice. Interactive requests in the queue push the batch lower, by its share of them
     on each reading, until they no longer queue. A whole request queued in both readings, or a queue in three
     readings running, is the knee: it also ends slow start (once our own requests have been answered; before that,
     the queue is someone else's) and holds probing beyond it for max(`QUEUE_HOLD`, `HOLD_SERVICE_TIMES` x S).
   * No queue, KV usage below `KV_FULL`, not app-limited, and at least `WINDOW_SECONDS` since the last change: grow.
     Slow start doubles once per service time S (the smoothed request latency): x2^(Δt/S) per reading, at least +1,
     and not before the first answers. Overshooting is paid in S, since an overshooting request waits a whole
     service time in the engine's queue and cannot be called back. After slow start, a probe adds `GROWTH_SHARE` x
     the capacity seen: the same step for every client, as growth in proportion to the limit would keep an unfair
     split unfair for ever. Free room the engine has shown (capacity seen - running - waiting) is filled at once,
     hold or not, so capacity freed by departing interactive users is refilled quickly. But a slot or two
     (`ROOM_TRANSIENT`) only when the reading before showed them too, as one reading can fall between an answer and
     its replacement; and neither they nor probes for max(`QUEUE_HOLD`, `HOLD_SERVICE_TIMES` x S) after a cut for a
     queue that others' requests were in: what was given up is kept for whoever queued (an interactive user between
     turns). A queue of our own requests alone holds nothing (slow start's overshoot is cut and growth goes on).
   * No growth at all while more than `QUEUE_ALLOWANCE` + `UNSEEN_SHARE` x inflight of our requests are missing
     from running + waiting: the last increase has not been seen yet (llama.cpp on a CPU counts a new request only
     when its busy loop comes round, seconds later), and growing blind overshoots.
   * Fairness between batch clients of the engine (separate runners, which only share its gauges): proportional
     cuts and equal steps converge only by the small amounts the queue and the probes move. So a runner holding more
     than all the others together also gives back `FAIR_GIVEBACK` x its excess over them, at most their load, on a
     queue; and it takes at most half of the room it sees, leaving the rest to whoever else reads it. The cap keeps
     a batch alone, or next to a few interactive requests, at the knee: the gauges cannot tell another batch runner
     from interactive load, and slots given back that nobody takes are room the runner refills at its next reading.
   * Ours and the others' part of the engine's load, for the give-back: our in-flight count also holds requests on
     their way to or from the engine (a client's own queueing: 13 of 130 in the utilisation benchmark with httpx,
     under one with aiohttp), which would hide a small client beside a large one. Where the engine counts finished requests (`completed`: vLLM's
     `request_success_total`), ours is its load x our part of the answers over `SHARE_WINDOW` (under its FIFO,
     answers are in proportion to requests held), and at most our in-flight count, as the answers lag a change.

3. **Per-token latency**, when the endpoint has no usable /metrics. The per-token latency of a request is
   `latency / output_tokens` (per uncached prompt token for embeddings), so long and short answers compare. A
   *level* is measured on a cohort: after a change, the first `limit` sends are skipped while the queue, or its
   drain, reaches steady state. The next max(`WINDOW_SAMPLES`, limit) sends form the cohort, and the level is
   evaluated once `COHORT_SHARE` of them have finished. Taking the first N completions instead would favour exactly
   the requests that did not queue. A level is (mean in-flight count over time, median per-token latency of the
   cohort). The limit then moves by probing, and each probe is judged by the elasticity
   `e = Δln(latency) / Δln(load)` between the two levels. Throughput gained is 1 - e, so e ≈ 1 means the extra
   requests only queued:
   * **Up** (x2 in slow start, x`PROBE_GAIN` after it): kept if `e ≤ ELASTICITY_LIMIT` on `VERIFY_LEVELS`
     consecutive levels, because with varied output lengths a queue takes more than one turnover to build.
     Otherwise go back down, leave slow start, and make the next probe a downward one.
   * **Down** (/`PROBE_GAIN`, after a failed upward probe): slow start's doublings can jump across the knee, and the
     elasticity averaged over such a jump looks acceptable. Stay down only if `e > DOWN_ELASTICITY_LIMIT`. The bar
     is near-pure queueing because on a compute-bound engine (llama.cpp on a CPU) latency grows almost in
     proportion to the load even below the knee.
   * **Cruise** for `CRUISE_WINDOWS` levels between probes. The reference at a steady limit follows slow drifts
     (`REFERENCE_BLEND`: the request mix changes as prefix groups go by). A step of more than `DRIFT_TOLERANCE` at
     the same load means others took capacity: shrink in proportion, at most by half. A step down of the same size
     means it came back: return toward the limit held before.
   Comparisons are always between levels at known loads, so the batch's self-inflicted slowdown never raises the
   reference it is judged against. `baseline` (the lowest level median seen) is reported but drives no decision.
   This mode is a fallback. On the test models it settles within about ±25 % of the knee. Prefill-heavy or
   compute-bound engines look alike to it, so there it errs low.

Growth never happens while app-limited, so a batch that runs dry does not leave a huge limit behind. In latency
mode that means fewer than half of the limit in flight during the level (the Netflix/AIMD guard). In queue mode it
is stricter: the runner must be using the whole limit at the reading (and have filled it since the last change), so
every increase is checked by a reading that saw it, and room that is only ours, idle for want of work, is not
mistaken for the engine's. Limits stay within [minimum, maximum]. With `fixed`, the limit never moves; signals are still
recorded for the snapshot.

Callers: after `on_queue_metrics`, poke the limiter (`AdaptiveLimiter.poke()`); otherwise an increase only takes
effect at the next release.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

BACKOFF = 0.5  # cut on hard backpressure; also the deepest cut any single signal makes
WINDOW_SECONDS = 1.0  # the least time between two limit changes decided by measurements
WINDOW_SAMPLES = 8  # latency mode: smallest cohort
MIN_WINDOW_SAMPLES = 3  # latency mode: fewest successes that make a level
COHORT_SHARE = 0.9  # latency mode: a level is evaluated once this share of its cohort has finished
MAX_WINDOW_SECONDS = 60.0  # latency mode: evaluate with what there is after this long (stragglers, app-limited)
QUEUE_METRICS_TTL = 10.0  # the queue signal stays in charge while readings arrive at least this often
QUEUE_PERSISTENCE = 5.0  # queued readings at most this far apart count as one persisting queue
CAPACITY_MEMORY = 10.0  # seconds over which the largest `running` reading stands for the engine's capacity
QUEUE_ALLOWANCE = 0.5  # waiting requests tolerated...
QUEUE_ALLOWANCE_SHARE = 0.01  # ...plus this share of the running batch (arrivals waiting for the next step)
UNSEEN_SHARE = 0.1  # share of our in-flight requests that may be missing from the engine's gauges while growing
ROOM_TRANSIENT = 2.0  # free slots (plus that share) that count as room only if the previous reading saw them too
KV_FULL = 0.95  # KV cache usage at which growth stops (more sequences would be preempted)
GROWTH_SHARE = 0.05  # queue mode: growth per probe after slow start, as a share of the capacity seen (at least +1)
FAIR_GIVEBACK = 0.5  # queue mode: share of its excess over the others' load a runner gives back on a queue
SHARE_WINDOW = 4.0  # queue mode: seconds of completions over which our share of the engine's is measured
SHARE_MIN_COMPLETIONS = 20  # queue mode: fewest engine completions in that window that make a share
QUEUE_HOLD = 10.0  # queue mode: at least this long without probing beyond the knee once found...
HOLD_SERVICE_TIMES = 3.0  # ...and at least this many service times (an overshoot there costs ~S/K of queueing)
LATENCY_SMOOTHING = 0.2  # weight of a new request latency in the service-time estimate
PROBE_GAIN = 1.25  # latency mode: size of an upward probe after slow start
ELASTICITY_LIMIT = 0.85  # latency mode: an upward probe whose latency grew faster than this share of its load is undone
DOWN_ELASTICITY_LIMIT = 0.95  # latency mode: a downward probe stays only if what it gave up was just queueing
DRIFT_TOLERANCE = 0.25  # latency mode: per-token latency rise at the same load read as lost capacity
REFERENCE_BLEND = 0.2  # latency mode: weight of a new level in the reference at the same limit
CRUISE_WINDOWS = 4  # latency mode: levels between probes
VERIFY_LEVELS = 2  # latency mode: consecutive levels a probe must pass (the queue can take more than one to build)
BACKPRESSURE_KINDS = frozenset({"429", "503", "5xx", "timeout", "reset"})


@dataclass
class _Level:
    """A measured operating point."""

    limit: float
    load: float  # mean in-flight requests over the measurement
    per_token: float  # median per-token latency of the cohort


@dataclass
class _Reading:
    at: float
    waiting: float
    running: float | None
    kv_usage: float | None
    queued: float = 0.0  # waiting requests beyond the engine's room and the allowance
    share: float | None = None  # our part of the engine's completions over the last SHARE_WINDOW


class ConcurrencyController:
    def __init__(self, *, initial: int = 8, minimum: int = 1, maximum: int = 256, fixed: int | None = None) -> None:
        if fixed is not None:
            if fixed < 1:
                raise ValueError(f"fixed concurrency must be at least 1, got {fixed}")
            initial = minimum = maximum = fixed
        if minimum < 1 or maximum < minimum:
            raise ValueError(f"concurrency bounds must satisfy 1 <= minimum <= maximum, got {minimum}..{maximum}")
        self.minimum, self.maximum = minimum, maximum
        self.fixed = fixed is not None
        self._limit = float(max(minimum, min(maximum, initial)))
        self._slow_start = True
        self._sends = 0  # the n-th send gets epoch n
        self._inflight = 0
        self._cut_epoch = 0  # sends up to this epoch were out at the last decrease
        self._changed_at = -math.inf
        self._peak = 0  # most requests in flight since the current level started (app-limited guard)
        # The level being measured: its cohort is the sends with epochs in (_level_epoch, _cohort_end].
        self._level_started: float | None = None  # when the cohort's first request went out
        self._level_epoch = 0
        self._cohort_end: int | None = None  # None while the cohort is still being sent
        self._cohort_closed = 0
        self._samples: list[float] = []
        self._inflight_area = 0.0  # ∫ inflight dt over the level: its mean is the load (Little's L)
        self._last_event = 0.0
        # Latency mode.
        self._reference: _Level | None = None  # the accepted level
        self._probe_base: _Level | None = None  # set while a probe away from this level is being judged
        self._verified = 0  # levels of an upward probe that passed so far
        self._probe_down_next = False
        self._before_drift: float | None = None  # the limit before capacity was lost to others
        self._cruise = 0
        # Queue mode.
        self._reading: _Reading | None = None
        self._completed = 0  # our answered requests, to compare with the engine's count
        self._completions: deque[tuple[float, float, int]] = deque()  # (time, engine's count, ours) per reading
        self._capacity: deque[tuple[float, float]] = deque()  # (time, running), decreasing: the head is the max
        self._hold_until = -math.inf
        self._yielded_until = -math.inf  # until then, a slot or two of room is kept for whoever queued
        self._queued_streak = 0  # consecutive readings with a queue
        self.service_time: float | None = None  # smoothed request latency: the engine's turnaround
        # Reported.
        self.baseline: float | None = None
        self.last_sample: float | None = None
        self.last_elasticity: float | None = None
        self.levels = 0  # levels measured
        self.increases = 0
        self.decreases = {"backpressure": 0, "queue": 0, "latency": 0}
        self.backpressure = {kind: 0 for kind in sorted(BACKPRESSURE_KINDS)}

    @property
    def limit(self) -> int:
        return int(self._limit)

    @property
    def inflight(self) -> int:
        return self._inflight

    def queue_mode(self, now: float) -> bool:
        """Whether the engine's queue gauges are what the controller follows right now."""
        return self._reading is not None and now - self._reading.at <= QUEUE_METRICS_TTL

    # --- events ----------------------------------------------------------------------------------

    def on_send(self, now: float) -> int:
        """A request goes out; returns its epoch. Close every send with exactly one of on_success,
        on_backpressure or on_other: the controller counts what is in flight itself."""
        self._account(now)
        self._sends += 1
        self._inflight += 1
        self._peak = max(self._peak, self._inflight)
        if self._sends == self._level_epoch + 1:
            self._level_started = now  # the cohort starts: measure the load from here
            self._inflight_area = 0.0
        if self._cohort_end is None and self._level_started is not None:
            sent = self._sends - self._level_epoch
            enough = sent >= WINDOW_SAMPLES and now - self._level_started >= WINDOW_SECONDS
            if sent >= max(WINDOW_SAMPLES, self._limit) or enough:
                self._cohort_end = self._sends
        return self._sends

    def on_success(
        self,
        now: float,
        *,
        latency: float,
        output_tokens: int,
        prompt_tokens: int = 0,
        cached_tokens: int = 0,
        inflight: int | None = None,
        epoch: int,
    ) -> None:
        """A request answered. `inflight` (optional) is the caller's own in-flight count; it only raises the
        controller's view of the peak for the app-limited guard."""
        if latency < 0 or output_tokens < 0 or prompt_tokens < 0 or cached_tokens < 0:
            raise ValueError("latency and token counts must not be negative")
        if inflight is not None:
            self._peak = max(self._peak, inflight)
        if self.service_time is None:
            self.service_time = latency
        else:
            self.service_time += LATENCY_SMOOTHING * (latency - self.service_time)
        self._completed += 1
        work = output_tokens if output_tokens > 0 else prompt_tokens - cached_tokens  # embeddings generate nothing
        self._closed(now, epoch, latency / max(1, work))

    def on_backpressure(self, now: float, *, epoch: int, kind: str) -> None:
        """429, 503, another 5xx, a timeout or a reset: halve the limit, once per flight."""
        if kind not in BACKPRESSURE_KINDS:
            raise ValueError(f"unknown backpressure kind {kind!r}; expected one of {sorted(BACKPRESSURE_KINDS)}")
        self.backpressure[kind] += 1
        self._closed(now, epoch, None)
        if self.fixed or epoch <= self._cut_epoch:
            return
        self._slow_start = False
        self._reference = self._probe_base = None
        self._change(now, self._limit * BACKOFF)
        self.decreases["backpressure"] += 1

    def on_other(self, now: float, *, epoch: int) -> None:
        """An answer that says nothing about load (a 4xx, a plain 500 for a broken request)."""
        self._closed(now, epoch, None)

    def on_queue_metrics(
        self,
        now: float,
        *,
        waiting: float,
        running: float | None = None,
        kv_usage: float | None = None,
        completed: float | None = None,
    ) -> None:
        """A reading of the engine's gauges (summed over label sets), taken at `now`. `completed` (optional) is the
        engine's count of finished requests, all clients together (vLLM's `request_success_total`)."""
        if waiting < 0 or (running is not None and running < 0):
            raise ValueError("waiting and running must not be negative")
        previous = self._reading
        reading = self._reading = _Reading(now, waiting, running, kv_usage)
        reading.share = self._completion_share(now, completed)
        reading.queued = self._queue_beyond_room(reading)
        if self.fixed:
            return
        if reading.queued > 0:
            # One reading can catch a burst's refill before the engine's next step admits it; a queue that is still
            # there at the next reading is real. A whole request in both, or any queue three times running, means
            # the engine is at its knee: that ends slow start and holds probing for a while.
            recent = previous is not None and previous.queued > 0 and now - previous.at <= QUEUE_PERSISTENCE
            self._queued_streak = self._queued_streak + 1 if recent else 1
            if self._queued_streak < 2 or self._inflight == 0:
                return
            assert previous is not None
            knee = self._queued_streak >= 3 or min(previous.queued, reading.queued) >= 1
            if knee and self.service_time is not None:  # before our first answers, the queue is others' doing
                self._slow_start = False
                self._hold_until = now + max(QUEUE_HOLD, HOLD_SERVICE_TIMES * (self.service_time or 0.0))
            # Our part of the queue (the other clients cut theirs), and more if we hold more than all of them. The
            # part is by in-flight count, which errs high (requests in transit): the queue is then cut a bit more.
            load = waiting + running if running is not None else 0.0
            share = min(1.0, self._inflight / load) if load > 0 else 1.0
            split = self._split(reading)
            # From what is in flight, or the fractional limit it stands for: small repeated cuts would otherwise
            # each cost a whole request, and wear a small share down.
            base = max(self._inflight, min(self._limit, self._inflight + 1))
            target = base - reading.queued * share - self._giveback(split)
            if target < self._limit:
                self._change(now, max(self._limit * BACKOFF, target))
                self.decreases["queue"] += 1
                if split is not None and split[1] >= 1:  # others queued too: keep what we gave up for them a while
                    self._yielded_until = now + max(QUEUE_HOLD, HOLD_SERVICE_TIMES * (self.service_time or 0.0))
            return
        self._queued_streak = 0
        if now - self._changed_at < WINDOW_SECONDS or self._peak < self.limit or self._inflight < self.limit:
            # Too soon, or the runner is not using the whole limit: no reading has seen it, and free slots in the
            # engine may just be ours, idle for want of work.
            return
        if kv_usage is not None and kv_usage >= KV_FULL:
            return
        if running is not None and self._inflight - running - waiting > QUEUE_ALLOWANCE + UNSEEN_SHARE * self._inflight:
            # The engine's gauges do not show our requests yet (a CPU engine counts a new request only when its busy
            # loop comes round): whether the last increase queues is not known yet.
            return
        # Free slots the engine has shown it has. A reading can fall between an answer and its replacement (ours in
        # transit, or an interactive user's next turn): a slot or two free in one reading only are not free, and
        # filling them would push the engine past its knee one request at a time.
        room = self._room(reading)
        if room < ROOM_TRANSIENT + QUEUE_ALLOWANCE_SHARE * (running or 0.0):
            recent = previous is not None and now - previous.at <= QUEUE_PERSISTENCE
            room = min(room, self._room(previous)) if recent and previous is not None else 0.0
            if now < self._yielded_until:
                room = 0.0  # a slot or two we gave up to a queue stay free for a while: whoever queued comes back
        if room >= 1:
            # Fill what is known to be free, hold or not; a runner holding more than the others leaves them half.
            self._grow(now, room - min(room / 2, self._giveback(self._split(reading))))
        elif now >= max(self._hold_until, self._yielded_until):
            self._grow(now, self._probe_step(now - previous.at if previous else None))

    def _room(self, reading: _Reading) -> float:
        if reading.running is None or not self._capacity:
            return 0.0
        return max(0.0, self._capacity[0][1] - reading.running - reading.waiting)

    def _probe_step(self, interval: float | None) -> float:
        """How far to grow beyond what the engine has shown it can take. A request that overshoots the knee waits a
        whole service time in the engine's queue, where interactive users wait behind it, and cannot be called
        back. So slow start doubles once per service time, as TCP does once per round trip: x 2^(Δt / S) per reading,
        with S the smoothed request latency, and not at all before the first answers tell S. On a fast engine that is
        still x1.6 a second; on a CPU llama.cpp server (S ≈ 15 s) it is +1. After slow start: +GROWTH_SHARE x the
        capacity seen, the same step for every client sharing the engine."""
        if not self._slow_start:
            capacity = self._capacity[0][1] if self._capacity else self._limit
            return max(1.0, capacity * GROWTH_SHARE)
        if self.service_time is None or interval is None:
            return 0.0
        elapsed = min(interval, 2 * WINDOW_SECONDS, self.service_time)  # time without readings was not watched
        return max(1.0, self._limit * (2 ** (elapsed / max(self.service_time, 1e-3)) - 1))

    def snapshot(self) -> dict:
        reading = self._reading
        return {
            "limit": self.limit,
            "inflight": self._inflight,
            "mode": "fixed" if self.fixed else "queue" if self.queue_mode(self._last_event) else "latency",
            "slow_start": self._slow_start,
            "baseline_per_token_s": self.baseline,
            "last_per_token_s": self.last_sample,
            "last_elasticity": self.last_elasticity,
            "levels": self.levels,
            "waiting": reading.waiting if reading else None,
            "running": reading.running if reading else None,
            "kv_usage": reading.kv_usage if reading else None,
            "queued": reading.queued if reading else None,
            "increases": self.increases,
            "decreases": dict(self.decreases),
            "backpressure": dict(self.backpressure),
        }

    # --- levels (latency mode) ----------------------------------------------------------------------

    def _closed(self, now: float, epoch: int, per_token: float | None) -> None:
        self._account(now)
        self._inflight = max(0, self._inflight - 1)
        if self._level_started is None or epoch <= self._level_epoch:
            return  # sent under an earlier level
        if self._cohort_end is None or epoch <= self._cohort_end:
            self._cohort_closed += 1
            if per_token is not None:
                self._samples.append(per_token)
        cohort = (self._cohort_end or self._sends) - self._level_epoch
        finished = self._cohort_end is not None and self._cohort_closed >= COHORT_SHARE * cohort
        if len(self._samples) >= MIN_WINDOW_SAMPLES and (finished or now - self._level_started >= MAX_WINDOW_SECONDS):
            self._close_level(now)
        elif finished and self._cohort_closed >= cohort:
            self._start_level(now)  # the whole cohort failed: nothing to learn from it

    def _close_level(self, now: float) -> None:
        self._account(now)
        samples = sorted(self._samples)
        assert self._level_started is not None
        load = self._inflight_area / max(1e-9, now - self._level_started)
        level = _Level(self._limit, load, samples[len(samples) // 2])
        app_limited = self._app_limited()
        self.levels += 1
        self.last_sample = level.per_token
        self.baseline = level.per_token if self.baseline is None else min(self.baseline, level.per_token)
        self._start_level(now)
        if self.fixed:
            return
        if self.queue_mode(now):
            # Latency mode starts afresh if the gauges go away.
            self._reference = self._probe_base = self._before_drift = None
            self._probe_down_next = False
        else:
            self._latency_decision(now, level, app_limited)

    def _latency_decision(self, now: float, level: _Level, app_limited: bool) -> None:
        if self._probe_base is not None:
            self._judge_probe(now, level, app_limited)
            return
        reference = self._reference
        if reference is None or abs(level.limit - reference.limit) >= 1:
            self._reference, self._cruise = level, 0  # first level at a new limit (after a cut or a revert)
        elif level.per_token > reference.per_token * (1 + DRIFT_TOLERANCE) and level.load >= reference.load * 0.95:
            # Slower at the same load: someone else took capacity. Shrink in proportion, then measure afresh.
            self._slow_start = False
            self._reference, self._cruise = None, 0
            self._before_drift = max(self._before_drift or 0.0, self._limit)
            self._change(now, self._limit * max(BACKOFF, reference.per_token / level.per_token))
            self.decreases["latency"] += 1
            return
        elif (
            self._before_drift
            and level.per_token * (1 + DRIFT_TOLERANCE) < reference.per_token
            and level.load >= reference.load * 0.95
        ):
            # Faster at the same load: the capacity others took is back. Return toward the limit held before.
            target = min(self._before_drift, self._limit * reference.per_token / level.per_token)
            self._before_drift = None if target >= self._before_drift else self._before_drift
            self._reference, self._cruise = None, 0
            self._change(now, target)
            self.increases += 1
            return
        else:
            # Same limit, so the same self-load: follow slow drifts (the request mix changes as groups go by), but
            # slowly enough that a step (others arriving or leaving) still stands out against the reference.
            blended = reference.per_token + REFERENCE_BLEND * (level.per_token - reference.per_token)
            self._reference = _Level(reference.limit, reference.load, blended)
            self._cruise += 1
        if not app_limited and (self._slow_start or self._cruise >= CRUISE_WINDOWS):
            self._probe(now, down=self._probe_down_next and not self._slow_start)

    def _judge_probe(self, now: float, level: _Level, app_limited: bool) -> None:
        """Does the upper of the two levels buy throughput over the lower one?"""
        base = self._probe_base
        assert base is not None
        down = level.limit < base.limit
        upper, lower = (base, level) if down else (level, base)
        if upper.load < lower.load * 1.05:
            if app_limited:
                self._probe_base, self._reference, self._cruise = None, level, 0  # the runner could not fill it
                return
            elasticity = math.inf
        else:
            elasticity = math.log(upper.per_token / lower.per_token) / math.log(upper.load / lower.load)
        self.last_elasticity = elasticity
        # Staying down needs near-pure queueing: on a compute-bound engine (llama.cpp on a CPU) latency grows almost
        # in proportion to the load even below the knee, and a lax bar would walk the limit down to the minimum.
        worth_it = elasticity <= (DOWN_ELASTICITY_LIMIT if down else ELASTICITY_LIMIT)
        if down:
            self._probe_base, self._cruise = None, 0
            if worth_it:  # the requests we gave up were doing work: back up
                self._probe_down_next = False
                self._reference = base
                self._change(now, base.limit)
                self.increases += 1
            else:  # they were only queueing: stay down (and look further down next time)
                self._reference = level
            return
        if not worth_it:
            # Latency grew about as fast as the load: the extra requests only queued. Back down.
            self._slow_start = False
            self._probe_down_next = True  # the level below may be past the knee too (slow start takes big steps)
            self._probe_base, self._reference, self._cruise = None, base, 0
            self._change(now, base.limit)
            self.decreases["latency"] += 1
            return
        self._verified += 1
        self._reference = level
        if self._verified >= VERIFY_LEVELS:
            self._probe_base, self._cruise = None, 0
            self._probe_down_next = False
            if self._slow_start and not app_limited:
                self._probe(now, down=False)

    def _probe(self, now: float, *, down: bool) -> None:
        if down:
            target = max(self.minimum, min(self._limit - 1, self._limit / PROBE_GAIN))
            self.decreases["latency"] += 1
        else:
            target = min(self.maximum, max(self._limit + 1, self._limit * (2.0 if self._slow_start else PROBE_GAIN)))
            self.increases += 1
        if abs(target - self._limit) < 1:
            return
        self._probe_base, self._verified = self._reference, 0
        self._change(now, target)

    # --- queue mode --------------------------------------------------------------------------------

    def _queue_beyond_room(self, reading: _Reading) -> float:
        waiting, running = reading.waiting, reading.running
        if running is None:
            return waiting - (QUEUE_ALLOWANCE + QUEUE_ALLOWANCE_SHARE * self._limit)
        if running < 1:
            return 0.0  # running nothing: not saturated (its first step has not started yet)
        capacity = self._capacity
        while capacity and capacity[-1][1] <= running:
            capacity.pop()
        capacity.append((reading.at, running))
        while reading.at - capacity[0][0] > CAPACITY_MEMORY:
            capacity.popleft()
        room = capacity[0][1] - running
        return waiting - room - (QUEUE_ALLOWANCE + QUEUE_ALLOWANCE_SHARE * running)

    def _completion_share(self, now: float, completed: float | None) -> float | None:
        """Our part of the requests the engine finished over the last SHARE_WINDOW. Under the engine's FIFO, and for
        requests like the others', that is our part of its load; unlike our in-flight count it leaves out requests
        still on the way to or from it (the client's own queueing), which would hide a small client beside a large
        one."""
        window = self._completions
        if completed is None or (window and completed < window[-1][1]):  # no counter, or the engine restarted
            window.clear()
            return None
        window.append((now, completed, self._completed))
        while now - window[0][0] > SHARE_WINDOW:
            window.popleft()
        engine = completed - window[0][1]
        if engine < SHARE_MIN_COMPLETIONS:
            return None
        return min(1.0, (self._completed - window[0][2]) / engine)

    def _split(self, reading: _Reading) -> tuple[float, float] | None:
        """(ours, others'): the engine's load split into our requests and everyone else's (other runners',
        interactive users'), if the gauges tell."""
        if reading.running is None:
            return None
        load = reading.running + reading.waiting
        ours = min(float(self._inflight), load)
        if reading.share is not None:
            ours = min(ours, reading.share * load)
        return ours, load - ours

    def _giveback(self, split: tuple[float, float] | None) -> float:
        """What a runner holding more than all the others together gives back towards them: part of its excess,
        at most their own load (alone, or beside a few interactive requests, there is no one to give it to)."""
        if split is None:
            return 0.0
        ours, others = split
        return min(others, FAIR_GIVEBACK * max(0.0, ours - others))

    def _grow(self, now: float, step: float) -> None:
        if self._limit >= self.maximum or step <= 0:
            return
        self._change(now, self._limit + step)
        self.increases += 1

    # --- bookkeeping ------------------------------------------------------------------------------

    def _app_limited(self) -> bool:
        return self._peak * 2 < self._limit

    def _account(self, now: float) -> None:
        self._inflight_area += self._inflight * max(0.0, now - self._last_event)
        self._last_event = max(self._last_event, now)

    def _change(self, now: float, value: float) -> None:
        value = float(min(self.maximum, max(self.minimum, value)))
        if value < self._limit:
            self._cut_epoch = self._sends  # what is in flight now was answered by this cut
        self._limit = value
        self._changed_at = now
        self._start_level(now, settle=math.ceil(self._limit))

    def _start_level(self, now: float, settle: int = 0) -> None:
        """Measure the next cohort. After a change, the first `settle` sends are skipped: the queue (or its
        drain) needs one turnover to reach the steady state of the new limit."""
        self._account(now)
        self._level_started = None
        self._level_epoch = self._sends + settle
        self._cohort_end = None
        self._cohort_closed = 0
        self._samples = []
        self._inflight_area = 0.0
        self._peak = self._inflight
