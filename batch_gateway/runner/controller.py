"""Adaptive concurrency for one upstream endpoint: fill the engine while the batch has it to itself; when others use
it, take only what keeps their slowdown within the interactive budget. A pure object: no I/O, no clock reads.

docs/controller.md explains the policy; the pieces:

* `presence.py` tells who is using the engine (regime *ours* or *shared*) and how much of it others hold;
* `knee.py`, while it is ours: slow start to the engine's knee, then the total stays there, probed upward now and then;
* here, while it is shared: the budget `(slowdown - 1)·a/m_batch` from the step-time fit (`step_model.py`), the
  mean of what the runners on the engine make of it, never more than the room others' load leaves, cut at once when
  they queue; and, in every regime, hard backpressure (429, 503, timeouts) halving what the runner takes once per
  flight, the split between batch runners (`share.py`), and the *blind* regime (no usable `/metrics`): additive
  increase, multiplicative decrease.

With `fixed`, the limit never moves; signals are still recorded for the snapshot.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence

from batch_gateway.runner.engine_reading import EngineReading
from batch_gateway.runner.knee import QUEUE_ALLOWANCE, Knee
from batch_gateway.runner.presence import Presence
from batch_gateway.runner.share import RunnerLoad, allocate
from batch_gateway.runner.step_model import MIN_SPREAD_SEQUENCES, LoadHistory, StepModel

BACKOFF = 0.5  # cut on hard backpressure, once per flight
BACKOFF_RECOVERY = 1.25  # per reading without backpressure, back toward 1
READINGS_TTL = 10.0  # the engine's gauges are in charge while readings come at least this often
STEP_SMOOTHING = 0.5  # weight of a new reading in the measured step time
BUDGET_MARGIN = 0.03  # aim this share of the allowed slowdown below it: their p99 spreads around the mean
# ...and this share beside sparse users (a request every few seconds, with gaps between): each of theirs meets the
# batch as it happens to be, and their p99 is the slowest of few. At a mean per-token aim of 1.291 (the margin above)
# a person's requests at 0.1-0.3 a second landed at 1.26-1.33, the slowest 0.33 over 1 where the aim was 0.291.
SPARSE_MARGIN = 0.15
HEADROOM_SIGMAS = 2.0  # room left for the interactive load's bursts, in standard deviations (Poisson: √load)
CORRECTION_GAIN = 0.2  # how fast the measured slowdown corrects the fit's budget...
CORRECTION_RANGE = (0.7, 1.3)  # ...and how far
MAX_GROWTH_PER_READING = 0.25  # shared: a budget increase moves at most this share of the batch per reading
NO_FIT_YIELD = 0.75  # shared, without a fit of the engine's step time: the batch shrinks by this per reading
# Shared, at one sequence: PROBE_FIRST seconds after it came to one, then this often, the batch steps aside (`_probe`)
# for this many of its requests' service times and at least PROBE_SECONDS, and for PROBE_CLEAR_SECONDS at least after
# its last request ended (at most as long again: a request that does not end does not hold it); PROBE_MEMORY is the
# weight of each probe's measure in their mean.
PROBE_FIRST = 10.0
PROBE_EVERY = 30.0
PROBE_SERVICE_TIMES = 2.0
PROBE_SECONDS = 4.0
PROBE_CLEAR_SECONDS = 2.0
PROBE_MEMORY = 0.5
PROBES_KEPT = 16  # each probe's own measure, for the snapshot
NO_TOKENS = (0.0, 0.0)  # (seconds, tokens) of users' tokens (`_others_tokens`), none yet
# A pause is a verdict on users' load of its time: this long after it, a lone runner tries one sequence again and
# probes it (`_pause`); each trial that measures it over their budget doubles the wait, up to PAUSE_RETRY_MAX.
PAUSE_RETRY_FIRST = 300.0
PAUSE_RETRY_MAX = 3600.0
LATENCY_SMOOTHING = 0.2  # weight of a new answer in the service-time estimate
PROMPT_SMOOTHING = 0.02  # weight of a new answer in the computed prompt tokens per output token (~50 answers)
BACKPRESSURE_KINDS = frozenset({"429", "503", "timeout"})
# A fractional limit is kept on average: one request more for that fraction of each period. The period is long enough
# for the in-flight count to follow the lower limit, which it does only as requests end.
DITHER_PERIOD = 2.0  # seconds at least...
DITHER_SERVICE_TIMES = 4.0  # ...or this many of our requests' service times


def dithered(share: float, phase: float) -> int:
    """A share of requests in flight as a whole number at `phase` (0 to 1) of a dithering period: one more than its
    whole part for its fraction of the period, so that it is kept on average."""
    whole = math.floor(share)
    return whole + (1 if share - whole > phase else 0)


class Regime(enum.Enum):
    OURS = "ours"  # only batch runners use the engine: fill it to the knee
    SHARED = "shared"  # others use it too: the interactive budget rules
    BLIND = "blind"  # no usable gauges: additive increase, multiplicative decrease


class ConcurrencyController:
    def __init__(
        self,
        *,
        initial: int = 8,
        minimum: int = 1,
        maximum: int = 256,
        fixed: int | None = None,
        slowdown: float = 1.3,
        phase: float = 0.0,
    ) -> None:
        """`phase` (0 to 1) places this controller's extra request within each dithering period: runners sharing an
        engine should have different ones, so that they do not all take their extra at once."""
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
        self._phase_offset = phase % 1.0
        self._phase = 1.0  # where the last reading fell in the dithering period; 1.0: no extra before one
        self._sends = 0  # the n-th send gets epoch n
        self._inflight = 0
        self._inflight_area = 0.0  # ∫ in-flight dt since the last reading
        self._peak_inflight = 0  # the most in flight since the scrape began (`on_scrape`), or the last reading
        self._accounted_at = 0.0
        self._cut_epoch = 0  # sends up to this epoch were out at the last backpressure cut
        self._backoff = 1.0
        self._answered = 0  # our successes on this endpoint, all time
        self._answered_tokens = 0  # ...and their output tokens
        self._since_increase = 0  # blind: answers since the last additive increase
        self.service_time: float | None = None  # smoothed latency of our requests
        self._own_per_token: list[float] = []  # since the last reading: our step-time evidence without the engine's
        self._own_seconds = self._own_tokens = 0.0  # since the last reading: our answers' latencies and output tokens
        self._own_token_time: float | None = None  # smoothed latency per output token of our answers
        # The engine.
        self.model = StepModel()
        self._loads = LoadHistory()
        self._previous: tuple[float, EngineReading] | None = None
        self._step: float | None = None  # smoothed measured step time
        self._prompt = 0.0  # smoothed prompt tokens the engine computes per step
        self._prompted = self._generated = 0.0  # our answers' computed prompt and output tokens, decaying sums
        self._lowest_step = math.inf
        self.knee = Knee()
        self._total = float(self._limit)  # what all batch runners together take
        self.others = Presence()
        self._cap_until = -math.inf  # shared: after a queue, the total stays at its cut this long
        self._cap = math.inf
        self._correction = 1.0  # shared: learnt factor on the fit's budget
        self.budget_view = 0.0  # shared: the budget by this runner's own fit, published for the others (0: none)
        self.regime = Regime.BLIND
        self.paused = False  # shared: not one batch sequence is within their budget, so the batch waits
        self.probing = False  # shared, at one sequence: stepping aside to measure what it costs them (`_probe`)
        self._probe_due: float | None = None
        self._probe_until = -math.inf
        self._probe_wait = 0.0
        self._probe_clear_since: float | None = None  # when the probe's batch had nothing in flight any more
        # Their tokens' time and count (`_others_tokens`) while the batch held one sequence since the last probe, and
        # during the probe while it held none: their step with it and without it.
        self._beside = self._without = NO_TOKENS
        self._probe_before: float | None = None
        self.measured_slowdown: float | None = None  # their step with the batch's one over without, mean of probes
        self.probes = 0
        # Each probe's measure (None: it read none of their tokens on one side), kept when users leave and the mean is
        # forgotten: what the probes found, for the snapshot.
        self.probe_measures: deque[float | None] = deque(maxlen=PROBES_KEPT)
        self.trials = 0  # pauses tried again with one sequence (`_pause`)
        self._trial_probes: int | None = None  # during a trial: the probes counted when it began
        self.trial_within = False  # a trial's probe measured one sequence within their budget: it holds one
        self._retry_at = math.inf
        self._retry_wait = PAUSE_RETRY_FIRST
        self._shared_at = -math.inf  # the last reading that showed others
        # Reported.
        self.last_budget: dict[str, float] | None = None
        self.increases = 0
        self.decreases = {"backpressure": 0, "queue": 0, "budget": 0, "pause": 0}
        self.backpressure = {kind: 0 for kind in sorted(BACKPRESSURE_KINDS)}

    @property
    def limit(self) -> int:
        """The requests allowed in flight now. A share of 2.9 is 3 for 90% of the time, not 2: runners splitting a
        small engine would otherwise get shares a third apart (2 and 3) for a difference of 0.1 in their sums. A lone
        runner beside interactive users rounds down. 0 while the batch waits for them (`paused`) or steps aside to
        measure what it costs them (`probing`)."""
        if self.paused or self.probing:
            return 0
        return max(self.minimum, min(self.maximum, dithered(self._limit, self._phase)))

    @property
    def prompt_per_output(self) -> float:
        """Prompt tokens the engine computed for our requests per output token of theirs (recent answers)."""
        return self._prompted / self._generated if self._generated else 0.0

    @property
    def capacity(self) -> float | None:
        """The engine's concurrency at its knee, once the batch's own queue has shown it or the engine has stated it."""
        return self.knee.capacity

    def on_slots(self, slots: int) -> None:
        """The engine states that it runs at most `slots` requests at once (llama.cpp)."""
        self.knee.know_slots(slots)

    @property
    def interactive_load(self) -> float:
        """Others' requests on the engine, smoothed."""
        return self.others.load

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
        # Not for a probe: it only measures, and its wait lets the last request end (aborting one every 30 s would
        # waste its tokens).
        allowed = 0 if self.paused else math.ceil(self._limit)
        return max(0, self._inflight - allowed) if self.regime is Regime.SHARED else 0

    # --- our requests -----------------------------------------------------------------------------

    def on_send(self, now: float) -> int:
        """A request goes out; returns its epoch. Close every send with exactly one of on_success, on_backpressure,
        on_other or on_warm_up."""
        self._account(now)
        self._sends += 1
        self._inflight += 1
        self._peak_inflight = max(self._peak_inflight, self._inflight)
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
        self._answered_tokens += output_tokens
        self.service_time = (
            latency
            if self.service_time is None
            else (self.service_time + LATENCY_SMOOTHING * (latency - self.service_time))
        )
        if output_tokens > 1:
            per_token = latency / output_tokens
            self._own_per_token.append(per_token)
            self._own_token_time = (
                per_token
                if self._own_token_time is None
                else self._own_token_time + LATENCY_SMOOTHING * (per_token - self._own_token_time)
            )
        self._own_seconds += latency
        self._own_tokens += output_tokens
        if prompt_tokens and output_tokens:
            keep = 1.0 - PROMPT_SMOOTHING
            self._prompted = keep * self._prompted + max(0, prompt_tokens - cached_tokens)
            self._generated = keep * self._generated + output_tokens
        if self._previous is None or now - self._previous[0] > READINGS_TTL:
            self.regime = Regime.BLIND  # the gauges are gone (or never came): nobody else can be seen
            self._forget_probes()
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
        self.knee.slow_start = False
        if self.regime is Regime.BLIND:
            self._set(self._limit * BACKOFF)
        else:
            self._backoff *= BACKOFF
            self._set(self._limit * BACKOFF)

    def on_warm_up(self, now: float, *, answered: bool) -> None:
        """A prefix warm-up (a one-token copy of a group's head) has its result: it held an engine slot and, when
        `answered`, counts among the engine's finished requests, but its latency says nothing of the batch's."""
        self._close(now)
        self._answered += answered
        self._answered_tokens += answered  # its one token

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

    def on_scrape(self) -> None:
        """The engine's gauges are about to be read: what the batch holds from now until the reading is what they
        may count of it."""
        self._peak_inflight = self._inflight

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
        peers_inflight = sum(max(p.inflight, p.limit) for p in peers)
        batch_inflight = self._inflight + peers_inflight
        # The gauges were read some time during the scrape, not now: when many of our requests end at once (a prefix
        # group's followers), the engine may still count requests we no longer do. Against our most in flight since
        # the scrape began, those are not taken for someone else's. (Since the last reading was too much: beside a
        # full batch, whose count moves by a request or two as each ends and the next goes out, it hid one request
        # of someone else's at four readings in five.)
        ours_lately = max(self._peak_inflight, self._inflight)
        self._peak_inflight = self._inflight
        self.others.observe(now, reading, peers, ours_lately + peers_inflight, self._answered, self._answered_tokens)
        self.regime = Regime.SHARED if self.others.shared(now) else Regime.OURS
        if self.regime is Regime.SHARED:
            if now - self._shared_at > PAUSE_RETRY_FIRST:
                self._retry_wait = PAUSE_RETRY_FIRST  # gone longer than a wait: the trials' verdicts were on others
            self._shared_at = now
        else:
            self._forget_probes()
        if self.regime is Regime.SHARED and not peers:
            # The budget is a ceiling on others' slowdown, and one sequence more for part of the time is what their
            # p99 sees (on a CPU engine, one sequence can be a third of the budget): alone, round it down. Beside
            # other runners, each keeps its part on average, or their split would follow the rounding.
            self._phase = 1.0
        else:
            period = max(DITHER_PERIOD, DITHER_SERVICE_TIMES * (self.service_time or 0.0))
            self._phase = (now / period + self._phase_offset) % 1.0
        queued = self.knee.queued(
            now, reading, step=self._step, ours=self.regime is Regime.OURS, answered=self.service_time is not None
        )
        if self.fixed:
            return
        self._backoff = min(1.0, self._backoff * BACKOFF_RECOVERY)
        if self.regime is Regime.OURS:
            total = self.knee.total(
                now,
                reading,
                total=self._total,
                batch_inflight=batch_inflight,
                queued=queued,
                interval=interval,
                service_time=self.service_time,
            )
        else:
            total = self._total_shared(now, reading, batch_inflight, queued, peers)
        if self.regime is not Regime.SHARED:
            self.budget_view = 0.0
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
        answers' latency per output token) against the batch's and everyone else's sequences over the time it
        describes."""
        own, self._own_per_token = self._own_per_token, []
        own_seconds, own_tokens, self._own_seconds, self._own_tokens = self._own_seconds, self._own_tokens, 0.0, 0.0
        mine = self._mean_inflight(now, previous[0] if previous else None)
        batch = mine + sum(p.inflight for p in peers)
        # Over the interval, not at its two ends: two snapshots of a count that moved in between would bias the
        # slopes toward zero (errors in the regressors).
        if reading.running_mean is not None:
            running = reading.running_mean
        else:
            running = (reading.running + previous[1].running) / 2 if previous else reading.running
        if previous:
            self._loads.add(previous[0], now, batch=min(batch, running), running=running)
        if self.probing and batch == 0.0 and self._probe_clear_since is None:
            self._probe_clear_since = previous[0] if previous else now
        step, lagging = reading.step_seconds, reading.counted_at_end
        if step is None and own:
            step, lagging = sorted(own)[len(own) // 2], True
        if step is None or step <= 0:
            return
        if lagging and previous and self._answered:
            # The step of requests that ended in the interval, each over its decoding (its tokens times the step):
            # the loads of that time, not of the interval, are what made it.
            decoding = self._answered_tokens / self._answered * step
            middle = (previous[0] + now) / 2
            batch, running = self._loads.mean(middle - decoding, middle) or (batch, running)
        # Prompt tokens computed per step describe the interval only where the step does (vLLM's histograms).
        prompt = None if lagging else reading.prompt_per_step
        self.model.observe(step, batch=min(batch, running), others=max(0.0, running - batch), prompt=prompt or 0.0)
        self._step = step if self._step is None else self._step + STEP_SMOOTHING * (step - self._step)
        if prompt is not None:
            self._prompt += STEP_SMOOTHING * (prompt - self._prompt)
        self._lowest_step = min(self._lowest_step, self._step)
        area = mine * (now - previous[0]) if previous else None
        others = None if peers else self._others_tokens(reading, area, own_seconds, own_tokens)
        if self.probing:
            if batch == 0.0 and others is not None:
                self._without = (self._without[0] + others[0], self._without[1] + others[1])
        elif 0.9 <= batch <= 1.1:
            if others is not None:
                self._beside = (self._beside[0] + others[0], self._beside[1] + others[1])
        else:
            self._beside = NO_TOKENS  # their step beside one sequence, since it came to one

    def _others_tokens(
        self, reading: EngineReading, area: float | None, own_seconds: float, own_tokens: float
    ) -> tuple[float, float] | None:
        """Others' share of the reading's token time, and their tokens: the engine's less ours (None where it cannot
        be told). Their step is not the engine's: beside one batch sequence, the engine's mean holds the batch's own
        tokens, made in every step, also in those where nobody else runs (the cheapest), and theirs only in steps
        where they run (docs/controller.md). On an engine that counts a request's tokens as it ends, ours are the
        answers we had since the last reading, each over its latency; else our time in flight over the interval
        (`area`), a token per our latency per token. Our latencies hold our prefill and queue too, so their share is,
        if anything, taken for less than it is."""
        if reading.step_seconds is None or not reading.step_tokens:
            return None
        per_token = self._own_token_time
        if reading.counted_at_end:
            ours = (own_seconds, own_tokens)
        elif area == 0.0:
            ours = NO_TOKENS
        elif area is not None and per_token:
            ours = (area, area / per_token)
        else:
            return None
        seconds, tokens = reading.step_seconds * reading.step_tokens - ours[0], reading.step_tokens - ours[1]
        return (seconds, tokens) if seconds > 0 and tokens >= 1 else None

    def _total_shared(
        self, now: float, reading: EngineReading, batch_inflight: float, queued: bool, peers: Sequence[RunnerLoad]
    ) -> float:
        interactive = self.others.load
        capacity = self.knee.capacity if self.knee.capacity is not None else math.inf
        # Room for their load with headroom for its bursts (a Poisson load's spread is its square root), and for
        # their load as it is right now: a rise is yielded to at once.
        room = min(
            capacity - interactive - HEADROOM_SIGMAS * math.sqrt(interactive) - 1.0,
            capacity - self.others.now - 1.0,
        )
        self.budget_view = self._fit_budget(now, room, batch_inflight) or 0.0
        # Every runner's fit is of the same engine, but each learnt it from its own history (its ramp, the load then),
        # and two fits can differ by a third. Split by one runner's answer, the share would follow whose fit is
        # larger, not the weights: all take the mean of their answers. One without a fit yet takes the others'.
        views = [view for view in (self.budget_view, *(p.budget for p in peers)) if view > 0]
        if self._probe(now, peers):
            return 0.0
        agreed = sum(views) / len(views) if views else None
        # Without a fit, a lone runner's pause holds until a trial ends it (the rules below would scale its zero).
        # Beside other runners no trial comes; those rules scale the batch's count with theirs in it, as before.
        held = self.paused and not peers
        pause_budget = (0.0 if held else math.inf) if agreed is None else agreed
        if (
            agreed is not None or held or self.measured_slowdown is not None or self._trial_probes is not None
        ) and self._pause(now, pause_budget, lone=not peers):
            return 0.0
        # Too few sequences to vary by yielding, in a gap between others' requests, on an engine whose step describes
        # the interval (llama.cpp's describes requests as they end, a service time late: grown on it, a batch beside
        # users at 40% of llama.cpp went from one sequence to four, and their p99 to 1.58×).
        few = batch_inflight <= MIN_SPREAD_SEQUENCES and not self.others.now and not reading.counted_at_end
        if agreed is not None:
            budget = agreed
        elif self._step is not None and (self.model.batch_varied or few):
            # No plausible fit although the batch's count has varied, or none with too few sequences to vary by
            # yielding (`few`: a runner whose first reading showed a user held one sequence for minutes beside sparse
            # users, neither its count nor theirs varying enough for a fit; beside users who stay, its one sequence is
            # probed instead). Grow while the step stays within the budget of the lowest step seen (which erred high:
            # the batch was there too), else shrink.
            budget = batch_inflight * (2.0 if self._step < self.slowdown * self._lowest_step else NO_FIT_YIELD)
        elif self._step is not None:
            # No fit yet, and the batch has held one count: nothing tells how much of the step is its. Yield, which
            # puts them first and gives the fit the spread it needs (on llama.cpp a short batch held 4 sequences to
            # its end beside a user, 3.75 times slower than alone, and never had a fit).
            budget = batch_inflight * NO_FIT_YIELD
        else:
            budget = batch_inflight
        if self._trial_probes is not None or self.trial_within:
            budget = max(budget, 1.0)  # measured, not fitted: one sequence (`_pause`)
        total = min(room, budget)
        if not queued and self._burst_queued(reading):
            # More wait than arrivals between two steps explain: their queue must empty at once.
            queued = True
        if queued:
            # Others wait: keep the queue empty, and keep what was given up free for a while.
            self._cap = max(0.0, batch_inflight - reading.waiting)
            self._cap_until = self.knee.hold(now, self.service_time)
            self.decreases["queue"] += 1
        if now < self._cap_until:
            total = min(total, self._cap)
        if total > self._total:
            total = min(total, self._total + max(2.0, MAX_GROWTH_PER_READING * self._total))
        elif total < self._total:
            self.decreases["budget"] += 1
        return max(0.0, total)

    def _fit_budget(self, now: float, room: float, batch_inflight: float) -> float | None:
        """The sequences all batch work may run within the interactive budget, by this runner's step-time fit (None
        without one)."""
        fit = self.model.fit
        if fit is None or self._step is None:
            self.last_budget = None  # a budget of an earlier fit is of its time, not of now
            return None
        interactive = self.others.load
        # Without the batch their requests would also be shorter, so fewer of theirs would run at once (Little's
        # law, for requests whose time is mostly decoding): with r = their running count per second of step,
        # step_alone = a + m·r·step_alone, so step_alone = a / (1 - m·r). The step with the batch is
        # (a + m·R_batch) / (1 - m·r), so their slowdown is 1 + m·R_batch / a, whatever their load: the batch may
        # run (slowdown - 1)·a/m sequences. A slow correction takes up what the linear fit misses (others'
        # requests costing more or less per sequence than ours), learnt only while this budget is what holds the
        # batch and the batch is at it (no wind-up while something else holds it back).
        a, m = fit.fixed, fit.per_batch_sequence(self.prompt_per_output)
        # Their prefill is theirs too: what the engine computes beyond our steady share of it.
        theirs = max(0.0, self._prompt - self.prompt_per_output * batch_inflight)
        share = min(0.95, (fit.per_other * interactive + fit.per_prompt_token * theirs) / self._step)
        alone = a / (1.0 - share)
        measured = self._step / alone
        margin = SPARSE_MARGIN if self.others.sparse else BUDGET_MARGIN
        aim = 1.0 + (self.slowdown - 1.0) * (1.0 - margin)
        budget = (aim - 1.0) * a / m
        if (
            budget * self._correction <= room
            and now >= self._cap_until
            and batch_inflight >= 0.9 * self._total
            and not self.paused
        ):
            step = min(1.1, max(0.9, (aim / measured) ** CORRECTION_GAIN))
            if measured < 1.0:  # no batch can make them faster: the fit is off, and says nothing of room to grow
                step = min(step, 1.0)
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
        return budget

    def _pause(self, now: float, budget: float, *, lone: bool) -> bool:
        """Whether the batch waits while others use the engine: by the fit, not one batch sequence is within their
        budget (a CPU engine, where a sequence costs a large share of a step), and the step the batch's sequences made
        showed them over it (a fit alone may be off); or the probes measured its one sequence over it (`_probe`).
        Every runner on the engine takes the same mean budget, so they wait together.

        A waiting batch shows nothing more of what it costs them, and their load and its requests change over
        minutes: a lone runner tries again PAUSE_RETRY_FIRST seconds after the pause (a *trial*), with one sequence
        whatever its fit says (the fit has learnt nothing since), and the trial's probe (`_probe`, PROBE_FIRST
        seconds later) rules. Over their budget, or no measure, and the batch waits again, twice as long as before
        (at most PAUSE_RETRY_MAX, so that a trial's seconds over budget stay a small share of their time); within
        it, the batch holds one sequence while the probes that follow keep it within."""
        if not lone:  # beside other runners nothing probes: no trial, and nothing keeps a trial's measure true
            self._trial_probes, self.trial_within = None, False
        if self._trial_probes is not None:
            if self.probing or self.probes == self._trial_probes:
                return False  # one sequence, until the trial's probe has measured it
            self._trial_probes = None
            self.trial_within = self.measured_slowdown is not None and self.measured_slowdown <= self.slowdown
            if not self.trial_within:
                return self._start_pause(now)
        measured_over = self.measured_slowdown is not None and self.measured_slowdown > self.slowdown
        if self.trial_within and not measured_over:
            return False
        over = self.last_budget is None or self.last_budget["slowdown_now"] > self.slowdown  # None: peers' fits say
        if measured_over:
            budget = 0.0  # what users measured beats the fit
        if budget >= 1.0 or not (self.paused or over or measured_over):
            self.paused = False
            return False
        if not self.paused:
            return self._start_pause(now)
        if lone and now >= self._retry_at:
            self.paused = False
            self.measured_slowdown = None  # their load of then, not of now
            self._trial_probes = self.probes
            self.trials += 1
            self._retry_wait = min(PAUSE_RETRY_MAX, 2.0 * self._retry_wait)  # should this one fail
            return False
        return True

    def _start_pause(self, now: float) -> bool:
        self.decreases["pause"] += 1
        self.paused = True
        self.trial_within = False
        self._retry_at = now + self._retry_wait
        return True

    def _probe(self, now: float, peers: Sequence[RunnerLoad]) -> bool:
        """Whether the batch steps aside now, to measure what its one sequence costs them. While it holds one beside
        users, the readings tell only the sum of its cost and the fixed one, and the split the fit keeps came from
        another time (its ramp, other loads): on llama.cpp at 60%, a fit made while the batch ramped down to one put
        the fixed cost at 46 ms (7 ms alone) and one sequence at 1.003× their step alone, where they measured 1.48×.
        Soon after it comes to one sequence, then every PROBE_EVERY seconds, it steps aside long enough for its last
        request to end and some of theirs to run without it (PROBE_CLEAR_SECONDS after that request ended, at
        least); their step beside the one sequence since it came to one (or since the last probe), against their step
        read during the probe where the readings describe a time the batch ran nothing (llama.cpp's describe the
        requests that ended, over their whole decoding), is what the one sequence costs them (the mean over probes:
        their load moves between the two). Both are theirs, not the engine's (`_others_tokens`). A probe that lacks
        their tokens on either side measures nothing. Over their budget, the batch waits until they leave or a trial
        finds it within (`_pause`). A lone runner only: beside others, its one is not the whole batch."""
        if self.probing:
            clear = self._probe_clear_since
            cleared_long_enough = clear is not None and now - clear >= PROBE_CLEAR_SECONDS
            if now < self._probe_until or (not cleared_long_enough and now < self._probe_until + self._probe_wait):
                return True
            self.probing = False
            measured = None  # a probe that read none of their tokens on either side measured nothing
            if self._probe_before is not None and self._without[1] > 0:
                measured = self._probe_before / (self._without[0] / self._without[1])
                previous = self.measured_slowdown
                self.measured_slowdown = (
                    measured if previous is None else previous + PROBE_MEMORY * (measured - previous)
                )
            self.probe_measures.append(measured)
        if peers or self.paused or self._total >= 2.0 or self._step is None:
            self._probe_due = None
            return False
        if self._probe_due is None:
            self._probe_due = now + min(PROBE_FIRST, PROBE_EVERY)
        if now < self._probe_due:
            return False
        self._probe_before = self._beside[0] / self._beside[1] if self._beside[1] > 0 else None
        self._probe_wait = max(PROBE_SECONDS, PROBE_SERVICE_TIMES * (self.service_time or 0.0))
        self._probe_until = now + self._probe_wait
        self._probe_clear_since = None
        self._beside = self._without = NO_TOKENS
        self._probe_due = self._probe_until + PROBE_EVERY
        self.probes += 1
        self.probing = True
        return True

    def _forget_probes(self) -> None:
        """Users gone (or unseen): what a pause or a probe measured of them is theirs, not the next ones'. The wait
        before a trial is kept: sparse users go unseen for seconds and are back, and the trials' verdicts on them
        stand (it starts again from the first when others show after longer than a wait, `on_engine`)."""
        self.paused = self.probing = self.trial_within = False
        self.measured_slowdown = self._probe_due = self._trial_probes = None
        self._retry_at = math.inf
        self._beside = self._without = NO_TOKENS

    def _burst_queued(self, reading: EngineReading) -> bool:
        """One reading with more requests waiting than the arrivals of one step would explain (Poisson: mean plus
        three standard deviations): with others on the engine, a queue is not waited for twice."""
        rate = self.others.completion_rate
        if self._step is None or rate is None:
            return False
        arrivals = rate * self._step
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
            "paused": self.paused,
            "probes": self.probes,
            "pause_trials": self.trials,
            "probe_measures": [None if m is None else round(m, 3) for m in self.probe_measures],
            "measured_slowdown": self.measured_slowdown,
            "total_for_batch": round(self._total, 1),
            "capacity": self.knee.capacity,
            "slow_start": self.knee.slow_start,
            "interactive_load": round(self.interactive_load, 2),
            "step_s": self._step,
            "step_fit": {
                "fixed_s": fit.fixed,
                "per_batch_sequence_s": fit.per_batch_sequence(self.prompt_per_output),
                "per_other_sequence_s": fit.per_other,
                "per_prompt_token_s": fit.per_prompt_token,
                "prompt_per_output": round(self.prompt_per_output, 3),
            }
            if fit
            else None,
            "budget": self.last_budget,
            "budget_view": round(self.budget_view, 1),
            "waiting": previous.waiting if previous else None,
            "running": previous.running if previous else None,
            "kv_usage": previous.kv_usage if previous else None,
            "increases": self.increases + self.knee.increases,
            "decreases": {**self.decreases, "queue": self.decreases["queue"] + self.knee.queue_cuts},
            "backpressure": dict(self.backpressure),
        }
