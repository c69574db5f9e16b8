"""Metadata store fixtures: every behaviour test runs against SQLite (a file in tmp_path) and PostgreSQL.

PostgreSQL behaviour tests share one migrated database per session, emptied before each test (TRUNCATE takes
milliseconds, CREATE DATABASE a few hundred); migration tests get an empty database of their own (`empty_database`).
`open_store()` opens further stores on the same database, so race tests have several connections, as the API and
its runner processes do.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from batch_gateway.store.metadata import MetadataStore
from batch_gateway.store.postgres import PostgresStore
from batch_gateway.store.sqlite import SqliteStore
from tests.fixtures.postgres import MAINTENANCE_URL, postgres_available, postgres_url, test_database  # noqa: F401

OpenStore = Callable[..., Awaitable[MetadataStore]]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.production)])
def metadata_backend(request: pytest.FixtureRequest) -> str:
    return request.param


def new_store(backend: str, location: str, **options) -> MetadataStore:
    """A store that is not opened yet (tests of open() and migrations want that)."""
    return SqliteStore(location, **options) if backend == "sqlite" else PostgresStore(location, **options)


@pytest.fixture
def empty_database(metadata_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The SQLite path or PostgreSQL URL of a database nobody has touched."""
    if metadata_backend == "sqlite":
        return str(tmp_path / "metadata.sqlite3")
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def shared_postgres_url() -> Iterator[str]:
    if not postgres_available():
        pytest.skip(f"no PostgreSQL at {MAINTENANCE_URL}")
    with test_database() as url:
        store = PostgresStore(url)

        async def migrate() -> None:
            await store.open()
            await store.close()

        asyncio.run(migrate())
        yield url


@pytest.fixture
def store_location(metadata_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """Where this test's store lives: a fresh SQLite file, or the shared PostgreSQL database with no rows left."""
    if metadata_backend == "sqlite":
        return str(tmp_path / "metadata.sqlite3")
    url = request.getfixturevalue("shared_postgres_url")
    with psycopg.connect(url, autocommit=True) as connection:
        tables = [
            row[0]
            for row in connection.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
            )
        ]
        connection.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY")
    return url


@pytest.fixture
async def open_store(metadata_backend: str, store_location: str) -> AsyncIterator[OpenStore]:
    """Opens stores on this test's database; all are closed after the test."""
    opened: list[MetadataStore] = []

    async def open_(**options) -> MetadataStore:
        store = new_store(metadata_backend, store_location, **options)
        await store.open()
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> MetadataStore:
    return await open_store()
