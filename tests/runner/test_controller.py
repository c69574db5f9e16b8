"""The adaptive controller: exact reactions to synthetic signals, and convergence against engines with a knee.

The engine models run in virtual time (no sleeping, deterministic): a continuous-batching engine with K slots whose
step costs `base + per_seq * running + prefill * prompt tokens admitted`, arrivals admitted at the next step boundary
(as vLLM does), and optional interactive sequences that take slots ahead of the batch.
"""

from __future__ import annotations

import heapq
import random
from collections import deque

import pytest

from batch_gateway.runner import controller as controller_module
from batch_gateway.runner.controller import ConcurrencyController


# --- exact reactions: the engine's queue ----------------------------------------------------------


def fill(c: ConcurrencyController, now: float, count: int | None = None) -> list[int]:
    """Send until `count` (default: the limit) requests are in flight."""
    target = c.limit if count is None else count
    return [c.on_send(now) for _ in range(target - c.inflight)]


def answered(c: ConcurrencyController, now: float, latency: float) -> None:
    """One request answered after `latency` seconds: tells the controller the engine's service time."""
    c.on_success(now, latency=latency, output_tokens=10, epoch=c.on_send(now - latency))


def test_slow_start_doubles_once_per_service_time_while_there_is_no_queue():
    c = ConcurrencyController(initial=8, maximum=256)
    fill(c, 0.0)
    c.on_queue_metrics(1.0, waiting=0, running=8)
    assert c.limit == 8  # no answer yet: the service time, and so the pace, is unknown
    answered(c, 1.5, latency=1.0)
    for second, expected in enumerate([16, 32, 64, 128, 256], start=2):
        fill(c, second - 0.5)
        c.on_queue_metrics(float(second), waiting=0, running=c.limit, kv_usage=0.2)
        assert c.limit == expected  # readings 1 s apart, service time 1 s: x2 each
    c.on_queue_metrics(7.0, waiting=0, running=256)
    assert c.limit == 256  # the maximum


def test_no_growth_until_the_runner_has_filled_the_limit():
    c = ConcurrencyController(initial=8)
    fill(c, 0.0)
    answered(c, 0.5, latency=0.5)
    c.on_queue_metrics(1.0, waiting=0, running=8)
    c.on_queue_metrics(2.0, waiting=0, running=8)
    assert c.limit == 16
    fill(c, 2.0, count=12)  # the limiter has let only 12 out so far (it is woken by releases)
    c.on_queue_metrics(3.0, waiting=0, running=12)
    c.on_queue_metrics(4.0, waiting=0, running=12)
    assert c.limit == 16  # no reading has seen 16 in the engine: growing further would be blind
    fill(c, 4.5)
    c.on_queue_metrics(5.0, waiting=0, running=16)
    assert c.limit == 32


def test_slow_start_counts_only_watched_time():
    c = ConcurrencyController(initial=8)
    fill(c, 0.0)
    answered(c, 0.9, latency=4.0)  # service time 4 s
    c.on_queue_metrics(1.0, waiting=0, running=8)
    c.on_queue_metrics(30.0, waiting=0, running=8)  # readings failed for half a minute
    assert c.limit == 11  # x2^(2/4): at most two seconds of pace, not a doubling on trust


def test_a_slow_engine_is_probed_one_request_at_a_time():
    c = ConcurrencyController(initial=8)
    fill(c, 0.0)
    for second in range(1, 13):
        c.on_queue_metrics(float(second), waiting=0, running=8)
    answered(c, 12.0, latency=12.0)  # a CPU server: 12 s per request
    c.on_queue_metrics(13.0, waiting=0, running=8)
    assert c.limit == 9  # x2^(1/12) would be +0.5: one request, the smallest overshoot there is


def test_growth_waits_a_window_after_each_change():
    c = ConcurrencyController(initial=8)
    fill(c, 0.0)
    c.on_queue_metrics(0.5, waiting=0, running=8)
    answered(c, 0.9, latency=0.9)
    c.on_queue_metrics(1.0, waiting=0, running=8)
    assert c.limit > 8
    grown = c.limit
    fill(c, 1.0)
    c.on_queue_metrics(1.5, waiting=0, running=grown)
    assert c.limit == grown  # too soon: this reading may predate the new requests
    c.on_queue_metrics(2.0, waiting=0, running=grown)
    assert c.limit > grown


