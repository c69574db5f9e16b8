"""An asyncio gate whose capacity follows a controller's limit, read on every acquire and release.

When the limit shrinks below what is in flight, nothing is cancelled: new acquires wait until enough permits come
back (inflight < limit). When it grows, call `poke()` (or any acquire/release will do it) to let waiters in.
Waiters are served first come, first served; a newcomer never overtakes a waiter.

Contract for callers: **never hold a permit while sleeping.** Release it as soon as the upstream has answered, and
acquire a new one after a retry's backoff. Otherwise a backing-off request keeps a slot from the engine, and the
controller's limit no longer equals the load the engine sees.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Protocol


class HasLimit(Protocol):
    @property
    def limit(self) -> int: ...


class Permit:
    """One slot. `release()` is idempotent; also usable as `async with await limiter.acquire():`."""

    __slots__ = ("_limiter", "_released")

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self._limiter = limiter
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AdaptiveLimiter:
    def __init__(self, controller: HasLimit) -> None:
        self.controller = controller
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> Permit:
        self._wake()  # the limit may have grown since the last release
        if not self._waiters and self.inflight < self.controller.limit:
            self.inflight += 1
            return Permit(self)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot was granted just as we were cancelled: hand it on
            else:
                with contextlib.suppress(ValueError):  # already dropped by _wake
                    self._waiters.remove(waiter)
            raise
        return Permit(self)

    def slot(self) -> _Slot:
        """`async with limiter.slot():` — acquire, and release on exit."""
        return _Slot(self)

    def poke(self) -> None:
        """Let waiters in after the limit grew."""
        self._wake()

    def _release(self) -> None:
        self.inflight -= 1
        self._wake()

    def _wake(self) -> None:
        limit = self.controller.limit
        while self._waiters and self.inflight < limit:
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter gives its turn away
                self.inflight += 1
                waiter.set_result(None)


class _Slot:
    __slots__ = ("_limiter", "_permit")

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self._limiter = limiter
        self._permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        self._permit = await self._limiter.acquire()
        return self._permit

    async def __aexit__(self, *exc: object) -> None:
        if self._permit is not None:
            self._permit.release()
