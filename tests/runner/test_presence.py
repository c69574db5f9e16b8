"""Who else uses the engine, judged from its gauges as the runner reads them every half second: users whose requests
are too short to be caught running are seen by their finished requests, however sparse, and let go soon after they
leave."""

from __future__ import annotations

import random

import pytest

from batch_gateway.runner.engine_reading import EngineReading
from batch_gateway.runner.presence import Presence

READING = 0.5  # seconds between readings (dispatch.METRICS_INTERVAL)
USER_REQUEST = 0.3  # seconds a user's request runs: mostly between two readings, so rarely caught running
BATCH_RATE = 3.0  # the batch's answers per second (one sequence on a small engine)
ANSWER_LAG = 0.05  # the runner counts an answer up to this long after the engine does


def shared_over_time(user_rate: float, users_until: float, seconds: float, seed: int) -> list[tuple[float, bool]]:
    """Feed a Presence the readings of an engine that runs one batch sequence and users' short requests arriving as
    a Poisson stream until `users_until`; returns (time, shared) per reading."""
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
        completed = sum(u + USER_REQUEST <= now for u in users) + sum(b <= now for b in batch)
        answered = sum(b + rng.uniform(0, ANSWER_LAG) <= now for b in batch)
        running = 1 + sum(u <= now < u + USER_REQUEST for u in users)
        presence.observe(now, EngineReading(running=running, waiting=0, completed=completed), [], 1, answered)
        out.append((now, presence.shared(now)))
        now += READING
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sparse_users_are_seen_between_their_requests(seed):
    """At 1.1 requests a second (llama.cpp's 20% load in the real-engine benchmark), a window of 3 s showed nobody a
    fifth of the time, and each time the batch filled the engine under the next user's request."""
    readings = shared_over_time(1.1, users_until=600, seconds=600, seed=seed)
    seen = [shared for t, shared in readings if t > 10]
    assert sum(seen) / len(seen) >= 0.95


@pytest.mark.parametrize(("user_rate", "within"), [(13.0, 10.0), (1.1, 15.0), (0.3, 25.0)])
def test_users_are_let_go_soon_after_they_leave(user_rate, within):
    """The window spans a few of their requests at their rate, so sparse users are let go later than busy ones, but
    never after the users' last requests have all left the window's longest span."""
    for seed in (1, 2, 3):
        readings = shared_over_time(user_rate, users_until=60, seconds=120, seed=seed)
        assert any(shared for t, shared in readings if 30 < t < 60)
        back = next(t for t, shared in readings if t > 60 and not shared)
        assert back - 60 <= within, (seed, back)
        assert not any(shared for t, shared in readings if t > back)


def test_the_batch_alone_is_never_taken_for_users():
    readings = shared_over_time(0.0, users_until=0, seconds=600, seed=4)
    assert not any(shared for _, shared in readings)