def test_a_persistent_queue_of_our_own_cuts_to_what_the_engine_serves():
    c = ConcurrencyController(initial=128, maximum=256)
    fill(c, 0.0)
    answered(c, 0.5, latency=0.5)
    c.on_queue_metrics(1.0, waiting=28, running=100)
    assert c.limit == 128  # one reading can be a burst's refill waiting for the next step
    c.on_queue_metrics(2.0, waiting=28, running=100)
    # Allowance 0.5 + 1 % of running = 1.5 tolerated: keep 128 - (28 - 1.5) = 101.5 in flight.
    assert c.limit == 101 and c.decreases["queue"] == 1
    c.on_queue_metrics(3.0, waiting=26, running=100)  # the same queue, seen before our surplus drained
    assert c.limit == 101 and c.decreases["queue"] == 1  # the target is absolute: no second cut
    assert c.snapshot()["slow_start"] is False


def test_a_shared_queue_is_cut_in_proportion_to_our_share_of_the_load():
    c = ConcurrencyController(initial=64)
    fill(c, 0.0)
    c.on_queue_metrics(1.0, waiting=64 + 40, running=128)  # our 64 are waiting behind 40 interactive ones, and more
    c.on_queue_metrics(2.0, waiting=64 + 40, running=128)
    # Ours are 64 of the 232 requests the engine holds: cut that share of the queue, 64/232 x (104 - 1.5 - 1.28).
    assert c.limit == 35


def test_a_queue_pushes_the_batch_down_at_most_by_half_per_reading():
    c = ConcurrencyController(initial=64)
    fill(c, 0.0)
    c.on_queue_metrics(1.0, waiting=64 + 400, running=128)
    c.on_queue_metrics(2.0, waiting=64 + 400, running=128)
    assert c.limit == 32


def test_an_engine_running_nothing_has_no_queue():
    c = ConcurrencyController(initial=8)
    fill(c, 0.0)
    c.on_queue_metrics(0.01, waiting=8, running=0)  # read before the engine's first step admitted them
    c.on_queue_metrics(1.0, waiting=1, running=8)  # and a refill caught waiting for a step boundary
    assert c.limit == 8 and c.snapshot()["slow_start"]


def test_a_queue_seen_before_our_first_answers_does_not_end_slow_start():
    c = ConcurrencyController(initial=8)
    fill(c, 0.0)
    for second in range(1, 4):  # another client keeps the engine at its knee: that is not our knee
        c.on_queue_metrics(float(second), waiting=9, running=128)
    assert c.snapshot()["slow_start"]
    answered(c, 3.5, latency=2.0)
    c.on_queue_metrics(4.0, waiting=9, running=128)
    assert not c.snapshot()["slow_start"]


def test_a_runner_holding_more_than_the_others_gives_part_of_its_excess_back_on_a_queue():
    c = ConcurrencyController(initial=100, maximum=256)
    fill(c, 0.0)
    answered(c, 0.5, latency=0.5)
    c.on_queue_metrics(1.0, waiting=12, running=128)  # 140 in the engine: our 100 and 40 of others
    c.on_queue_metrics(2.0, waiting=12, running=128)
    # Our share of the queue, 100/140 x (12 - 0.5 - 1.28), and half the excess over the others, (100 - 40) / 2.
    assert c.limit == 62


def test_the_engines_finished_count_shows_our_share_when_requests_are_in_transit():
    c = ConcurrencyController(initial=140, maximum=256)
    fill(c, 0.0)
    answered(c, 0.5, latency=0.5)
    c.on_queue_metrics(1.0, waiting=8, running=128, completed=1000)
    for i in range(90):  # 90 of the engine's last 100 answers were ours
        answered(c, 1.5, latency=1.0)
    c.on_queue_metrics(2.0, waiting=8, running=128, completed=1100)
    # By in-flight counts (140 of ours, 136 in the engine) the engine would hold ours alone: cut the whole queue,
    # 8 - 0.5 - 1.28. By the answers, ours are 90 % of its 136, 122.4, and the others hold 13.6: give those back.
    assert c.limit == 120


def test_waiting_requests_the_engine_has_room_for_are_not_a_queue():
    c = ConcurrencyController(initial=128, maximum=256)
    fill(c, 0.0)
    c.on_queue_metrics(1.0, waiting=0, running=128)  # the engine has shown it runs 128
    # A burst of 60 completions: their refill waits for the next step while only 68 run.
    c.on_queue_metrics(2.0, waiting=60, running=68)
    c.on_queue_metrics(3.0, waiting=60, running=68)
    assert c.decreases["queue"] == 0


