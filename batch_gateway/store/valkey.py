"""Live signals on Valkey (or Redis): progress in one key per batch, cancels as a key plus a pub/sub message.

Valkey only makes things faster; the database stays the source of truth. So no call here ever raises: on an outage
the instance logs a warning (at most once a minute), reports `state = "down"`, skips Valkey entirely (no call waits
on a dead server), and a background probe flips it back to "ok" when Valkey answers again. Every call is bounded by a
short timeout for the same reason.

Cancels are cheap to check: the first `cancel_requested(batch_id)` starts a subscription to the cancel channel, and
from then on the answer is a lookup in a local set. The cancel key covers what the subscription cannot see: cancels
sent before it was up or while it was reconnecting (it re-reads the keys of every watched batch each time it
(re)subscribes) and the time before it is up (each call reads the key).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TypeVar

import msgspec
import structlog
import valkey.asyncio
from valkey.exceptions import ValkeyError

from batch_gateway import wire
from batch_gateway.store.signals import Signals

log = structlog.get_logger("signals")

T = TypeVar("T")

SOCKET_TIMEOUT = 0.5  # an outage must never stall a runner's watch loop for long
PROGRESS_TTL = 24 * 3600  # live progress of a batch whose runner died disappears on its own
CANCEL_TTL = 24 * 3600
PROBE_INTERVAL = 1.0  # how often a "down" instance checks whether Valkey is back
HEARTBEAT_INTERVAL = 2.0  # pings on the subscription, so a silently dead connection is noticed
WARN_INTERVAL = 60.0  # while down, repeat the warning at most this often

# Everything an unreachable, restarting or overloaded server can raise: valkey's ConnectionError and TimeoutError
# are ValkeyErrors; socket errors and asyncio timeouts are OSErrors.
OUTAGE_ERRORS = (ValkeyError, OSError)


class Keys:
    """Every key and channel name, all under one prefix (so deployments and test runs never collide)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.cancel_channel = f"{prefix}cancels"

    def progress(self, batch_id: str) -> str:
        return f"{self.prefix}progress:{batch_id}"

    def cancel(self, batch_id: str) -> str:
        return f"{self.prefix}cancel:{batch_id}"


class Progress(msgspec.Struct):
    counts: wire.RequestCounts
    usage: wire.Usage | None = None


_decode_progress = msgspec.json.Decoder(Progress).decode


