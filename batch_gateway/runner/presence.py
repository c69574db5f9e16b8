"""Who else is using the engine: its load (running + waiting) minus the batch runners' requests in flight is everyone
else's, interactive users; the engine's count of finished requests minus the runners' answers says the same for users
whose requests are too short to be caught running. A pure object fed by the controller at each reading."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

from batch_gateway.runner.engine_reading import EngineReading
from batch_gateway.runner.share import RunnerLoad

PRESENCE_MIN = 1.5  # others' requests in the engine that mean someone is there...
PRESENCE_SHARE = 0.02  # ...plus this share of the batch's (what runners publish lags a little)
PRESENCE_COMPLETIONS = 3  # or others' finished requests in the completion window
PEER_SLACK = 0.25  # share of the other runners' published limits that may be their growth since they published
COMPLETION_WINDOW = 3.0  # long enough to hold a few of their requests, short enough to notice they left
INTERACTIVE_HOLD = 5.0  # the engine counts as shared this long after the last sign of others
INTERACTIVE_SMOOTHING = 0.3  # weight of a new reading in the interactive-load estimate


class Presence:
    """Others' load on the engine, and whether anyone else is there: on two readings running, or on one that leaves
    no doubt; the engine is the batch's again `INTERACTIVE_HOLD` seconds after the last sign of anyone else."""

    def __init__(self) -> None:
        self._completions: deque[tuple[float, float, float]] = deque()  # (time, engine's count, runners' count)
        self._readings = 0  # readings in a row with a sign of others
        self._seen_at = -math.inf
        self.completion_rate: float | None = None  # the engine's finished requests per second, all clients
        self.load = 0.0  # others' requests on the engine, smoothed
        self.now = 0.0  # ...and at the last reading

    def shared(self, now: float) -> bool:
        return now - self._seen_at <= INTERACTIVE_HOLD

    def observe(
        self,
        now: float,
        reading: EngineReading,
        peers: Sequence[RunnerLoad],
        batch_inflight: float,
        answered: int,
    ) -> None:
        """One reading, beside what all batch runners hold (`batch_inflight`) and what this one has answered."""
        excess = reading.running + reading.waiting - batch_inflight
        others_finished = engine_finished = 0.0
        if reading.completed is not None:
            runners = float(answered + sum(p.completed for p in peers))
            window = self._completions
            if window and reading.completed < window[-1][1]:
                window.clear()  # the engine restarted
            window.append((now, reading.completed, runners))
            while now - window[0][0] > COMPLETION_WINDOW:
                window.popleft()
            engine_finished = reading.completed - window[0][1]
            others_finished = engine_finished - (runners - window[0][2])
            span = now - window[0][0]
            self.completion_rate = (reading.completed - window[0][1]) / span if span > 0 else None
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
        self._readings = self._readings + 1 if present else 0
        if certain or self._readings >= 2:
            self._seen_at = now
        self.now = max(0.0, excess)
        self.load += INTERACTIVE_SMOOTHING * (self.now - self.load)