def test_after_a_queue_cut_growth_holds_for_a_while():
    c = ConcurrencyController(initial=10)
    epochs = fill(c, 0.0)
    answered(c, 0.5, latency=0.5)
    c.on_queue_metrics(1.0, waiting=2, running=8)  # an 8-slot engine, the batch has 10 out
    c.on_queue_metrics(2.0, waiting=2, running=8)
    assert c.limit == 8  # 10 - (2 - 0.5 - 1 % of 8)
    for epoch in epochs[:2]:  # two answers, not replaced: 8 in flight, all of them running
        c.on_success(2.5, latency=2.5, output_tokens=10, epoch=epoch)
    fill(c, 3.0)
    hold_ends = 2.0 + controller_module.QUEUE_HOLD
    second = 3.0
    while second < hold_ends:
        c.on_queue_metrics(second, waiting=0, running=8)  # no queue, but no free room either: hold
        second += 1
    assert c.limit == 8
    c.on_queue_metrics(hold_ends, waiting=0, running=8)
    assert c.limit == 9  # then probe again, one request


def test_slots_left_idle_by_the_runner_itself_are_not_room():
    c = ConcurrencyController(initial=8)
    epochs = fill(c, 0.0)
    answered(c, 0.5, latency=0.5)
    c.on_queue_metrics(1.0, waiting=0, running=8)  # the engine has run 8: all ours
    for epoch in epochs[:3]:
        c.on_success(1.5, latency=1.5, output_tokens=10, epoch=epoch)  # 3 finish; the rest of the work is gated
    c.on_queue_metrics(2.5, waiting=0, running=5)
    assert c.limit == 8  # the 3 free slots are ours, idle for want of work


def test_a_one_request_queue_that_persists_is_the_knee():
    c = ConcurrencyController(initial=9)
    fill(c, 0.0)
    answered(c, 0.5, latency=0.5)
    for second in range(1, 5):  # an 8-slot engine: our ninth request keeps waiting
        c.on_queue_metrics(float(second), waiting=1, running=8)
    assert c.limit == 8 and not c.snapshot()["slow_start"]


def test_capacity_freed_by_others_is_refilled_at_once():
    c = ConcurrencyController(initial=64, maximum=256)
    fill(c, 0.0)
    answered(c, 0.2, latency=0.2)
    c.on_queue_metrics(0.5, waiting=10, running=128)  # shared with interactive users: 74 of theirs
    c.on_queue_metrics(1.0, waiting=10, running=128)
    assert c.limit == 60  # 64 - 64/138 x (10 - 0.5 - 1 % of 128)
    fill(c, 1.5)
    c.on_queue_metrics(3.0, waiting=0, running=60)  # they left: 68 slots the engine has shown are free
    assert c.limit == 60 + 68
    assert c.snapshot()["slow_start"] is False


def test_kv_cache_nearly_full_holds_growth():
    c = ConcurrencyController(initial=16)
    fill(c, 0.0)
    answered(c, 0.5, latency=0.5)
    c.on_queue_metrics(1.0, waiting=0, running=16, kv_usage=0.5)
    c.on_queue_metrics(2.0, waiting=0, running=16, kv_usage=0.97)
    assert c.limit == 16
    c.on_queue_metrics(3.0, waiting=0, running=16, kv_usage=0.5)
    assert c.limit == 32


def test_app_limited_does_not_grow():
    c = ConcurrencyController(initial=32)
    fill(c, 0.0, count=10)  # the runner has only 10 requests to send
    c.on_queue_metrics(1.0, waiting=0, running=10)
    c.on_queue_metrics(2.0, waiting=0, running=10)
    assert c.limit == 32 and c.increases == 0


def test_stale_readings_hand_control_back_to_latency():
    c = ConcurrencyController()
    c.on_queue_metrics(0.0, waiting=0, running=0)
    assert c.queue_mode(5.0) and not c.queue_mode(controller_module.QUEUE_METRICS_TTL + 1)


