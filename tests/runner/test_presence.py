"""Who else uses the engine, judged from its gauges as the runner reads them every half second: users whose requests
are too short to be caught running are seen by their finished requests, however sparse, and let go soon after they
leave."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from batch_gateway.runner.controller import ConcurrencyController, Regime
from batch_gateway.runner.engine_reading import EngineReading
from batch_gateway.runner.presence import FIRST_HOLD, HOLD_MAX, INTERACTIVE_HOLD, LAPSE_CHANCE, Presence
from batch_gateway.runner.share import RunnerLoad
from tests.runner.model_engine import ModelEngine

READING = 0.5  # seconds between readings (dispatch.METRICS_INTERVAL)
USER_REQUEST = 0.3  # seconds a user's request runs: mostly between two readings, so rarely caught running
BATCH_RATE = 3.0  # the batch's answers per second (one sequence on a small engine)
ANSWER_LAG = 0.05  # the runner counts an answer up to this long after the engine does


USER_TOKENS, BATCH_TOKENS = 16, 32  # output tokens of a user's request and of a batch request


def shared_over_time(
    user_rate: float,
    users_until: float,
    seconds: float,
    seed: int,
    *,
    tokens_only: bool = False,
    user_request: float = USER_REQUEST,
) -> list[tuple[float, bool]]:
    """Feed a Presence the readings of an engine that runs one batch sequence and users' requests (`user_request`
    seconds each) arriving as a Poisson stream until `users_until`; returns (time, shared) per reading. `tokens_only`:
    the engine counts no finished requests, only their output tokens as each ends (llama.cpp)."""
    rng = random.Random(seed)
    users: list[float] = []
    t = rng.expovariate(user_rate) if user_rate else seconds
    while t < users_until:
        users.append(t)
        t += rng.expovariate(user_rate)
    batch: list[float] = []
    t = rng.expovariate(BATCH_RATE)
    while t < seconds:
        batch.append(t)
        t += rng.expovariate(BATCH_RATE)
    presence, out, now = Presence(), [], READING
    while now < seconds:
        users_done = sum(u + user_request <= now for u in users)
        batch_done = sum(b <= now for b in batch)
        answered = sum(b + rng.uniform(0, ANSWER_LAG) <= now for b in batch)
        running = 1 + sum(u <= now < u + user_request for u in users)
        if tokens_only:
            finished = users_done * USER_TOKENS + batch_done * BATCH_TOKENS
            reading = EngineReading(running=running, waiting=0, finished_tokens=finished)
        else:
            reading = EngineReading(running=running, waiting=0, completed=users_done + batch_done)
        presence.observe(now, reading, [], 1, answered, answered * BATCH_TOKENS)
        out.append((now, presence.shared(now)))
        now += READING
    return out


@pytest.mark.parametrize("tokens_only", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sparse_users_are_seen_between_their_requests(seed, tokens_only):
    """At 1.1 requests a second (llama.cpp's 20% load in the real-engine benchmark), a window of 3 s showed nobody a
    fifth of the time, and each time the batch filled the engine under the next user's request. llama.cpp counts no
    finished requests; without its count of finished tokens, one user's request at a time was never seen at all."""
    readings = shared_over_time(1.1, users_until=600, seconds=600, seed=seed, tokens_only=tokens_only)
    seen = [shared for t, shared in readings if t > 10]
    assert sum(seen) / len(seen) >= 0.99
    # Each lapse lets the batch refill under their next request: once in ten minutes at most (over a span of eight
    # of their requests, 1-7 times).
    assert sum(1 for before, now in itertools.pairwise(seen) if before and not now) <= 1


@pytest.mark.parametrize(("seed", "user_rate", "user_request"), [(1, 0.1, 1.0), (2, 0.1, 1.0), (3, 0.3, 0.3)])
def test_a_person_sending_a_request_every_few_seconds_stays_seen_across_their_gaps(seed, user_rate, user_request):
    """Beside a full batch one running request of theirs was under the threshold (1.5 + 2% of the batch's), and they
    finished too few requests to be counted over 30 s: at 0.1 requests a second the runner never saw them (the
    sparse benchmark: p99 3.29× alone). Now one request of someone else's is a sign to a lone runner, each sign of
    users already seen counts, and they are held for three times the longest of their recent gaps between requests
    caught running (up to two minutes), not 5 s: at 0.3 a second the 5 s hold let them go after gaps of 7-10 s, and
    the batch refilled under their next request. Here their requests run 1 s (0.1 a second) or 0.3 s (0.3 a second:
    caught running at one reading at most)."""
    readings = shared_over_time(user_rate, 600, 600, seed, user_request=user_request)
    first_seen = next(t for t, shared in readings if shared)
    seen = [shared for t, shared in readings if t > first_seen + 60]
    assert sum(seen) / len(seen) >= 0.97
    assert sum(1 for before, now in itertools.pairwise(seen) if before and not now) <= 1


def test_someone_s_first_request_holds_the_engine_for_a_minute_beside_other_runners_for_5_s():
    """After a first sign of someone, their gaps are not known yet: a lone runner holds the engine for the next
    request of a person chatting (at 0.1 requests a second, with a 5 s hold, the one after their first met the batch
    refilled). Beside other runners a sign may be a peer's growth, so the hold stays at 5 s."""
    peer = RunnerLoad("other", inflight=4, limit=4, demand=10, completed=0, at=0.0)
    for peers, hold in (([], FIRST_HOLD), ([peer], INTERACTIVE_HOLD)):
        presence = Presence()
        batch = 1 + 4 * len(peers)  # ours and the peer's
        for now in (10.0, 10.5):
            presence.observe(now, EngineReading(running=batch + 4, waiting=0), peers, batch, answered=0)
        assert presence.shared(10.5)
        presence.observe(11.0, EngineReading(running=batch, waiting=0), peers, batch, answered=0)
        assert presence.shared(10.5 + hold) and not presence.shared(11.0 + hold)


def test_a_sparse_person_is_held_by_the_gap_their_next_request_exceeds_once_in_1000():
    """The gaps of a Poisson stream exceed c times the sum of the n before with chance (1 + c)^-n, whatever its rate.
    Three times the longest gap held a person whose first two requests came 2 s apart for 6 s, and their next, 16 s
    later, met the batch refilled (the sparse benchmark at one request every 10 s: 2.86× alone)."""
    presence = Presence()

    def request(at: float) -> None:  # one request of theirs, caught running at one reading
        presence.observe(at, EngineReading(running=2, waiting=0), [], batch_inflight=1, answered=0)
        presence.observe(at + 0.5, EngineReading(running=1, waiting=0), [], batch_inflight=1, answered=0)

    rng = random.Random(7)
    at, lapses, holds = 10.0, 0, []
    for _ in range(2000):
        request(at)
        holds.append(presence._hold())
        at += 0.5 + rng.expovariate(1 / 10)
        lapses += not presence.shared(at - 0.01)
    assert holds[0] == FIRST_HOLD and holds[1] == HOLD_MAX  # one gap known says little
    assert lapses <= 2000 * LAPSE_CHANCE * 3, lapses  # and gaps past HOLD_MAX (1 in 160,000 at 10 s)
    assert statistics.median(holds[100:]) == pytest.approx(8.6 * 10.5, rel=0.2)  # 0.54 of the sum of sixteen


@pytest.mark.parametrize(("user_rate", "within"), [(13.0, 5.0), (1.1, 35.0), (0.3, 120.0)])
def test_users_are_let_go_soon_after_they_leave(user_rate, within):
    """The window spans a few of their requests at their rate, and the hold the gap their next request exceeds once in
    1,000, so sparse users are let go later than busy ones (in ten seeds: 18-35 s after they leave at 1.1 a second,
    48-139 s at 0.3), never after the window's longest span (30 s) and the longest hold (120 s). Busy users are let
    go once twelve of their requests' time has passed with no sign of them, sooner than the 5 s hold (8-8.5 s at 13 a
    second when the hold alone applied)."""
    for seed in (1, 2, 3):
        readings = shared_over_time(user_rate, users_until=60, seconds=240, seed=seed)
        assert any(shared for t, shared in readings if 30 < t < 60)
        back = next(t for t, shared in readings if t > 60 and not shared)
        assert back - 60 <= within, (seed, back)
        assert not any(shared for t, shared in readings if t > back)


@pytest.mark.parametrize("tokens_only", [False, True])
def test_the_batch_alone_is_never_taken_for_users(tokens_only):
    readings = shared_over_time(0.0, users_until=0, seconds=600, seed=4, tokens_only=tokens_only)
    assert not any(shared for _, shared in readings)


@pytest.mark.parametrize("seed", [2, 5])
def test_users_stay_seen_from_the_runner_s_first_seconds_on_a_small_engine(seed):
    """A runner that starts beside users on a small engine that counts only finished tokens (llama.cpp's way, 8
    slots) learnt their rate from its first seconds' history, when one more or fewer of their requests moves the
    estimate by half, and kept the highest such estimate: about 2.7 times their rate, so a window of 3 s, where they
    went unseen for seconds at a time (27-29 readings in two minutes), and the batch went back to the knee under
    their next requests. Their rate is learnt from 15 s of history or more."""
    small = {"fixed": 0.005, "per_sequence": 0.006, "capacity": 8, "batch_tokens": 32, "interactive_tokens": 16}
    engine = ModelEngine(seed=seed, counts_at_end=True, **small)
    rate = engine.interactive_rate(0.2)
    controller = ConcurrencyController()
    lapsed = []
    for reading in range(240):
        engine.run([controller], READING, interactive_rate=lambda t: rate)
        if reading * READING > 10 and controller.regime is not Regime.SHARED:
            lapsed.append(engine.now)
    assert not lapsed


def test_a_sign_of_others_that_needs_a_second_reading_is_told_as_unconfirmed():
    """The runner holds its first requests while a first reading's sign of others waits for the second: beside other
    runners, whose publications lag. A lone runner takes one reading's."""
    peer = RunnerLoad("other", inflight=4, limit=4, demand=10, completed=0, at=0.0)
    presence = Presence()
    presence.observe(0.0, EngineReading(running=5 + 3, waiting=0), [peer], batch_inflight=5, answered=0)
    assert presence.unconfirmed and not presence.shared(0.0)
    presence.observe(0.5, EngineReading(running=5 + 3, waiting=0), [peer], batch_inflight=5, answered=0)
    assert not presence.unconfirmed and presence.shared(0.5)
    alone = Presence()  # a lone runner knows its own requests: one of someone else's is a sign at once
    alone.observe(0.0, EngineReading(running=1, waiting=0), [], batch_inflight=0, answered=0)
    assert not alone.unconfirmed and alone.shared(0.0)
    idle = Presence()
    idle.observe(0.0, EngineReading(running=0, waiting=0), [], batch_inflight=0, answered=0)
    assert not idle.unconfirmed and not idle.shared(0.0)


def test_a_peer_s_fractional_share_stepping_up_by_one_is_not_taken_for_growth():
    """A runner keeps a share of 1.5 as 1 and 2 in turn (`dithered`). Read as growth, its step from 1 to 2 (doubling)
    let it hold two requests beyond its limit, and hid users who hold three."""
    presence = Presence()
    for now, peer_limit in ((0.0, 1), (0.5, 2)):
        peer = RunnerLoad("other", inflight=peer_limit, limit=peer_limit, demand=10, completed=0, at=now - 0.25)
        running = 1 + peer_limit + 3  # ours, the peer's, the users'
        presence.observe(now, EngineReading(running=running, waiting=0), [peer], 1 + peer_limit, answered=0)
    assert presence.shared(0.5)


def test_someone_who_comes_after_others_left_is_held_as_after_a_first_sign():
    """The gaps of users who left are not the next person's: a sign after the engine looked the batch's starts them
    afresh (the hold after an old gap of 20 s would have held this one for two minutes)."""
    presence = Presence()

    def sign(now: float) -> None:
        for t in (now, now + 0.5):
            presence.observe(t, EngineReading(running=2, waiting=0), [], batch_inflight=1, answered=0)
        presence.observe(now + 1.0, EngineReading(running=1, waiting=0), [], batch_inflight=1, answered=0)

    sign(0.0)
    sign(20.0)  # one gap known: held for up to two minutes
    assert presence.shared(20.5 + HOLD_MAX - 1)
    assert not presence.shared(300.0)
    sign(300.0)  # gone for minutes: a first sign again
    assert presence.shared(300.5 + FIRST_HOLD) and not presence.shared(301.0 + FIRST_HOLD)
