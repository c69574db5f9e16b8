"""Storage outages are waited out with backoff; only an outage longer than the patience gives up."""

from __future__ import annotations

import pytest
import structlog

from batch_gateway.errors import DiskFull, StorageUnavailable
from batch_gateway.runner.patience import StorageGaveUp, WaitInterrupted, with_patience

log = structlog.get_logger("test")


class FakeTime:
    """A clock that moves only when the code under test sleeps, so backoff costs no real time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def failing(times: int, error: type[Exception] = StorageUnavailable):
    calls = 0

    async def operation() -> str:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise error("down")
        return "done"

    return operation, lambda: calls


async def test_an_outage_shorter_than_the_patience_is_ridden_out():
    operation, calls = failing(3, DiskFull)
    time = FakeTime()
    assert await with_patience("write", operation, log=log, patience=30, clock=time.clock, sleep=time.sleep) == "done"
    assert calls() == 4
    # Backoff: 0.5 s, 1 s, 2 s, each with up to half taken off at random.
    assert len(time.slept) == 3 and 0.25 <= time.slept[0] <= 0.5 and time.slept == sorted(time.slept)


async def test_an_outage_longer_than_the_patience_gives_up():
    operation, calls = failing(1000)
    time = FakeTime()
    with pytest.raises(StorageGaveUp):
        await with_patience("write", operation, log=log, patience=60, clock=time.clock, sleep=time.sleep)
    assert time.now == pytest.approx(60)  # the last wait is cut to the patience left
    assert 6 <= calls() < 20 and max(time.slept) <= 15  # the backoff is capped


async def test_other_errors_are_not_retried():
    operation, calls = failing(5, ValueError)
    with pytest.raises(ValueError):
        await with_patience("write", operation, log=log, patience=30)
    assert calls() == 1


async def test_a_shutdown_stops_the_waiting():
    operation, calls = failing(1000)
    with pytest.raises(WaitInterrupted):
        await with_patience("write", operation, log=log, patience=30, interrupted=lambda: True)
    assert calls() == 1