class SharedSlots:
    """K slots shared by several clients, in virtual time: every request takes half a second, the engine runs
    min(K, all in flight) and the rest waits, and the clients read the gauges once a second, in turn. With
    `transit`, that share of each client's requests is on its way to or from the engine (in flight for the
    client, not in the engine's gauges); with `completions`, the readings carry the engine's finished count."""

    def __init__(self, slots: int, clients: list[ConcurrencyController], *, transit: float = 0.0,
                 completions: bool = False) -> None:
        self.slots, self.clients, self.transit, self.completions = slots, clients, transit, completions
        self.completed = 0
        self.flights: list[list[int]] = [[] for _ in clients]
        self.joins = [0.0] * len(clients)  # when each client starts sending
        self.now = 0.0

    def run(self, seconds: float) -> list[list[int]]:
        """Each client's in-flight count at each of its readings."""
        seen: list[list[int]] = [[] for _ in self.clients]
        end = self.now + seconds
        while self.now < end:
            active = [k for k, at in enumerate(self.joins) if self.now >= at]
            for k in active:  # the last half second's requests answered; the limit is refilled
                c = self.clients[k]
                for epoch in self.flights[k]:
                    c.on_success(self.now, latency=0.5, output_tokens=10, epoch=epoch)
                self.completed += len(self.flights[k])
                self.flights[k] = [c.on_send(self.now) for _ in range(c.limit)]
            total = sum(round(len(f) * (1 - self.transit)) for f in self.flights)
            reader = round(self.now * 2) % len(self.clients)
            if reader in active:
                c = self.clients[reader]
                c.on_queue_metrics(self.now, waiting=max(0, total - self.slots), running=min(self.slots, total),
                                   kv_usage=0.4, completed=self.completed if self.completions else None)
                seen[reader].append(c.inflight)
            self.now += 0.5
        return seen


def assert_fair_at_the_knee(seen: list[list[int]], slots: int, transit: float = 0.0) -> None:
    for x, y in zip(*seen):
        assert 0.4 <= x / (x + y) <= 0.6, seen  # each within ±20 % of an equal share at every reading
        assert 0.95 * slots <= (x + y) * (1 - transit) <= 1.1 * slots + 2, seen  # and together at the knee


@pytest.mark.parametrize("initial", [(8, 8), (8, 100), (120, 8)])
def test_two_clients_started_together_converge_to_equal_shares_at_the_knee(initial):
    engine = SharedSlots(128, [ConcurrencyController(initial=n) for n in initial])
    engine.run(20)
    assert_fair_at_the_knee(engine.run(10), 128)


@pytest.mark.parametrize("transit", [0.0, 0.1])
def test_a_client_joining_a_full_engine_gets_an_equal_share_within_fifteen_seconds(transit):
    # 10 % in transit: the first client's own backlog outweighs the newcomer's 8 requests, so in-flight counts
    # alone would show it no one to give room to; the engine's finished count shows its real share.
    engine = SharedSlots(128, [ConcurrencyController(), ConcurrencyController()], transit=transit,
                         completions=transit > 0)
    engine.joins[1] = 30.0
    engine.run(30)
    assert engine.clients[0].limit * (1 - transit) >= 0.95 * 128  # alone, the first filled the engine
    engine.run(15)
    assert_fair_at_the_knee(engine.run(10), 128, transit)


# --- exact reactions: hard backpressure, bounds -----------------------------------------------------


def test_backpressure_halves_once_per_flight():
    c = ConcurrencyController(initial=32, maximum=256)
    early = c.on_send(0.0)
    late = c.on_send(0.0)
    c.on_backpressure(0.1, epoch=late, kind="429")
    assert c.limit == 16
    c.on_backpressure(0.2, epoch=early, kind="503")  # sent before the cut: the same flight, ignored
    assert c.limit == 16
    c.on_backpressure(0.3, epoch=c.on_send(0.25), kind="timeout")  # sent after it: a new flight
    assert c.limit == 8
    assert c.decreases["backpressure"] == 2 and c.backpressure["503"] == 1 and c.inflight == 0
    with pytest.raises(ValueError):
        c.on_backpressure(0.4, epoch=c.on_send(0.4), kind="404")


def test_backpressure_from_before_a_queue_cut_is_ignored():
    c = ConcurrencyController(initial=64)
    epochs = fill(c, 0.0)
    c.on_queue_metrics(1.0, waiting=20, running=44)
    c.on_queue_metrics(2.0, waiting=20, running=44)
    assert c.limit == 44  # 64 - (20 - 0.5 - 1 % of 44)
    c.on_backpressure(2.1, epoch=epochs[-1], kind="503")  # sent before the cut, which already answered that load
    assert c.limit == 44 and c.decreases["backpressure"] == 0


