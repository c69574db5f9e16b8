"""ValkeySignals against real Redis servers: the shared one on 6379 (a unique key prefix per test) and private
redis-server processes that are killed and restarted to check that an outage never reaches the caller."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import valkey.asyncio
from structlog.testing import capture_logs

from batch_gateway import wire
from batch_gateway.store.valkey import Keys, ValkeySignals
from tests.fixtures.redis import SHARED_URL, RedisServer, key_prefix, private_redis  # noqa: F401  (fixtures)
from tests.helpers import eventually_async, free_port

pytestmark = pytest.mark.production

Open = Callable[..., Awaitable[ValkeySignals]]


@pytest.fixture
async def open_signals(key_prefix: str) -> AsyncIterator[Open]:  # noqa: F811
    """Opens ValkeySignals instances (on the shared server unless told otherwise) and closes them after the test."""
    opened: list[ValkeySignals] = []

    async def open_(url: str = SHARED_URL, **options) -> ValkeySignals:
        signals = ValkeySignals(url, prefix=key_prefix, **options)
        opened.append(signals)
        await signals.open()
        return signals

    yield open_
    for signals in opened:
        await signals.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("valkey-")], "background tasks left running"


@pytest.fixture
async def raw(key_prefix: str) -> AsyncIterator[valkey.asyncio.Valkey]:  # noqa: F811
    """A plain client on the shared server, to look behind ValkeySignals' back; removes the test's keys after."""
    client = valkey.asyncio.from_url(SHARED_URL)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{key_prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def subscribed(raw: valkey.asyncio.Valkey, channel: str) -> bool:
    return dict(await raw.pubsub_numsub(channel)).get(channel.encode(), 0) > 0


def usage(tokens: int) -> wire.Usage:
    return wire.Usage(
        input_tokens=tokens,
        input_tokens_details=wire.InputTokensDetails(cached_tokens=1),
        output_tokens=2,
        output_tokens_details=wire.OutputTokensDetails(reasoning_tokens=1),
        total_tokens=tokens + 2,
    )


# --- progress ------------------------------------------------------------------------------------


async def test_progress_round_trip_between_instances(open_signals: Open):
    runner, api = await open_signals(), await open_signals()
    assert runner.state == api.state == "ok"

    await runner.publish_progress("batch_a", wire.RequestCounts(total=10, completed=3, failed=1), usage(7))
    await runner.publish_progress("batch_b", wire.RequestCounts(total=5), None)
    await runner.publish_progress("batch_a", wire.RequestCounts(total=10, completed=4, failed=1), usage(9))

    progress = await api.read_progress(["batch_a", "batch_b", "batch_never"])
    assert progress == {
        "batch_a": (wire.RequestCounts(total=10, completed=4, failed=1), usage(9)),
        "batch_b": (wire.RequestCounts(total=5), None),
    }
    assert await api.read_progress([]) == {}


async def test_keys_carry_the_prefix_and_a_ttl(open_signals: Open, raw, key_prefix: str):  # noqa: F811
    signals = await open_signals(progress_ttl=300, cancel_ttl=600)
    await signals.publish_progress("batch_a", wire.RequestCounts(total=1), None)
    await signals.request_cancel("batch_b")

    keys = Keys(key_prefix)
    assert sorted([key async for key in raw.scan_iter(match=f"{key_prefix}*")]) == sorted(
        [keys.cancel("batch_b").encode(), keys.progress("batch_a").encode()]
    )
    assert 290 < await raw.ttl(keys.progress("batch_a")) <= 300
    assert 590 < await raw.ttl(keys.cancel("batch_b")) <= 600


async def test_default_ttls_are_about_a_day(open_signals: Open, raw, key_prefix: str):  # noqa: F811
    signals = await open_signals()
    await signals.publish_progress("batch_a", wire.RequestCounts(total=1), None)
    await signals.request_cancel("batch_a")
    keys = Keys(key_prefix)
    for key in (keys.progress("batch_a"), keys.cancel("batch_a")):
        assert 23 * 3600 < await raw.ttl(key) <= 24 * 3600


async def test_unreadable_progress_is_skipped(open_signals: Open, raw, key_prefix: str):  # noqa: F811
    signals = await open_signals()
    await raw.set(Keys(key_prefix).progress("batch_bad"), b"not json")
    await signals.publish_progress("batch_ok", wire.RequestCounts(total=2), None)
    assert set(await signals.read_progress(["batch_bad", "batch_ok"])) == {"batch_ok"}


# --- cancel --------------------------------------------------------------------------------------


async def test_cancel_reaches_a_watching_runner_fast(open_signals: Open, raw, key_prefix: str):  # noqa: F811
    runner, api = await open_signals(), await open_signals()
    assert await runner.cancel_requested("batch_a") is False
    assert await runner.cancel_requested("batch_other") is False
    await eventually_async(lambda: subscribed(raw, Keys(key_prefix).cancel_channel), timeout=2)

    await api.request_cancel("batch_a")
    await eventually_async(lambda: runner.cancel_requested("batch_a"), timeout=0.5, what="the cancel, within 0.5 s")
    assert await runner.cancel_requested("batch_other") is False


async def test_subscribed_runner_hears_the_channel_alone(open_signals: Open, raw, key_prefix: str):  # noqa: F811
    """Once subscribed, the answer comes from the pub/sub message (no key read per call)."""
    runner = await open_signals()
    keys = Keys(key_prefix)
    assert await runner.cancel_requested("batch_a") is False
    await eventually_async(lambda: subscribed(raw, keys.cancel_channel), timeout=2)
    await asyncio.sleep(0.05)  # let the listener finish its catch-up read

    await raw.publish(keys.cancel_channel, "batch_a")  # a message without a key
    await eventually_async(lambda: runner.cancel_requested("batch_a"), timeout=0.5)

    await raw.set(keys.cancel("batch_b"), b"1")  # a key without a message, for a batch already watched...
    assert await runner.cancel_requested("batch_b") is True  # ...is read on the first ask


async def test_cancel_sent_before_the_runner_looks(open_signals: Open):
    api = await open_signals()
    await api.request_cancel("batch_a")
    runner = await open_signals()
    assert await runner.cancel_requested("batch_a") is True
    assert await runner.cancel_requested("batch_b") is False


async def test_cancel_requested_is_cheap_once_subscribed(open_signals: Open, private_redis: RedisServer):  # noqa: F811
    runner = await open_signals(private_redis.url)  # a private server: its command counts are ours alone
    await runner.cancel_requested("batch_a")
    await eventually_async(lambda: _listening(runner), timeout=2)
    commands = valkey.asyncio.from_url(private_redis.url)
    try:
        before = await commands.info("commandstats")
        started = time.monotonic()
        for _ in range(1000):
            assert await runner.cancel_requested("batch_a") is False
        assert time.monotonic() - started < 0.2
        after = await commands.info("commandstats")
    finally:
        await commands.aclose()
    for command in ("cmdstat_exists", "cmdstat_get", "cmdstat_mget"):
        assert after.get(command, {}).get("calls", 0) == before.get(command, {}).get("calls", 0), command


# --- outages -------------------------------------------------------------------------------------


async def test_nothing_raises_while_valkey_is_unreachable_and_it_recovers(open_signals: Open):
    port = free_port()
    with capture_logs() as logs:
        signals = await open_signals(f"redis://127.0.0.1:{port}/0")  # nothing listens there yet
        assert signals.state == "down"

        started = time.monotonic()
        for _ in range(50):
            await signals.publish_progress("batch_a", wire.RequestCounts(total=1), None)
            assert await signals.read_progress(["batch_a"]) == {}
            assert await signals.cancel_requested("batch_a") is False
            await signals.request_cancel("batch_b")
        assert time.monotonic() - started < 1.0
        assert await signals.cancel_requested("batch_b") is True  # this process asked for it
        assert [log["event"] for log in logs if log["log_level"] == "warning"] == ["signals.valkey_down"]

        server = RedisServer(port=port).start()
        try:
            await eventually_async(lambda: _state_is(signals, "ok"), timeout=3)
            await signals.publish_progress("batch_a", wire.RequestCounts(total=3), None)
            assert (await signals.read_progress(["batch_a"]))["batch_a"][0] == wire.RequestCounts(total=3)
        finally:
            server.kill()
    assert "signals.valkey_recovered" in [log["event"] for log in logs]


async def test_valkey_killed_and_restarted_mid_batch(open_signals: Open, private_redis: RedisServer):  # noqa: F811
    runner, api = await open_signals(private_redis.url), await open_signals(private_redis.url)
    await runner.publish_progress("batch_a", wire.RequestCounts(total=10, completed=1), None)
    assert await runner.cancel_requested("batch_a") is False
    await eventually_async(lambda: _listening(runner), timeout=2)

    private_redis.kill()
    await runner.publish_progress("batch_a", wire.RequestCounts(total=10, completed=2), None)
    assert await api.read_progress(["batch_a"]) == {}
    await eventually_async(lambda: _state_is(runner, "down"), timeout=1)
    assert api.state == "down"
    started = time.monotonic()
    for _ in range(20):  # a runner's watch loop keeps its pace while Valkey is gone
        await runner.publish_progress("batch_a", wire.RequestCounts(total=10, completed=3), None)
        assert await runner.cancel_requested("batch_a") is False
    assert time.monotonic() - started < 0.5

    private_redis.start()  # same port, empty data set
    await eventually_async(lambda: _state_is(runner, "ok"), timeout=3)
    await eventually_async(lambda: _state_is(api, "ok"), timeout=3)
    await eventually_async(lambda: _listening(runner), timeout=3)
    await runner.publish_progress("batch_a", wire.RequestCounts(total=10, completed=4), None)
    assert (await api.read_progress(["batch_a"]))["batch_a"][0].completed == 4

    await api.request_cancel("batch_a")
    await eventually_async(lambda: runner.cancel_requested("batch_a"), timeout=0.5)


async def test_cancel_sent_while_the_runner_reconnects(open_signals: Open, private_redis: RedisServer):  # noqa: F811
    """The key covers a cancel whose message went out before the runner's subscription came back."""
    runner = await open_signals(private_redis.url)
    assert await runner.cancel_requested("batch_a") is False
    await eventually_async(lambda: _listening(runner), timeout=2)

    private_redis.kill()
    await eventually_async(lambda: _state_is(runner, "down"), timeout=1)
    private_redis.start()
    api = await open_signals(private_redis.url)
    await api.request_cancel("batch_a")  # most likely before the runner has resubscribed
    await eventually_async(lambda: runner.cancel_requested("batch_a"), timeout=3)


def test_bad_url_is_a_clear_error():
    with pytest.raises(ValueError, match="scheme"):
        ValkeySignals("http://127.0.0.1:6379")


async def _state_is(signals: ValkeySignals, state: str) -> bool:
    return signals.state == state


async def _listening(signals: ValkeySignals) -> bool:
    return signals._listening
