"""A circuit breaker per upstream endpoint: an endpoint that says "not now" is waited for, never failed.

A refused or reset connection, or a 429, 502, 503 or 504, means the endpoint cannot take work right now: a vLLM pod
restarting, a rolling update, a rate limiter. Failing the line would turn a two-second blip into thousands of failed
lines. Instead the circuit opens: nothing new goes to the endpoint, and after a backoff (or the `Retry-After` the
endpoint asked for) one *probe* request goes out. Any answer closes the circuit and dispatch resumes at once; another
"not now" doubles the wait, up to `PROBE_CAP`. Lines caught by an open circuit wait for it (or go to another
endpoint whose circuit is closed); they fail only if the batch ends first (cancel, expiry).

A "not now" from a request sent before the endpoint's latest answer was received is stale: the endpoint has answered
since, so it does not open the circuit (one reset on a reused keep-alive connection must not pause a healthy engine).

Pure: no I/O, no clock reads; callers pass `now`. The dispatcher does the waiting.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable

PROBE_BASE = 0.5  # seconds before the first probe
PROBE_CAP = 10.0  # longest wait between probes: an endpoint back from a long outage is used within this time
RETRY_AFTER_CAP = 120.0  # a Retry-After longer than this is not honoured in full


class CircuitState(enum.Enum):
    CLOSED = "closed"  # requests flow
    OPEN = "open"  # nothing is sent until the next probe time
    PROBING = "probing"  # one probe is out; the others wait for its answer


class Circuit:
    def __init__(self, *, jitter: Callable[[], float] = random.random) -> None:
        self.state = CircuitState.CLOSED
        self._jitter = jitter
        self._failed_probes = 0
        self._probe_at = -math.inf
        self._answered_send = -1  # send number of the latest request that got an answer
        self._opened_at: float | None = None
        # Reported.
        self.openings = 0
        self.open_seconds = 0.0

    @property
    def closed(self) -> bool:
        return self.state is CircuitState.CLOSED

    def seconds_to_probe(self, now: float) -> float | None:
        """How long until a probe may go out; None while a probe is out (wait for its answer) or when closed."""
        return max(0.0, self._probe_at - now) if self.state is CircuitState.OPEN else None

    def try_probe(self, now: float) -> bool:
        """Take the probe if the circuit is open and its wait is over; the caller must then send one request and
        report its outcome (or `abandon_probe`)."""
        if self.state is CircuitState.OPEN and now >= self._probe_at:
            self.state = CircuitState.PROBING
            return True
        return False

    def abandon_probe(self, now: float) -> None:
        """The probe was taken but nothing was sent (no work left, or the batch stopped): let the next one go."""
        if self.state is CircuitState.PROBING:
            self.state = CircuitState.OPEN
            self._probe_at = now

    def on_answer(self, now: float, *, send: int) -> None:
        """The endpoint answered a request (any HTTP status other than "not now")."""
        self._answered_send = max(self._answered_send, send)
        if self.state is not CircuitState.CLOSED:
            self._close(now)

    def on_unavailable(self, now: float, *, send: int, probe: bool, retry_after: float | None = None) -> bool:
        """The endpoint said "not now" to request number `send`. Returns whether the circuit is open afterwards."""
        if not probe and (self.state is not CircuitState.CLOSED or send < self._answered_send):
            return not self.closed  # already open, or stale: the endpoint answered a later request
        if probe:
            self._failed_probes += 1
        else:
            self.openings += 1
            self._opened_at = now
        if retry_after is not None:
            wait = min(retry_after, RETRY_AFTER_CAP)
        else:
            wait = min(PROBE_CAP, PROBE_BASE * 2**self._failed_probes) * (0.5 + 0.5 * self._jitter())
        self.state = CircuitState.OPEN
        self._probe_at = now + wait
        return True

    def _close(self, now: float) -> None:
        if self._opened_at is not None:
            self.open_seconds += now - self._opened_at
        self.state = CircuitState.CLOSED
        self._failed_probes = 0
        self._opened_at = None

    def snapshot(self, now: float) -> dict:
        ongoing = now - self._opened_at if self._opened_at is not None else 0.0
        return {
            "state": self.state.value,
            "openings": self.openings,
            "open_seconds": round(self.open_seconds + ongoing, 3),
        }