def test_other_answers_only_close_the_send():
    c = ConcurrencyController(initial=10)
    c.on_other(0.0, epoch=c.on_send(0.0))
    assert c.limit == 10 and c.inflight == 0


def test_bounds_fixed_and_bad_arguments():
    c = ConcurrencyController(initial=500, minimum=2, maximum=64)
    assert c.limit == 64
    for i in range(10):
        c.on_backpressure(float(i), epoch=c.on_send(float(i)), kind="reset")
    assert c.limit == 2
    fixed = ConcurrencyController(fixed=12)
    fill(fixed, 0.0)
    fixed.on_queue_metrics(1.0, waiting=50, running=12)
    fixed.on_queue_metrics(2.0, waiting=50, running=12)
    fixed.on_backpressure(3.0, epoch=fixed.on_send(3.0), kind="429")
    assert fixed.limit == 12 and fixed.snapshot()["mode"] == "fixed"
    for kwargs in ({"fixed": 0}, {"minimum": 0}, {"minimum": 5, "maximum": 4}):
        with pytest.raises(ValueError):
            ConcurrencyController(**kwargs)
    with pytest.raises(ValueError):
        c.on_queue_metrics(1.0, waiting=-1)


# --- latency mode (no /metrics) -------------------------------------------------------------------------


class ClosedLoop:
    """The runner keeps `limit` requests in flight; a request sent at load L takes `latency(L, now)` seconds for
    `tokens` output tokens. Virtual time, event driven."""

    def __init__(self, c: ConcurrencyController, latency, tokens: int = 10) -> None:
        self.c, self.latency, self.tokens = c, latency, tokens
        self.now = 0.0
        self.events: list[tuple[float, int, float, int]] = []  # (done_at, seq, sent_at, epoch)
        self.seq = 0

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            while self.c.inflight < self.c.limit:
                epoch = self.c.on_send(self.now)
                self.seq += 1
                heapq.heappush(self.events, (self.now + self.latency(self.c.inflight, self.now), self.seq, self.now, epoch))
            done_at, _, sent_at, epoch = heapq.heappop(self.events)
            if done_at > end:
                heapq.heappush(self.events, (done_at, 0, sent_at, epoch))
                self.now = end
                return
            self.now = done_at
            self.c.on_success(self.now, latency=done_at - sent_at, output_tokens=self.tokens, epoch=epoch)


def test_latency_mode_grows_while_latency_grows_slower_than_the_load():
    c = ConcurrencyController(initial=8, maximum=256)
    # Continuous batching below its knee: a step costs 10 ms + 0.05 ms per sequence.
    loop = ClosedLoop(c, lambda load, now: 10 * (0.010 + 0.00005 * load))
    loop.run(30)
    assert c.limit == 256 and c.decreases["latency"] == 0
    assert c.last_elasticity is not None and c.last_elasticity < 0.5


def test_latency_mode_retreats_to_the_knee_when_latency_grows_with_the_load():
    c = ConcurrencyController(initial=8, maximum=256)
    # K = 40 slots: past them, requests only queue (latency in proportion to the load).
    loop = ClosedLoop(c, lambda load, now: 10 * 0.012 * max(1.0, load / 40))
    loop.run(60)
    assert 40 <= c.limit <= 50, c.snapshot()
    assert c.decreases["latency"] >= 1 and c.snapshot()["mode"] == "latency"


def test_latency_mode_shrinks_when_others_take_capacity_and_recovers_when_they_leave():
    c = ConcurrencyController(initial=8, maximum=256)
    slots = {"free": 40}
    loop = ClosedLoop(c, lambda load, now: 10 * 0.012 * max(1.0, load / slots["free"]))
    loop.run(60)
    settled = c.limit
    slots["free"] = 20  # interactive users take half the engine
    loop.run(30)
    assert c.limit <= 0.65 * settled, c.snapshot()
    slots["free"] = 40
    loop.run(40)
    assert c.limit >= 0.9 * settled, c.snapshot()


def test_per_token_latency_makes_long_answers_no_congestion():
    c = ConcurrencyController(initial=16, maximum=16)
    loop = ClosedLoop(c, lambda load, now: 0.01 * loop.tokens)
    loop.run(20)
    loop.tokens = 500  # answers 50x longer: raw latency 50x, per-token unchanged
    loop.run(60)
    assert c.limit == 16 and c.decreases["latency"] == 0


