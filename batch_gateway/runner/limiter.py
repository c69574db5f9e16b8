"""An asyncio gate whose capacity follows a controller's limit, read on every acquire and release.

When the limit shrinks below what is in flight, nothing is cancelled: new acquires simply wait until enough permits
come back. Waiters are served first come, first served.

Contract for callers: release the permit as soon as the upstream has answered, and take a new one after a retry's
backoff — never sleep while holding a permit, or a backing-off request would keep a slot from the engine.
"""

from __future__ import annotations

import asyncio
from collections import deque

from batch_gateway.runner.controller import ConcurrencyController


class Permit:
    __slots__ = ("_limiter", "_released")

    def __init__(self, limiter: AdaptiveLimiter) -> None:
        self._limiter = limiter
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release()

    async def __aenter__(self) -> Permit:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AdaptiveLimiter:
    def __init__(self, controller: ConcurrencyController) -> None:
        self.controller = controller
        self.inflight = 0
        self._waiters: deque[asyncio.Future] = deque()

    async def acquire(self) -> Permit:
        if not self._waiters and self.inflight < self.controller.limit:
            self.inflight += 1
            return Permit(self)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # granted just as we were cancelled: hand the slot on
            else:
                self._waiters.remove(waiter)
            raise
        return Permit(self)

    def _release(self) -> None:
        self.inflight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.inflight < self.controller.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.inflight += 1
                waiter.set_result(None)

    def poke(self) -> None:
        """Let waiters in after the limit grew."""
        self._wake()
