"""The adaptive controller: exact reactions to synthetic signals, and convergence against a server with a knee."""

from __future__ import annotations

import pytest

from batch_gateway.runner.controller import ConcurrencyController


def feed_window(c: ConcurrencyController, now: float, per_token: float, inflight: int, n: int = 10) -> float:
    """One full window: `inflight` requests out, then n successes with the given per-token latency."""
    epochs = [c.on_send(now) for _ in range(inflight)]
    for i in range(n):
        c.on_success(now + 1.05 * (i + 1) / n, latency=per_token * 10, output_tokens=10, epoch=epochs[i % len(epochs)])
    for _ in range(inflight - n):
        c.on_other(now, epoch=0)  # the rest come back too, so the next window starts empty
    return now + 1.05


def test_slow_start_doubles_then_backpressure_halves_once_per_flight():
    c = ConcurrencyController(initial=8, maximum=256)
    now = feed_window(c, 0.0, 0.01, inflight=8)
    assert c.limit == 16
    now = feed_window(c, now, 0.01, inflight=16)
    assert c.limit == 32
    early = c.on_send(now)
    late = c.on_send(now)
    c.on_backpressure(now, epoch=late, kind="429")
    assert c.limit == 16
    c.on_backpressure(now, epoch=early, kind="503")  # sent before the cut: same flight, ignored
    assert c.limit == 16
    c.on_backpressure(now, epoch=c.on_send(now), kind="timeout")  # a new flight
    assert c.limit == 8
    now = feed_window(c, now, 0.01, inflight=8)
    assert c.limit == 9  # after congestion growth is additive


def test_other_answers_do_not_change_the_limit():
    c = ConcurrencyController(initial=10)
    c.on_other(0.0, epoch=c.on_send(0.0))
    assert c.limit == 10


def test_app_limited_does_not_grow():
    c = ConcurrencyController(initial=32)
    feed_window(c, 0.0, 0.01, inflight=4)
    assert c.limit == 32


def test_rising_per_token_latency_shrinks_the_limit():
    c = ConcurrencyController(initial=64, maximum=64)
    now = feed_window(c, 0.0, 0.010, inflight=64)  # baseline 10 ms/token
    now = feed_window(c, now, 0.040, inflight=64)  # 4x: shrink by half at most
    assert c.limit == 32
    now = feed_window(c, now, 0.025, inflight=32)  # 2.5x: proportional cut (2/2.5 = 0.8)
    assert c.limit == 25


def test_per_token_normalises_output_length():
    c = ConcurrencyController(initial=16, maximum=16)
    # Same step time, answers 10x longer: raw latency is 10x, per-token is not. No decrease.
    now = feed_window(c, 0.0, 0.01, inflight=16)
    for i in range(10):
        c.on_success(now + 0.11 * (i + 1), latency=1.0, output_tokens=100, epoch=c.on_send(now))
    assert c.limit == 16 and c.decreases["latency"] == 0


def test_queue_metrics_give_back_exactly_the_queue():
    c = ConcurrencyController(initial=100, maximum=256)
    c.on_queue_metrics(0.0, waiting=30, running=64, kv_usage=0.5)
    c.on_queue_metrics(0.5, waiting=30, running=64, kv_usage=0.5)
    feed_window(c, 0.5, 0.01, inflight=100)
    assert c.limit == 70
    assert c.decreases["queue"] == 1


def test_stale_queue_metrics_are_ignored():
    c = ConcurrencyController(initial=16, maximum=256)
    c.on_queue_metrics(0.0, waiting=50)
    feed_window(c, 10.0, 0.01, inflight=16)
    assert c.limit == 32


def test_bounds_and_fixed():
    c = ConcurrencyController(initial=500, minimum=2, maximum=64)
    assert c.limit == 64
    for _ in range(10):
        c.on_backpressure(0.0, epoch=c.on_send(0.0), kind="429")
    assert c.limit == 2
    fixed = ConcurrencyController(fixed=12)
    feed_window(fixed, 0.0, 0.01, inflight=12)
    fixed.on_backpressure(1.0, epoch=fixed.on_send(1.0), kind="429")
    assert fixed.limit == 12


class KneeServer:
    """A continuous-batching engine in virtual time: at most `slots` sequences run, the rest wait; a step costs
    base + per_seq * running; each request needs `tokens` steps. `interactive` sequences permanently hold slots."""

    def __init__(self, slots: int, base: float = 0.010, per_seq: float = 0.00005, tokens: int = 20) -> None:
        self.slots, self.base, self.per_seq, self.tokens = slots, base, per_seq, tokens
        self.now = 0.0
        self.running: list[list] = []  # [tokens_left, sent_at, epoch]
        self.waiting: list[list] = []
        self.interactive = 0

    def run(self, c: ConcurrencyController, seconds: float, metrics: bool = True) -> dict:
        end = self.now + seconds
        next_scrape = self.now
        busy = waiting_sum = steps = 0.0
        while self.now < end:
            while len(self.running) + len(self.waiting) < c.limit:
                self.waiting.append([self.tokens, self.now, c.on_send(self.now)])
            room = self.slots - self.interactive - len(self.running)
            if room > 0:
                self.running += self.waiting[:room]
                del self.waiting[:room]
            active = len(self.running) + self.interactive
            self.now += self.base + self.per_seq * active
            steps += 1
            busy += min(self.slots, active)
            waiting_sum += len(self.waiting)
            finished = [r for r in self.running if r[0] <= 1]
            for r in self.running:
                r[0] -= 1
            self.running = [r for r in self.running if r[0] > 0]
            for _, sent_at, epoch in finished:
                c.on_success(self.now, latency=self.now - sent_at, output_tokens=self.tokens, epoch=epoch)
            if metrics and self.now >= next_scrape:
                c.on_queue_metrics(self.now, waiting=len(self.waiting), running=active, kv_usage=0.3)
                next_scrape = self.now + 1.0
        return {"utilisation": busy / steps / self.slots, "mean_waiting": waiting_sum / steps, "limit": c.limit}


@pytest.mark.parametrize("slots", [8, 64, 128])
def test_converges_near_the_knee_and_yields_to_interactive_load(slots):
    server = KneeServer(slots)
    c = ConcurrencyController()
    server.run(c, 30)
    steady = server.run(c, 30)
    assert steady["utilisation"] >= 0.93, steady
    assert slots * 0.9 <= steady["limit"] <= slots * 1.3, steady
    assert steady["mean_waiting"] <= max(2.0, 0.1 * slots), steady

    server.interactive = slots // 2  # interactive users take half the engine
    server.run(c, 10)
    shared = server.run(c, 20)
    assert shared["limit"] <= slots // 2 * 1.3 + 2, shared
    assert shared["mean_waiting"] <= max(2.0, 0.1 * slots), shared

    server.interactive = 0  # and leave again
    server.run(c, 30)
    recovered = server.run(c, 20)
    assert recovered["limit"] >= slots * 0.9, recovered


def test_latency_alone_bounds_the_queue_without_metrics():
    server = KneeServer(32)
    c = ConcurrencyController()
    server.run(c, 60, metrics=False)
    steady = server.run(c, 30, metrics=False)
    assert steady["utilisation"] >= 0.9, steady
    # Without the engine's queue gauge the only queue signal is latency, which self-load also raises: the controller
    # tolerates up to TOLERANCE x the baseline, so a queue of about one service time may form, but no more.
    assert steady["limit"] <= 32 * 3, steady
    assert steady["mean_waiting"] <= 32, steady