def test_samples_sent_before_a_change_do_not_judge_the_new_limit():
    c = ConcurrencyController(initial=4, maximum=64)
    early = [c.on_send(0.0) for _ in range(4)]
    c.on_backpressure(0.1, epoch=c.on_send(0.1), kind="429")  # limit 2; the 4 early ones are still out
    for epoch in early:
        c.on_success(5.0, latency=5.0, output_tokens=1, epoch=epoch)  # terribly slow, but from before the cut
    assert c.last_sample is None and c.limit == 2


def test_a_new_limit_is_measured_after_one_turnover():
    c = ConcurrencyController(initial=8, maximum=64)
    now, flight = 0.0, deque()

    def step(per_token: float) -> None:  # one completion (oldest first), then top the flight up to the limit
        nonlocal now
        while c.inflight < c.limit:
            flight.append(c.on_send(now))
        now += 0.01
        c.on_success(now, latency=per_token * 10, output_tokens=10, epoch=flight.popleft())

    for _ in range(8):
        step(0.010)
    assert c.limit == 16 and c.last_sample == 0.010  # slow start probes up
    # The requests sent first after the increase met an engine that had not queued anything yet; only once they
    # have turned over does latency show the new load. The level must be judged on the latter.
    levels = c.levels
    measured = []
    for per_token in [0.010] * (8 + 16) + [0.020] * 40:
        step(per_token)
        if c.levels > levels:
            levels = c.levels
            measured.append(c.last_sample)
    assert measured[0] == 0.020
    assert c.limit == 8 and c.decreases["latency"] == 1  # latency doubled with the load: back down


def test_embeddings_count_per_prompt_token():
    c = ConcurrencyController(initial=8, maximum=8)
    for i in range(40):
        c.on_success(0.1 * i, latency=0.5, output_tokens=0, prompt_tokens=500, cached_tokens=0, epoch=c.on_send(0.1 * i))
    assert c.last_sample == pytest.approx(0.001)


# --- convergence against a continuous-batching engine with a knee ------------------------------------


class KneeEngine:
    """K slots; a step costs base + per_seq * running + prefill * prompt tokens admitted; arrivals wait for the next
    step; `interactive` sequences are admitted ahead of the batch and hold slots; /metrics read once a second."""

    def __init__(self, slots: int, *, base=0.010, per_seq=0.0001, prefill=0.00005, prompt=200, tokens=64, spread=0.5,
                 seed=1) -> None:
        self.slots, self.base, self.per_seq, self.prefill, self.prompt = slots, base, per_seq, prefill, prompt
        self.tokens, self.spread = tokens, spread
        self.rng = random.Random(seed)
        self.now = 0.0
        self.running: list[list] = []  # [tokens left, sent at, epoch, tokens]
        self.waiting: list[list] = []
        self.interactive = 0
        self.interactive_running = 0

    def run(self, c: ConcurrencyController, seconds: float, metrics: bool = True) -> dict:
        end, next_scrape = self.now + seconds, self.now
        steps = busy = waiting = tokens = 0.0
        while self.now < end:
            free = self.slots - len(self.running) - self.interactive_running
            self.interactive_running += max(0, min(free, self.interactive - self.interactive_running))
            self.interactive_running = min(self.interactive_running, self.interactive)
            room = max(0, self.slots - len(self.running) - self.interactive_running)
            admitted, self.waiting = self.waiting[:room], self.waiting[room:]
            self.running += admitted
            active = len(self.running) + self.interactive_running
            self.now += self.base + self.per_seq * active + self.prefill * self.prompt * len(admitted)
            queued = len(self.waiting) + self.interactive - self.interactive_running
            steps, busy, waiting = steps + 1, busy + active, waiting + queued
            for r in self.running:
                r[0] -= 1
            for r in [r for r in self.running if r[0] <= 0]:
                tokens += r[3]
                c.on_success(self.now, latency=self.now - r[1], output_tokens=r[3], prompt_tokens=self.prompt, epoch=r[2])
            self.running = [r for r in self.running if r[0] > 0]
            while len(self.running) + len(self.waiting) < c.limit:
                n = max(1, round(self.tokens * self.rng.uniform(1 - self.spread, 1 + self.spread)))
                self.waiting.append([n, self.now, c.on_send(self.now), n])
            if metrics and self.now >= next_scrape:
                c.on_queue_metrics(self.now, waiting=queued, running=active, kv_usage=0.4)
                next_scrape = self.now + 1.0
        return {"utilisation": busy / steps / self.slots, "mean_waiting": waiting / steps, "limit": c.limit,
                "tokens_per_s": tokens / seconds}


