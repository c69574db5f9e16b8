"""Latency-feedback adaptive concurrency for one upstream endpoint. A pure object: no I/O, no clock reads.

Goal: keep the engine's batch full (running ≈ its max-num-seqs) with nothing queued behind it. Past that knee extra
requests only wait in the engine's queue — where they delay interactive users too — so the controller aims for the
knee from below and retreats as soon as a queue forms.

Signals, strongest first:
1. **Hard backpressure** — 429, 503, timeouts, connection resets: cut the limit in half (`BACKOFF`), at most once per
   flight: a failure of a request sent before the last cut says nothing new and is ignored (each send gets an epoch).
2. **The engine's own queue** — `vllm:num_requests_waiting` (llama.cpp: `requests_deferred`) and
   `vllm:kv_cache_usage_perc`, when the endpoint exposes `/metrics`. Requests waiting means the engine is past its
   knee: the limit drops by the queue length at once (the batch gives back exactly the room that is missing), and
   it only grows while the queue is empty and the KV cache is not nearly full.
3. **Per-token latency** — `latency / output_tokens`, so long and short answers compare; with continuous batching
   every running sequence pays the same step time, so it is a faithful view of what interactive users see. The
   baseline is the lowest window median of the last `BASELINE_WINDOW` seconds (a minimum, so the batch's own load
   cannot drift it upwards). Above `TOLERANCE` × baseline the limit shrinks in proportion (at most to half); this is
   the only delay signal when there are no queue metrics.

Growth happens once per window (≥ `WINDOW_SECONDS` and ≥ `WINDOW_SAMPLES` samples): doubling until the first
congestion signal (slow start), then additively by ~5%. It never grows while app-limited (the runner had fewer than
half the limit in flight), so a batch running dry does not leave a huge limit behind. The limit stays within
[minimum, maximum].
"""

from __future__ import annotations

import math
from collections import deque

BACKOFF = 0.5  # multiplicative cut on hard backpressure
TOLERANCE = 2.0  # per-token latency allowed above the baseline before the limit shrinks
WINDOW_SECONDS = 1.0
WINDOW_SAMPLES = 5
MAX_WINDOW_SECONDS = 10.0  # a window closes after this long even with fewer samples (slow engines)
BASELINE_WINDOW = 60.0
QUEUE_METRICS_TTL = 3.0  # queue readings older than this are ignored
KV_FULL = 0.95
ADDITIVE_SHARE = 0.05


class ConcurrencyController:
    def __init__(self, *, initial: int = 8, minimum: int = 1, maximum: int = 256, fixed: int | None = None) -> None:
        if fixed is not None:
            initial = minimum = maximum = fixed
        self.minimum, self.maximum = minimum, maximum
        self.fixed = fixed is not None
        self._limit = float(max(minimum, min(maximum, initial)))
        self._slow_start = True
        self._sends = 0
        self._inflight = 0
        self._cut_epoch = -1  # sends up to this epoch were in flight at the last cut
        self._window_start: float | None = None
        self._window_samples: list[float] = []
        self._window_inflight = 0
        self._baselines: deque[tuple[float, float]] = deque()  # (time, window median per-token latency)
        self._waiting: float | None = None
        self._kv_usage: float | None = None
        self._queue_seen_at = -math.inf
        self.last_sample: float | None = None
        self.decreases = {"backpressure": 0, "queue": 0, "latency": 0}
        self.increases = 0

    @property
    def limit(self) -> int:
        return int(self._limit)

    @property
    def baseline(self) -> float | None:
        return min(v for _, v in self._baselines) if self._baselines else None

    # --- events ----------------------------------------------------------------------------------

    def on_send(self, now: float) -> int:
        """A request goes out. Every send is later closed by exactly one of on_success, on_backpressure or
        on_other; the controller counts what is in flight itself (for the app-limited guard)."""
        if self._window_start is None:
            self._window_start = now
        self._sends += 1
        self._inflight += 1
        self._window_inflight = max(self._window_inflight, self._inflight)
        return self._sends

    def on_other(self, now: float, *, epoch: int) -> None:
        """An answer that says nothing about load (a 4xx, a plain 500)."""
        self._inflight = max(0, self._inflight - 1)

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
        self._inflight = max(0, self._inflight - 1)
        if self._window_start is None:
            self._window_start = now
        self._window_samples.append(latency / max(1, output_tokens))
        elapsed = now - self._window_start
        if (elapsed >= WINDOW_SECONDS and len(self._window_samples) >= WINDOW_SAMPLES) or elapsed >= MAX_WINDOW_SECONDS:
            self._close_window(now)

    def on_backpressure(self, now: float, *, epoch: int, kind: str) -> None:
        """429/503/timeout/reset: cut once per flight."""
        self._inflight = max(0, self._inflight - 1)
        if self.fixed or epoch <= self._cut_epoch:
            return
        self._cut_epoch = self._sends
        self._slow_start = False
        self._set(self._limit * BACKOFF)
        self.decreases["backpressure"] += 1
        self._reset_window(now)

    def on_queue_metrics(self, now: float, *, waiting: float, running: float | None = None, kv_usage: float | None = None) -> None:
        self._waiting = waiting if self._waiting is None else 0.5 * self._waiting + 0.5 * waiting
        self._kv_usage = kv_usage
        self._queue_seen_at = now

    def snapshot(self) -> dict:
        return {
            "limit": self.limit,
            "baseline_per_token_s": self.baseline,
            "last_per_token_s": self.last_sample,
            "waiting": self._waiting,
            "kv_usage": self._kv_usage,
            "slow_start": self._slow_start,
            "increases": self.increases,
            "decreases": dict(self.decreases),
        }

    # --- the per-window decision ------------------------------------------------------------------

    def _close_window(self, now: float) -> None:
        samples = sorted(self._window_samples)
        sample = samples[len(samples) // 2]
        inflight = self._window_inflight
        self._reset_window(now)
        self.last_sample = sample
        self._remember_baseline(now, sample)
        if self.fixed:
            return
        queue_fresh = now - self._queue_seen_at <= QUEUE_METRICS_TTL
        baseline = self.baseline or sample
        if queue_fresh and self._waiting is not None and self._waiting >= max(1.0, 0.02 * self._limit):
            # The engine is past its knee: give back the missing room at once.
            self._slow_start = False
            self._set(max(self._limit * BACKOFF, self._limit - self._waiting))
            self.decreases["queue"] += 1
            return
        if sample > TOLERANCE * baseline:
            self._slow_start = False
            self._set(self._limit * max(BACKOFF, min(0.9, TOLERANCE * baseline / sample)))
            self.decreases["latency"] += 1
            return
        if queue_fresh and self._kv_usage is not None and self._kv_usage >= KV_FULL:
            return  # hold: more sequences would be preempted
        if inflight * 2 < self._limit:
            return  # app-limited: the runner is not using the limit it has
        grown = self._limit * 2 if self._slow_start else self._limit + max(1.0, self._limit * ADDITIVE_SHARE)
        if int(grown) > self.limit or self._limit < self.maximum:
            self.increases += 1
        self._set(grown)

    def _remember_baseline(self, now: float, sample: float) -> None:
        self._baselines.append((now, sample))
        while self._baselines and now - self._baselines[0][0] > BASELINE_WINDOW:
            self._baselines.popleft()

    def _reset_window(self, now: float) -> None:
        self._window_start = now
        self._window_samples = []
        self._window_inflight = self._inflight

    def _set(self, value: float) -> None:
        self._limit = float(min(self.maximum, max(self.minimum, value)))
