"""PostgreSQL outages: killed sessions (a restart or failover), a database that refuses connections for a while,
and a server that is not there. The store must answer StorageUnavailable while it lasts and recover by itself."""

from __future__ import annotations

import asyncio
import time

import pytest

from batch_gateway.errors import StorageUnavailable
from batch_gateway.store.postgres import PostgresStore
from tests.fixtures.postgres import allow_connections, postgres_url, terminate_connections  # noqa: F401
from tests.helpers import eventually_async, free_port
from tests.store.test_metadata_store import batch_record

pytestmark = pytest.mark.production


async def answers(store: PostgresStore) -> bool:
    try:
        await store.ping()
    except StorageUnavailable:
        return False
    return True


async def test_killed_sessions_are_replaced_without_failing_a_call(postgres_url: str):  # noqa: F811
    store = PostgresStore(postgres_url, min_size=2, max_size=4)
    await store.open()
    try:
        batch, _ = await store.insert_batch(batch_record())
        assert terminate_connections(postgres_url) >= 2
        # Every pooled connection is dead now; the pool's check on checkout replaces them, so a burst of calls
        # right after a restart all succeed (the first ones wait about a second for a fresh connection).
        found = await asyncio.gather(*(store.get_batch(batch.id, None) for _ in range(6)))
        assert {b.id for b in found} == {batch.id}
        assert await store.claim_batch(batch.id, "runner", 100, 30)
    finally:
        await store.close()


async def test_outage_gives_storage_unavailable_then_recovers(postgres_url: str):  # noqa: F811
    store = PostgresStore(postgres_url, timeout=0.5, reconnect_timeout=3.0)
    await store.open()
    batch, _ = await store.insert_batch(batch_record())
    allow_connections(postgres_url, False)
    try:
        terminate_connections(postgres_url)
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await store.get_batch(batch.id, None)
        with pytest.raises(StorageUnavailable):
            await store.ping()
        assert time.monotonic() - started < 5, "an outage must be reported promptly, not hang"
    finally:
        allow_connections(postgres_url, True)
    try:
        await eventually_async(lambda: answers(store), timeout=15, interval=0.1, what="the database to answer")
        assert (await store.get_batch(batch.id, None)).id == batch.id
    finally:
        await store.close()


async def test_no_server_fails_open_promptly():
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        await store.open()
    assert time.monotonic() - started < 5
    with pytest.raises(RuntimeError, match="not open"):
        await store.ping()
    await store.close()


async def test_a_closed_store_refuses_calls(postgres_url: str):  # noqa: F811
    store = PostgresStore(postgres_url)
    await store.open()
    await store.close()
    with pytest.raises(RuntimeError, match="not open"):
        await store.get_batch("batch_x", None)
