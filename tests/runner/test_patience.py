"""Storage outages are waited out with backoff; only an outage longer than the patience gives up."""

from __future__ import annotations

import pytest
import structlog

from batch_gateway.errors import DiskFull, StorageUnavailable
from batch_gateway.runner.patience import StorageGaveUp, WaitInterrupted, with_patience

log = structlog.get_logger("test")


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
    assert await with_patience("write", operation, log=log, patience=30) == "done"
    assert calls() == 4


async def test_an_outage_longer_than_the_patience_gives_up():
    operation, calls = failing(1000)
    with pytest.raises(StorageGaveUp):
        await with_patience("write", operation, log=log, patience=1.0)
    assert 2 <= calls() < 10


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
