"""The engine's step-time curve, learnt online: how per-token latency grows with the sequences it runs.

A continuous-batching engine runs every sequence in one step per output token, so every user's inter-token latency
is the step time, and each sequence makes every step a little longer. Over the range that matters (below the
engine's knee) the step time is close to linear in the running sequences:

    step = a + m_batch·R_batch + m_others·R_others + p·P

`a` is the fixed cost of a step (reading the weights); `m_batch` what one more batch sequence adds, and `m_others`
what one more of everyone else's adds. They differ because a sequence's cost includes its context (read from the KV
cache every step): a batch of long contexts costs more per sequence than short chat turns. `P` is the prompt tokens
the engine computed per step (vLLM's prompt tokens less its prefix-cache hits, where it counts both), and `p` what
each costs. Without it, a batch's prefill lands on `m_batch` by when the batch admits its requests: in its ramp it
admits many at once, and the split of the step the ramp teaches (which directional forgetting then keeps) put
`m_batch` 10% and more over what a sequence costs at a steady count. A steady batch of R sequences computes
R·π prompt tokens per step (π: its computed prompt tokens per output token, from its own answers), so what one
batch sequence costs a step is `m_batch + p·π` (`StepFit.per_batch_sequence`). All four are fitted by least
squares with directional forgetting over the engine's own readings, so they follow changes of the request mix
without per-engine constants. Until others' load has varied enough to tell, `m_others` is taken to be `m_batch`.
An engine that does not count prompt tokens (llama.cpp's per-token time leaves prompt processing out anyway) has
P = 0, and its `m_batch` is the whole cost.

Limits: the fit needs readings at several loads (the batch's own ramp-up gives them) and is only as linear as the
engine: near the knee a memory-bound GPU engine stays close; a compute-bound CPU engine is linear too, with a much
larger slope.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

FORGETTING = 0.95  # along each reading's direction: what readings keep showing is weighed over ~20 readings (10 s)
# and a change of the request mix is followed within a few minutes; what they do not show is kept
PRIOR_VARIANCE = 1e6  # weak prior: the first readings decide
MIN_READINGS = 5
MIN_SPREAD = 0.3  # a load must have varied by this share of its largest value before its slope is trusted
MIN_SPREAD_SEQUENCES = 2.0  # ...and by at least this many sequences
_TERMS = 4  # 1, others' sequences, batch sequences, prompt tokens per step
LOAD_HISTORY_SECONDS = 120.0  # loads kept for readings that describe the past (the longest requests' decoding)


@dataclass(frozen=True)
class StepFit:
    fixed: float  # a: seconds per step with no sequence
    per_batch: float  # m_batch: seconds each batch sequence adds to a step, its prefill aside
    per_other: float  # m_others: seconds each of others' sequences adds
    per_prompt_token: float = 0.0  # p: seconds each prompt token computed in a step adds to it

    def per_batch_sequence(self, prompt_per_output: float) -> float:
        """What one batch sequence adds to a step at a steady count: its own cost, and its prompt spread over the
        steps of its output (`prompt_per_output`: computed prompt tokens per output token)."""
        return self.per_batch + self.per_prompt_token * max(0.0, prompt_per_output)


class _Spread:
    __slots__ = ("count", "high", "low", "total")

    def __init__(self) -> None:
        self.low, self.high = float("inf"), 0.0
        self.total, self.count = 0.0, 0

    def add(self, value: float) -> None:
        self.low, self.high = min(self.low, value), max(self.high, value)
        self.total, self.count = self.total + value, self.count + 1

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def enough(self) -> bool:
        varied = self.high - self.low
        return self.high > 0 and varied >= MIN_SPREAD * self.high and varied >= MIN_SPREAD_SEQUENCES


class StepModel:
    """Least squares of step time on (1, others' sequences, batch sequences, prompt tokens computed per step), with
    directional forgetting.

    Plain exponential forgetting fades every direction of what was learnt, excited or not. While the batch holds
    steady at its budget, the readings only tell `a + m_batch·R_batch` as one sum; forgetting would fade how the ramp
    split it and let noise pick the split, and the budget `a/m_batch` with it. So old readings are forgotten only along
    the direction each new reading carries news about (Kulhavý's directional forgetting, in information form): what no
    reading contradicts is kept, and a change of the request mix is still followed as the readings show it."""

    def __init__(self, forgetting: float = FORGETTING) -> None:
        self.forgetting = forgetting
        self._theta = [0.0] * _TERMS
        # The information matrix (Σ x·xᵀ, weighted) and Σ x·y, from a weak prior: the first readings decide.
        self._info = [[1.0 / PRIOR_VARIANCE if i == j else 0.0 for j in range(_TERMS)] for i in range(_TERMS)]
        self._moment = [0.0] * _TERMS
        self.readings = 0
        self._batch = _Spread()
        self._others = _Spread()

    def observe(self, step_seconds: float, *, batch: float, others: float = 0.0, prompt: float = 0.0) -> None:
        """One reading: the mean step time while `batch` and `others` sequences ran on average and the engine computed
        `prompt` prompt tokens per step."""
        if step_seconds <= 0 or batch < 0 or others < 0 or prompt < 0:
            return
        x = (1.0, others, batch, prompt)
        info, terms = self._info, range(_TERMS)
        ix = [sum(info[i][j] * x[j] for j in terms) for i in terms]
        news = sum(x[i] * ix[i] for i in terms)  # the information already held along x
        fade = (1.0 - self.forgetting) / news
        # Forget along x only, keeping the estimate where it is (the moment follows the faded information).
        info = [[info[i][j] - fade * ix[i] * ix[j] + x[i] * x[j] for j in terms] for i in terms]
        projected = sum(ix[j] * self._theta[j] for j in terms)
        self._moment = [self._moment[i] - fade * ix[i] * projected + x[i] * step_seconds for i in terms]
        self._info = info
        self._theta = _solve(info, self._moment) or self._theta
        self.readings += 1
        self._batch.add(batch)
        self._others.add(others)

    @property
    def batch_varied(self) -> bool:
        """The batch's own count has varied enough to tell its slope."""
        return self._batch.enough

    @property
    def fit(self) -> StepFit | None:
        """The current fit, once it rests on enough readings at different loads; None before."""
        if self.readings < MIN_READINGS:
            return None
        fixed, per_other, per_batch, per_prompt = self._theta
        if not self._batch.enough:
            if not self._others.enough:
                return None
            # The batch's own load has not varied yet: one slope for all. Its count has stayed near one level, where
            # only the sum `a + m_batch·level` is told apart from the rest; the fixed cost is that sum less the
            # shared slope's part (the split the least squares made of it is arbitrary).
            level = self._batch.mean
            fixed += (per_batch - per_other) * level
            per_batch = per_other
        if not self._others.enough or per_other <= 0:
            per_other = per_batch
        if per_batch <= 0 or fixed <= 0:
            return None  # not a plausible engine (yet): noise dominates
        return StepFit(fixed, per_batch, per_other, max(0.0, per_prompt))


class LoadHistory:
    """The batch's and everyone's mean sequences over each interval between readings, for the readings that describe
    a longer past. An engine that counts per-token time as each request ends (llama.cpp) reports, at each reading, the
    mean step of the requests that ended since the last one, each over its whole decoding: paired with the last
    interval's load, the steps of a ramp land on the counts of a later time, which flattens the slope and inflates the
    intercept."""

    def __init__(self) -> None:
        self._intervals: deque[tuple[float, float, float, float]] = deque()  # (start, end, batch, running)

    def add(self, start: float, end: float, *, batch: float, running: float) -> None:
        if end <= start:
            return
        self._intervals.append((start, end, batch, running))
        while self._intervals and self._intervals[0][1] < end - LOAD_HISTORY_SECONDS:
            self._intervals.popleft()

    def mean(self, start: float, end: float) -> tuple[float, float] | None:
        """(batch, running) on average over [start, end], as far as the history covers it; None where it does not."""
        covered = batch = running = 0.0
        for begin, finish, interval_batch, interval_running in self._intervals:
            overlap = min(end, finish) - max(start, begin)
            if overlap > 0:
                covered += overlap
                batch += overlap * interval_batch
                running += overlap * interval_running
        return (batch / covered, running / covered) if covered > 0 else None


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float] | None:
    """matrix · θ = vector for a small square system, by Gaussian elimination with partial pivoting; None if
    singular."""
    n = len(vector)
    rows = [[*row, value] for row, value in zip(matrix, vector, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        if abs(rows[pivot][col]) < 1e-300:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / rows[col][col]
            rows[r] = [a - factor * b for a, b in zip(rows[r], rows[col], strict=True)]
    theta = [0.0] * n
    for r in reversed(range(n)):
        theta[r] = (rows[r][n] - sum(rows[r][c] * theta[c] for c in range(r + 1, n))) / rows[r][r]
    return theta
