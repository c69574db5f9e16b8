"""A continuous-batching engine in virtual time, to drive pure controllers fast and deterministically.

A fake, on purpose: the real simulator (batch_gateway/sim) runs in real time over HTTP and is what the end-to-end and
benchmark runs use; this one exists so controller tests can run minutes of engine time in milliseconds. It keeps only
what the controller's policy depends on: a step costs `fixed + per_sequence × running` (plus `batch_extra` per batch
sequence: long prompts and contexts cost more per step than short chat turns); each running sequence gets
one token per step; at most `capacity` run and the rest wait in FIFO order; interactive users arrive as a Poisson
stream. Every `reading_interval` each batch runner's controller gets the engine's gauges (with vLLM's histograms as
rates since its last reading, or with `counts_at_end` llama.cpp's counters, which move as each request ends) and the
other runners' loads as they published them at their previous reading.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from batch_gateway.runner.controller import ConcurrencyController
from batch_gateway.runner.engine_reading import EngineReading
from batch_gateway.store.metadata import RunnerLoad


@dataclass
class Sequence:
    tokens_left: int
    owner: int  # the batch runner's index, or -1 for an interactive user
    sent_at: float
    epoch: int = 0
    decoding: float = 0.0  # seconds of the steps it ran in


@dataclass
class Run:
    interactive: list[tuple[float, float]] = field(default_factory=list)  # (sent at, latency) per request
    batch_tokens: list[int] = field(default_factory=list)  # per runner
    samples: list[dict] = field(default_factory=list)  # per reading: time, limits, running, waiting

    def latencies(self, start: float = 0.0, end: float = math.inf) -> list[float]:
        return [latency for sent, latency in self.interactive if start <= sent < end]


class ModelEngine:
    def __init__(
        self,
        *,
        fixed: float = 0.010,
        per_sequence: float = 0.0001,
        capacity: int = 128,
        batch_tokens: int = 64,
        interactive_tokens: int = 64,
        reading_interval: float = 0.5,
        seed: int = 1,
        batch_extra: float = 0.0,
        board_lag: int = 1,
        counts_at_end: bool = False,
    ) -> None:
        self.fixed, self.per_sequence, self.capacity = fixed, per_sequence, capacity
        self.batch_extra = batch_extra
        self.board_lag = board_lag  # readings by which what the runners read on the board is late
        # llama.cpp's way: per-token time and output tokens are counted as each request ends, and there is no count
        # of finished requests; vLLM's way (the default): its histograms count every token as it is made.
        self.counts_at_end = counts_at_end
        self.finished_tokens = 0
        self.batch_tokens, self.interactive_tokens = batch_tokens, interactive_tokens
        self.reading_interval = reading_interval
        self.rng = random.Random(seed)
        self.running: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.completed = 0
        self.now = 0.0

    def step_time(self, running: int, batch: int | None = None) -> float:
        batch = running if batch is None else batch
        return self.fixed + self.per_sequence * running + self.batch_extra * batch

    @property
    def capacity_tokens_per_second(self) -> float:
        return self.capacity / self.step_time(self.capacity)

    def interactive_rate(self, share: float) -> float:
        """Interactive requests per second that make `share` of the engine's capacity in tokens."""
        return share * self.capacity_tokens_per_second / self.interactive_tokens

    def run(
        self,
        controllers: list[ConcurrencyController],
        seconds: float,
        interactive_rate: Callable[[float], float] = lambda t: 0.0,
        run: Run | None = None,
    ) -> Run:
        """Run for `seconds` of virtual time with one batch runner per controller (never short of work)."""
        run = run or Run(batch_tokens=[0] * len(controllers))
        end = self.now + seconds
        next_reading = self.now + self.reading_interval
        last_reading = self.now
        token_time = 0.0  # Σ running × step: the inter-token-latency histogram's sum
        tokens = 0  # its count
        queue_sum, queue_count = 0.0, 0
        # Each runner tells the board before it sends.
        board = deque([self._loads(controllers, self.now)] * self.board_lag)
        while self.now < end:
            for owner, controller in enumerate(controllers):
                while controller.inflight < controller.limit:
                    self.waiting.append(Sequence(self.batch_tokens, owner, self.now, controller.on_send(self.now)))
            while self.waiting and len(self.running) < self.capacity:  # FIFO admission
                admitted = self.waiting.popleft()
                queue_sum += self.now - admitted.sent_at
                queue_count += 1
                self.running.append(admitted)
            step = self.step_time(len(self.running), sum(1 for seq in self.running if seq.owner >= 0))
            for _ in range(self._poisson(interactive_rate(self.now) * step)):
                self.waiting.append(Sequence(self.interactive_tokens, -1, self.now))
            self.now += step
            if not self.counts_at_end:
                tokens += len(self.running)
                token_time += len(self.running) * step
            finished = [s for s in self.running if s.tokens_left <= 1]
            for seq in self.running:
                seq.tokens_left -= 1
                seq.decoding += step
            for seq in finished:
                self.running.remove(seq)
                self.completed += 1
                length = self.batch_tokens if seq.owner >= 0 else self.interactive_tokens
                self.finished_tokens += length
                if self.counts_at_end:
                    tokens += length
                    token_time += seq.decoding
                if seq.owner < 0:
                    run.interactive.append((seq.sent_at, self.now - seq.sent_at))
                else:
                    run.batch_tokens[seq.owner] += self.batch_tokens
                    controllers[seq.owner].on_success(
                        self.now, latency=self.now - seq.sent_at, output_tokens=self.batch_tokens, epoch=seq.epoch
                    )
            if self.now >= next_reading:
                reading = EngineReading(
                    running=len(self.running),
                    waiting=len(self.waiting),
                    step_seconds=token_time / tokens if tokens else None,
                    step_tokens=tokens or None,
                    running_mean=None if self.counts_at_end else token_time / (self.now - last_reading),
                    completed=None if self.counts_at_end else self.completed,
                    finished_tokens=self.finished_tokens if self.counts_at_end else None,
                    queue_seconds=queue_sum / queue_count if queue_count else None,
                )
                published = board[0]
                for owner, controller in enumerate(controllers):
                    peers = [load for load in published if load.owner != str(owner)]
                    controller.on_engine(self.now, reading, peers=peers)
                board.append(self._loads(controllers, self.now))
                board.popleft()
                run.samples.append(
                    {
                        "t": self.now,
                        "limits": [c.limit for c in controllers],
                        "running": len(self.running),
                        "waiting": len(self.waiting),
                    }
                )
                last_reading, token_time, tokens, queue_sum, queue_count = self.now, 0.0, 0, 0.0, 0
                next_reading += self.reading_interval
        return run

    @staticmethod
    def _loads(controllers: list[ConcurrencyController], now: float) -> list[RunnerLoad]:
        return [
            RunnerLoad(str(i), c.inflight, c.limit, c.maximum, c.answered, at=now, budget=c.budget_view)
            for i, c in enumerate(controllers)
        ]

    def _poisson(self, mean: float) -> int:
        """Knuth's method; the means here are small (arrivals per step)."""
        if mean <= 0:
            return 0
        limit, k, p = math.exp(-mean), 0, 1.0
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
