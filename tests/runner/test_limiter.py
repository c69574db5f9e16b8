"""The adaptive limiter: capacity follows the controller's limit, FIFO wake-ups, and no slot leaks on cancellation."""

from __future__ import annotations

import asyncio
import random

from batch_gateway.runner.controller import ConcurrencyController
from batch_gateway.runner.limiter import AdaptiveLimiter


class Limit:
    """A limit the test moves by hand (the limiter only reads `.limit`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class CheckedLimiter(AdaptiveLimiter):
    """Checks every grant: in flight after it must not exceed the limit read at that moment."""

    violations: list[tuple[int, int]]

    @property
    def inflight(self) -> int:
        return self._count

    @inflight.setter
    def inflight(self, value: int) -> None:
        if value > getattr(self, "_count", 0) and value > self.controller.limit:
            self.violations.append((value, self.controller.limit))
        self._count = value


async def test_never_more_than_the_limit_in_flight_while_it_moves():
    limit = Limit(4)
    limiter = CheckedLimiter(limit)
    limiter.violations = []
    rng = random.Random(7)
    peak = 0

    async def worker() -> None:
        nonlocal peak
        for _ in range(25):
            async with await limiter.acquire():
                peak = max(peak, limiter.inflight)
                await asyncio.sleep(rng.uniform(0, 0.002))

    async def mover() -> None:
        for _ in range(80):
            limit.limit = rng.randint(1, 8)
            limiter.poke()
            await asyncio.sleep(0.001)

    await asyncio.gather(*(worker() for _ in range(16)), mover())
    assert limiter.violations == []
    assert limiter.inflight == 0 and limiter.waiting == 0
    assert peak > 4  # the limit did move up and was used


async def test_shrinking_below_inflight_revokes_nothing_and_new_grants_wait():
    limit = Limit(3)
    limiter = AdaptiveLimiter(limit)
    permits = [await limiter.acquire() for _ in range(3)]
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(5)]
    await settle()
    assert limiter.inflight == 3 and not any(w.done() for w in waiters)
    limit.limit = 1  # shrink below what is in flight: nothing is revoked, new grants wait
    permits.pop().release()
    permits.pop().release()
    await settle()
    assert limiter.inflight == 1 and not any(w.done() for w in waiters)
    permits.pop().release()
    await settle()
    assert limiter.inflight == 1 and sum(w.done() for w in waiters) == 1
    limit.limit = 5  # grow: poke lets the rest in
    limiter.poke()
    await settle()
    assert limiter.inflight == 5 and all(w.done() for w in waiters)
    for w in waiters:
        w.result().release()
    assert limiter.inflight == 0


async def test_acquire_notices_a_grown_limit_without_a_poke():
    limit = Limit(1)
    limiter = AdaptiveLimiter(limit)
    first = await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    assert not waiter.done()
    limit.limit = 3
    third = await limiter.acquire()  # reads the new limit, and lets the older waiter in first
    await settle()
    assert waiter.done() and limiter.inflight == 3
    for permit in (first, third, waiter.result()):
        permit.release()
    assert limiter.inflight == 0


async def test_waiters_are_served_in_arrival_order():
    limiter = AdaptiveLimiter(Limit(1))
    holder = await limiter.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        async with limiter.slot():
            order.append(i)
            await asyncio.sleep(0)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(take(i)))
        await asyncio.sleep(0)
    holder.release()
    await asyncio.gather(*tasks)
    assert order == list(range(6))


async def test_cancelled_waiter_leaks_no_slot():
    limit = Limit(2)
    limiter = AdaptiveLimiter(limit)
    a, b = await limiter.acquire(), await limiter.acquire()
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
    await settle()
    waiters[0].cancel()
    await settle()
    assert waiters[0].cancelled() and limiter.inflight == 2 and limiter.waiting == 2
    a.release()
    await settle()
    assert waiters[1].done() and not waiters[2].done() and limiter.inflight == 2
    b.release()
    waiters[1].result().release()
    await settle()
    waiters[2].result().release()
    assert limiter.inflight == 0 and limiter.waiting == 0


async def test_cancelled_waiter_already_skipped_by_a_release_does_not_crash():
    limiter = AdaptiveLimiter(Limit(1))
    holder = await limiter.acquire()
    waiter = asyncio.create_task(limiter.acquire())
    await settle()
    waiter.cancel()  # cancels the future at once; the task learns it on its next step...
    holder.release()  # ...and this release drops the cancelled future from the queue first
    await settle()
    assert waiter.cancelled()
    assert limiter.inflight == 0
    again = await limiter.acquire()
    again.release()


async def test_grant_racing_a_cancellation_hands_the_slot_on():
    limiter = AdaptiveLimiter(Limit(1))
    holder = await limiter.acquire()
    first = asyncio.create_task(limiter.acquire())
    second = asyncio.create_task(limiter.acquire())
    await settle()
    holder.release()  # grants the slot to `first`...
    first.cancel()  # ...which is cancelled before it could run
    await settle()
    assert first.cancelled()
    assert second.done() and limiter.inflight == 1  # the slot went on to the next waiter, not lost
    second.result().release()
    assert limiter.inflight == 0


async def test_release_is_idempotent_and_works_with_a_real_controller():
    controller = ConcurrencyController(fixed=2)
    limiter = AdaptiveLimiter(controller)
    permit = await limiter.acquire()
    permit.release()
    permit.release()
    assert limiter.inflight == 0 and permit.released
    async with limiter.slot(), limiter.slot():
        assert limiter.inflight == 2
        blocked = asyncio.create_task(limiter.acquire())
        await settle()
        assert not blocked.done()
    await settle()
    assert blocked.done()
    blocked.result().release()
    assert limiter.inflight == 0