class ValkeySignals(Signals):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "bg:",
        progress_ttl: int = PROGRESS_TTL,
        cancel_ttl: int = CANCEL_TTL,
        socket_timeout: float = SOCKET_TIMEOUT,
    ) -> None:
        self.keys = Keys(prefix)
        self.progress_ttl = progress_ttl
        self.cancel_ttl = cancel_ttl
        self.socket_timeout = socket_timeout
        # Raises ValueError for a URL that is not redis://, rediss://, valkey://, valkeys:// or unix://.
        # No client-side socket_timeout: valkey enforces it with asyncio.wait_for, which on Python 3.11 can swallow
        # a task's cancellation; every call here is bounded by asyncio.timeout (`_bounded`) instead.
        self._client = valkey.asyncio.from_url(url, socket_timeout=None, socket_connect_timeout=socket_timeout)
        self.state = "down"  # until open() has reached the server
        self._warned_at = -math.inf  # when the last outage warning was logged (-inf: none in this outage)
        self._failures = 0  # failures in the current outage
        self._probe: asyncio.Task | None = None
        self._listener: asyncio.Task | None = None
        self._listening = False  # subscribed, and the cancel keys of watched batches read since
        self._watched: set[str] = set()  # batches cancel_requested was asked about
        self._cancelled: set[str] = set()
        self._closed = False

    # --- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Reach the server once; if it is down, say so and keep probing in the background (never raises)."""
        try:
            await self._bounded(self._client.ping())
        except OUTAGE_ERRORS as exc:
            self._mark_down("open", exc)
        else:
            self._mark_ok()

    async def close(self) -> None:
        self._closed = True
        for task in (self._listener, self._probe):
            # Cancel until done: a cancellation can still be lost inside the client's I/O on Python 3.11.
            while task is not None and not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
        self._listener = self._probe = None
        self._listening = False
        with contextlib.suppress(*OUTAGE_ERRORS):
            await self._client.aclose()

    # --- progress ------------------------------------------------------------------------------

    async def publish_progress(self, batch_id: str, counts: wire.RequestCounts, usage: wire.Usage | None) -> None:
        payload = msgspec.json.encode(Progress(counts=counts, usage=usage))
        await self._run(
            "publish_progress", lambda: self._client.set(self.keys.progress(batch_id), payload, ex=self.progress_ttl)
        )

    async def read_progress(
        self, batch_ids: Collection[str]
    ) -> dict[str, tuple[wire.RequestCounts, wire.Usage | None]]:
        ids = list(batch_ids)
        if not ids:
            return {}
        values = await self._run("read_progress", lambda: self._client.mget([self.keys.progress(i) for i in ids]))
        found: dict[str, tuple[wire.RequestCounts, wire.Usage | None]] = {}
        for batch_id, value in zip(ids, values or (), strict=False):
            if value is None:
                continue
            try:
                progress = _decode_progress(value)
            except msgspec.DecodeError as exc:
                log.warning("signals.bad_progress_value", batch_id=batch_id, error=str(exc))
                continue
            found[batch_id] = (progress.counts, progress.usage)
        return found

    # --- cancel --------------------------------------------------------------------------------

    async def request_cancel(self, batch_id: str) -> None:
        self._cancelled.add(batch_id)

        async def set_and_publish() -> None:
            # One round trip, in this order: a subscriber that misses the message finds the key.
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(self.keys.cancel(batch_id), b"1", ex=self.cancel_ttl)
                pipe.publish(self.keys.cancel_channel, batch_id)
                await pipe.execute()

        await self._run("request_cancel", set_and_publish)

    async def cancel_requested(self, batch_id: str) -> bool:
        if batch_id in self._cancelled:
            return True
        if not self._closed and (self._listener is None or self._listener.done()):
            self._listener = asyncio.create_task(self._listen(), name="valkey-cancel-listener")
        first_ask = batch_id not in self._watched
        self._watched.add(batch_id)  # before any await: a (re)subscription from now on re-reads this batch's key
        if self._listening and not first_ask:
            return False
        if await self._run("cancel_requested", lambda: self._client.exists(self.keys.cancel(batch_id))):
            self._cancelled.add(batch_id)
            return True
        return False

    async def _listen(self) -> None:
        """Keep a subscription to the cancel channel up, for the life of this instance."""
        delay = 0.1
        while not self._closed:
            pubsub = self._client.pubsub()
            try:
                await self._subscribe(pubsub)
                self._mark_ok()
                delay = 0.1
                await self._receive(pubsub)
            except OUTAGE_ERRORS as exc:
                self._mark_down("cancel_subscription", exc)
            finally:
                self._listening = False
                with contextlib.suppress(*OUTAGE_ERRORS):
                    await pubsub.aclose()
            await asyncio.sleep(delay)  # only reached after a failure: _receive runs until one
            delay = min(delay * 2, PROBE_INTERVAL)

    async def _subscribe(self, pubsub: valkey.asyncio.client.PubSub) -> None:
        await self._bounded(pubsub.subscribe(self.keys.cancel_channel))
        # Wait for the confirmation: from then on every cancel published reaches us...
        deadline = time.monotonic() + self.socket_timeout * 4
        while True:
            message = await pubsub.get_message(timeout=self.socket_timeout)
            if message is not None and message["type"] == "subscribe":
                break
            if time.monotonic() > deadline:
                raise TimeoutError("no confirmation of the cancel-channel subscription")
        # ...and every earlier cancel left its key.
        watched = list(self._watched)
        if watched:
            flags = await self._bounded(self._client.mget([self.keys.cancel(i) for i in watched]))
            self._cancelled.update(batch_id for batch_id, flag in zip(watched, flags, strict=True) if flag is not None)
        self._listening = True

    async def _receive(self, pubsub: valkey.asyncio.client.PubSub) -> None:
        last_heard = last_ping = time.monotonic()
        while not self._closed:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=HEARTBEAT_INTERVAL / 2)
            now = time.monotonic()
            if message is not None:
                last_heard = now
                if message["type"] == "message":
                    batch_id = message["data"].decode(errors="replace")
                    if batch_id in self._watched:
                        self._cancelled.add(batch_id)
            if now - last_ping >= HEARTBEAT_INTERVAL:
                await self._bounded(pubsub.ping())
                last_ping = now
            if now - last_heard > 2 * HEARTBEAT_INTERVAL:
                raise TimeoutError("cancel subscription silent: no answer to pings")

    # --- outage handling -----------------------------------------------------------------------

    async def _run(self, operation: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """One Valkey call; None when Valkey is down (skipped without I/O until the probe sees it back)."""
        if self.state == "down" or self._closed:
            self._ensure_probe()
            return None
        try:
            return await self._bounded(call())
        except OUTAGE_ERRORS as exc:
            self._mark_down(operation, exc)
            return None

    async def _bounded(self, call: Awaitable[T]) -> T:
        """Await a Valkey call for at most socket_timeout (a TimeoutError, an OSError, past that)."""
        async with asyncio.timeout(self.socket_timeout):
            return await call

    def _mark_down(self, operation: str, exc: BaseException) -> None:
        self.state = "down"
        self._failures += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_INTERVAL:
            log.warning(
                "signals.valkey_down",
                operation=operation,
                error=str(exc) or type(exc).__name__,
                failures=self._failures,
            )
            self._warned_at = now
        self._ensure_probe()

    def _mark_ok(self) -> None:
        if self.state != "ok" and self._failures:
            log.info("signals.valkey_recovered", failures=self._failures)
        self.state = "ok"
        self._failures = 0
        self._warned_at = -math.inf

    def _ensure_probe(self) -> None:
        if not self._closed and (self._probe is None or self._probe.done()):
            self._probe = asyncio.create_task(self._probe_until_up(), name="valkey-probe")

    async def _probe_until_up(self) -> None:
        while self.state == "down" and not self._closed:
            await asyncio.sleep(PROBE_INTERVAL)
            try:
                await self._bounded(self._client.ping())
            except OUTAGE_ERRORS as exc:
                self._mark_down("probe", exc)
            else:
                self._mark_ok()
