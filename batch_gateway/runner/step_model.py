"""The engine's step-time curve, learnt online: how per-token latency grows with the sequences it runs.

A continuous-batching engine runs every sequence in one step per output token, so every user's inter-token latency
is the step time, and each sequence makes every step a little longer. Over the range that matters (below the
engine's knee) the step time is close to linear in the running sequences:

    step = a + m_batch·R_batch + m_others·R_others

`a` is the fixed cost of a step (reading the weights); `m_batch` what one more batch sequence adds, and `m_others`
what one more of everyone else's adds. They differ because a sequence's cost includes its context (read from the KV
cache every step) and its prompt's prefill spread over its steps: a batch of long prompts costs more per sequence
than short chat turns. All three are fitted by recursive least squares with forgetting over the engine's own
readings, so they follow changes of the request mix without per-engine constants. Until others' load has varied
enough to tell, `m_others` is taken to be `m_batch`.

Limits: the fit needs readings at several loads (the batch's own ramp-up gives them) and is only as linear as the
engine: near the knee a memory-bound GPU engine stays close; a compute-bound CPU engine is linear too, with a much
larger slope.
"""

from __future__ import annotations

from dataclasses import dataclass

FORGETTING = 0.99  # per reading: at two readings a second, a reading half a minute old weighs half as much
PRIOR_VARIANCE = 1e6  # weak prior: the first readings decide; also the cap that keeps an idle direction from winding up
MIN_READINGS = 5
MIN_SPREAD = 0.3  # a load must have varied by this share of its largest value before its slope is trusted
MIN_SPREAD_SEQUENCES = 2.0  # ...and by at least this many sequences


@dataclass(frozen=True)
class StepFit:
    fixed: float  # a: seconds per step with no sequence
    per_batch: float  # m_batch: seconds each batch sequence adds to a step
    per_other: float  # m_others: seconds each of others' sequences adds

    def step(self, others: float, batch: float = 0.0) -> float:
        return self.fixed + self.per_other * max(0.0, others) + self.per_batch * max(0.0, batch)


class _Spread:
    __slots__ = ("high", "low")

    def __init__(self) -> None:
        self.low, self.high = float("inf"), 0.0

    def add(self, value: float) -> None:
        self.low, self.high = min(self.low, value), max(self.high, value)

    @property
    def enough(self) -> bool:
        varied = self.high - self.low
        return self.high > 0 and varied >= MIN_SPREAD * self.high and varied >= MIN_SPREAD_SEQUENCES


class StepModel:
    """Recursive least squares of step time on (1, others' sequences, batch sequences), with forgetting."""

    def __init__(self, forgetting: float = FORGETTING) -> None:
        self.forgetting = forgetting
        self._theta = [0.0, 0.0, 0.0]
        self._p = [[PRIOR_VARIANCE if i == j else 0.0 for j in range(3)] for i in range(3)]
        self.readings = 0
        self._batch = _Spread()
        self._others = _Spread()

    def observe(self, step_seconds: float, *, batch: float, others: float = 0.0) -> None:
        """One reading: the mean step time while `batch` and `others` sequences ran on average."""
        if step_seconds <= 0 or batch < 0 or others < 0:
            return
        x = (1.0, others, batch)
        p = self._p
        px = [sum(p[i][j] * x[j] for j in range(3)) for i in range(3)]
        denominator = self.forgetting + sum(x[i] * px[i] for i in range(3))
        gain = [v / denominator for v in px]
        error = step_seconds - sum(self._theta[i] * x[i] for i in range(3))
        self._theta = [self._theta[i] + gain[i] * error for i in range(3)]
        self._p = [[(p[i][j] - gain[i] * px[j]) / self.forgetting for j in range(3)] for i in range(3)]
        for i in range(3):  # a direction no reading excites would grow without bound under forgetting
            if self._p[i][i] > PRIOR_VARIANCE:
                scale = (PRIOR_VARIANCE / self._p[i][i]) ** 0.5
                for j in range(3):
                    self._p[i][j] *= scale
                    self._p[j][i] *= scale
        self.readings += 1
        self._batch.add(batch)
        self._others.add(others)

    @property
    def fit(self) -> StepFit | None:
        """The current fit, once it rests on enough readings at different loads; None before."""
        if self.readings < MIN_READINGS:
            return None
        fixed, per_other, per_batch = self._theta
        if not self._batch.enough:
            if not self._others.enough:
                return None
            per_batch = per_other  # the batch's own load has not varied yet: one slope for all
        if not self._others.enough or per_other <= 0:
            per_other = per_batch
        if per_batch <= 0 or fixed <= 0:
            return None  # not a plausible engine (yet): noise dominates
        return StepFit(fixed, per_batch, per_other)