@pytest.mark.parametrize("slots", [8, 64, 128])
def test_queue_mode_sits_at_the_knee_and_yields_to_interactive_load(slots):
    # 64 and 128 slots: the simulator's default costs; 8 slots: compute-bound like a CPU llama.cpp server.
    engine = KneeEngine(slots, **({} if slots > 8 else {"base": 0.012, "per_seq": 0.009, "prompt": 30, "prefill": 0.001}))
    c = ConcurrencyController()
    engine.run(c, 40)
    steady = engine.run(c, 40)
    queue_bound = max(1.0, 0.04 * slots)  # a couple of requests waiting at a step boundary, no real queue
    assert steady["utilisation"] >= 0.97, steady
    assert slots * 0.95 <= steady["limit"] <= slots * 1.1 + 2, steady
    assert steady["mean_waiting"] <= queue_bound, steady

    engine.interactive = slots // 2  # interactive users take half the engine
    engine.run(c, 10)
    shared = engine.run(c, 30)
    assert shared["limit"] <= slots // 2 * 1.1 + 1, shared
    assert shared["mean_waiting"] <= queue_bound, shared  # their requests do not queue behind the batch
    assert shared["utilisation"] >= 0.97, shared  # and the batch uses what they leave

    engine.interactive = 0  # they leave again
    engine.run(c, 10)
    recovered = engine.run(c, 20)
    assert recovered["limit"] >= slots * 0.95 and recovered["utilisation"] >= 0.97, recovered


@pytest.mark.parametrize("slots", [64, 128])
def test_latency_mode_alone_lands_near_the_knee(slots):
    engine = KneeEngine(slots, spread=0.8)
    c = ConcurrencyController()
    engine.run(c, 60, metrics=False)
    steady = engine.run(c, 60, metrics=False)
    # Without the engine's gauges, the knee is only visible through probes: looser, but near it.
    assert steady["utilisation"] >= 0.9, steady
    assert steady["mean_waiting"] <= 0.25 * slots, steady
    assert 0.7 * slots <= steady["limit"] <= 1.35 * slots, steady


def test_latency_mode_does_not_walk_a_compute_bound_engine_down():
    # A CPU llama.cpp server (real-engine.md: 64 tokens take 0.95 s alone, 5.4 s at 8 slots): per-token latency
    # grows almost in proportion to the load even below its 8 slots, yet 8 slots still give the most throughput.
    engine = KneeEngine(8, base=0.012, per_seq=0.009, prompt=30, prefill=0.001)
    c = ConcurrencyController()
    engine.run(c, 60, metrics=False)
    steady = engine.run(c, 120, metrics=False)
    assert steady["utilisation"] >= 0.9 and steady["limit"] >= 6, steady


def test_no_growth_while_the_engines_gauges_do_not_show_our_requests():
    """llama.cpp counts a new request only when its busy loop comes round (seconds on a CPU): until the gauges
    show what we sent, an increase has not been seen, and growing further would overshoot blind."""
    c = ConcurrencyController(initial=8, maximum=256)
    answered(c, 0.0, latency=10.0)
    for second in range(1, 11):
        fill(c, second - 0.5)
        c.on_queue_metrics(float(second), waiting=0, running=8)  # lagging: 8 busy slots, nothing deferred yet
    assert c.limit <= 10  # a request or two beyond what the gauges show, not one more every reading


def test_a_slot_yielded_to_an_interactive_user_stays_free_between_their_turns():
    c = ConcurrencyController(initial=8, maximum=256)
    answered(c, 0.0, latency=10.0)
    epochs = fill(c, 0.5)
    c.on_queue_metrics(1.0, waiting=1, running=8)  # an interactive request waits for one of our 8 slots
    c.on_queue_metrics(2.0, waiting=1, running=8)
    yielded = c.limit
    assert yielded < 8
    for epoch in epochs[yielded:]:
        c.on_success(2.5, latency=10.0, output_tokens=10, epoch=epoch)
    for second in range(3, 12):  # the user thinks between turns: their slot is free in consecutive readings
        fill(c, second - 0.5)
        c.on_queue_metrics(float(second), waiting=0, running=c.inflight)
        assert c.limit == yielded, second
