"""The engine's step-time curve, learnt online: how per-token latency grows with the sequences it runs.

A continuous-batching engine runs every sequence in one step per output token, so every user's inter-token latency
is the step time, and each sequence the batch adds makes every step a little longer. Over the range that matters
(below the engine's knee) the step time is close to linear in the running sequences:

    step(R) = a + m·R

`a` is the fixed cost of a step (reading the weights), `m` what one more sequence adds (its share of compute, its
context read from the KV cache, its prefill chunks), for the current mix of requests. Both are fitted by recursive
least squares with forgetting over the engine's own readings (running sequences, mean inter-token latency), so they
follow slow changes of the mix without per-engine constants. The runner uses the fit for one counterfactual: the step
time interactive users would see without the batch, `step(R_interactive)`, against which their slowdown is judged.

Limits: the fit needs readings at several loads (the batch's own ramp-up gives them) and is only as linear as the
engine: near the knee a memory-bound GPU engine stays close; a compute-bound CPU engine is linear too, with a much
larger `m`. Prefill bursts are folded into `m` as an average.
"""

from __future__ import annotations

from dataclasses import dataclass

FORGETTING = 0.98  # per reading: readings ~50 updates old weigh a third as much as the newest
PRIOR_VARIANCE = 1e6  # weak prior: the first readings decide
MIN_READINGS = 5
MIN_SPREAD = 0.3  # the running count must have varied by this share of its largest value before the fit is trusted


@dataclass(frozen=True)
class StepFit:
    fixed: float  # a: seconds per step with no sequence
    per_sequence: float  # m: seconds each running sequence adds to a step

    def step(self, running: float) -> float:
        return self.fixed + self.per_sequence * max(0.0, running)


class StepModel:
    """Recursive least squares of step time on running sequences, with exponential forgetting."""

    def __init__(self, forgetting: float = FORGETTING) -> None:
        self.forgetting = forgetting
        self._theta = [0.0, 0.0]  # a, m
        self._p = [[PRIOR_VARIANCE, 0.0], [0.0, PRIOR_VARIANCE]]
        self.readings = 0
        self._low = float("inf")
        self._high = 0.0

    def observe(self, running: float, step_seconds: float) -> None:
        """One reading: the mean step time (inter-token latency) while `running` sequences ran on average."""
        if running < 0 or step_seconds <= 0:
            return
        x = (1.0, running)
        p = self._p
        px = (p[0][0] * x[0] + p[0][1] * x[1], p[1][0] * x[0] + p[1][1] * x[1])
        denominator = self.forgetting + x[0] * px[0] + x[1] * px[1]
        gain = (px[0] / denominator, px[1] / denominator)
        error = step_seconds - (self._theta[0] * x[0] + self._theta[1] * x[1])
        self._theta = [self._theta[0] + gain[0] * error, self._theta[1] + gain[1] * error]
        self._p = [
            [(p[i][j] - gain[i] * px[j]) / self.forgetting for j in range(2)] for i in range(2)
        ]
        self.readings += 1
        self._low = min(self._low, running)
        self._high = max(self._high, running)

    @property
    def fit(self) -> StepFit | None:
        """The current fit, once it rests on enough readings at different loads; None before."""
        if self.readings < MIN_READINGS or self._high <= 0 or (self._high - self._low) < MIN_SPREAD * self._high:
            return None
        fixed, per_sequence = self._theta
        if per_sequence <= 0 or fixed <= 0:
            return None  # not a plausible engine (yet): noise dominates
        return StepFit(fixed, per_sequence)
