"""Schema migrations on both backends: upgrade with data in place, idempotence, concurrent start-up, atomic
failure, and the two dialects describing the same schema."""

from __future__ import annotations

import asyncio
import sqlite3

import psycopg
import pytest
import structlog

from batch_gateway.store import migrations as migrations_module
from batch_gateway.store import sql_store
from batch_gateway.store import sqlite as sqlite_module
from batch_gateway.store.metadata import MetadataStore
from batch_gateway.store.migrations import Migration, latest_version, migrations, pending, versions
from tests.fixtures.postgres import postgres_available, test_database
from tests.store.conftest import new_store
from tests.store.test_metadata_store import batch_record

LATEST = latest_version("sqlite")
VERSIONS = versions("sqlite")  # unique and increasing; a number another branch reserved may be missing
PREVIOUS = VERSIONS[-2]

# Rows as a release at schema version 1 wrote them (no lease columns, no indexes yet).
V1_FILE = ("file-v1", "acme", 10, 100, "in.jsonl", "batch", "acme/files/file-v1", 2_000, "processed")
V1_BATCH = dict(
    id="batch_v1",
    tenant="acme",
    endpoint="/v1/chat/completions",
    input_file_id="file-v1",
    completion_window="24h",
    status="in_progress",
    created_at=100,
    expires_at=86_500,
    metadata='{"team": "search"}',
    request_counts='{"total": 4, "completed": 1, "failed": 0}',
    idempotency_key="key-v1",
    in_progress_at=101,
)


def raw_execute(backend: str, location: str, statement: str, params=()) -> list[tuple]:
    """Run SQL behind the store's back, with the backend's own driver ('?' placeholders are translated)."""
    if backend == "sqlite":
        with sqlite3.connect(location) as connection:
            return connection.execute(statement, params).fetchall()
    with psycopg.connect(location, autocommit=True) as connection:
        cursor = connection.execute(statement.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


def schema(backend: str, location: str) -> list[tuple]:
    """Everything the migrations define, in a comparable form."""
    if backend == "sqlite":
        return raw_execute(
            backend,
            location,
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name",
        )
    columns = raw_execute(
        backend,
        location,
        "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, column_name",
    )
    indexes = raw_execute(
        backend,
        location,
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 2",
    )
    return columns + indexes


async def connected(backend: str, location: str) -> MetadataStore:
    store = new_store(backend, location)
    await store.connect()
    return store


async def test_upgrade_from_the_previous_version_keeps_rows_and_they_work(metadata_backend: str, empty_database: str):
    old = await connected(metadata_backend, empty_database)
    try:
        assert await old.migrate(target=PREVIOUS) == VERSIONS[:-1]
        assert await old.schema_version() == PREVIOUS
    finally:
        await old.close()
    raw_execute(
        metadata_backend,
        empty_database,
        "INSERT INTO files (id, tenant, bytes, created_at, filename, "
        "purpose, object_key, expires_at, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        V1_FILE,
    )
    raw_execute(
        metadata_backend,
        empty_database,
        f"INSERT INTO batches ({', '.join(V1_BATCH)}) VALUES ({', '.join('?' for _ in V1_BATCH)})",
        tuple(V1_BATCH.values()),
    )

    store = await connected(metadata_backend, empty_database)
    try:
        assert await store.migrate() == [LATEST]
        assert await store.schema_version() == LATEST
        # The old rows read back as records ...
        batch = await store.get_batch("batch_v1", "acme")
        assert (batch.status, batch.metadata, batch.request_counts.total, batch.in_progress_at) == (
            "in_progress",
            {"team": "search"},
            4,
            101,
        )
        assert (await store.get_file("file-v1", "acme")).object_key == "acme/files/file-v1"
        assert [f.id for f in (await store.list_files("acme", purpose=None, order="asc", after=None, limit=5))[0]] == [
            "file-v1"
        ]
        # ... and what the new version added works on them: leases, the idempotency index, pagination.
        assert await store.claim_batch("batch_v1", "runner-a", 200, 30)
        assert not await store.claim_batch("batch_v1", "runner-b", 201, 30)
        existing, created = await store.insert_batch(batch_record(idempotency_key="key-v1"))
        assert not created and existing.id == "batch_v1"
        newer, created = await store.insert_batch(batch_record())
        page, has_more = await store.list_batches("acme", after=None, limit=1)
        assert [b.id for b in page] == [newer.id] and has_more
        assert [b.id for b in (await store.list_batches("acme", after=newer.id, limit=5))[0]] == ["batch_v1"]
        # ... and an old batch reaching a terminal status gets its webhook event.
        await store.transition("batch_v1", ["in_progress"], "expired", 300)
        [event] = await store.claim_webhook_events(now=400, lease_seconds=30, limit=5)
        assert (event.batch_id, event.type, event.created_at) == ("batch_v1", "batch.expired", 300)
    finally:
        await store.close()


async def test_migrations_apply_once_and_are_recorded(metadata_backend: str, empty_database: str):
    first = await connected(metadata_backend, empty_database)
    second = await connected(metadata_backend, empty_database)
    try:
        assert await first.migrate() == VERSIONS
        assert await first.migrate() == []
        assert await second.migrate() == []
        await second.open()  # open() migrates too: nothing left to do
    finally:
        await first.close()
        await second.close()
    recorded = raw_execute(metadata_backend, empty_database, "SELECT version, name FROM schema_migrations ORDER BY 1")
    assert recorded == [(m.version, m.name) for m in migrations(metadata_backend)]


async def test_both_backends_log_a_migration_with_the_same_fields(metadata_backend: str, empty_database: str):
    store = await connected(metadata_backend, empty_database)
    try:
        with structlog.testing.capture_logs() as logs:
            await store.migrate()
    finally:
        await store.close()
    (migrated,) = [entry for entry in logs if entry["event"] == "store.migrated"]
    assert migrated.keys() == {"event", "log_level", "database", "versions"}
    assert migrated["versions"] == VERSIONS
    assert "@" not in migrated["database"]  # no user or password in the logs


async def test_concurrent_start_up_applies_each_migration_once(metadata_backend: str, empty_database: str):
    stores = [await connected(metadata_backend, empty_database) for _ in range(4)]
    try:
        applied = await asyncio.gather(*(store.migrate() for store in stores))
        assert sorted(applied) == [[]] * 3 + [VERSIONS]
        assert {await store.schema_version() for store in stores} == {LATEST}
    finally:
        for store in stores:
            await store.close()


async def test_a_failing_migration_changes_nothing(metadata_backend: str, empty_database: str, monkeypatch):
    store = await connected(metadata_backend, empty_database)
    try:
        await store.migrate()
        before = schema(metadata_backend, empty_database)
        broken = Migration(LATEST + 1, "broken", "CREATE TABLE half_done (a integer);\nSELECT no_such_function();\n")
        monkeypatch.setattr(sql_store, "pending", lambda dialect, applied, target=None: [broken])
        with pytest.raises(Exception, match="no_such_function"):
            await store.migrate()
        assert schema(metadata_backend, empty_database) == before
        assert await store.schema_version() == LATEST
        await store.ping()  # the connection is usable after the rollback
    finally:
        await store.close()


async def test_step_by_step_upgrade_equals_migrating_in_one_go(metadata_backend: str, empty_database: str, tmp_path):
    stepwise = await connected(metadata_backend, empty_database)
    try:
        for version in VERSIONS:
            assert await stepwise.migrate(target=version) == [version]
    finally:
        await stepwise.close()

    async def in_one_go(location: str) -> list[tuple]:
        store = await connected(metadata_backend, location)
        try:
            await store.migrate()
        finally:
            await store.close()
        return schema(metadata_backend, location)

    if metadata_backend == "sqlite":
        fresh = await in_one_go(str(tmp_path / "fresh.sqlite3"))
    else:
        with test_database() as url:
            fresh = await in_one_go(url)
    assert schema(metadata_backend, empty_database) == fresh


def test_migration_files_are_numbered_and_targets_checked():
    for dialect in migrations_module.DIALECTS:
        found = migrations(dialect)
        numbers = [m.version for m in found]
        assert numbers == sorted(set(numbers)) and numbers[0] == 1
        assert pending(dialect, {1}, target=1) == []
        with pytest.raises(ValueError, match="schema version"):
            pending(dialect, set(), target=numbers[-1] + 1)
    assert [m.name for m in migrations("sqlite")] == [m.name for m in migrations("postgres")]
    with pytest.raises(ValueError, match="dialect"):
        migrations("mysql")


def test_sqlite_statement_splitting():
    split = sqlite_module.split_statements
    assert split("-- a comment\nCREATE TABLE a (x TEXT DEFAULT ';');\n\nCREATE INDEX i ON a (x);\n-- end\n") == [
        "-- a comment\nCREATE TABLE a (x TEXT DEFAULT ';');",
        "CREATE INDEX i ON a (x);",
    ]
    with pytest.raises(ValueError, match="unterminated"):
        split("CREATE TABLE a (x TEXT);\nCREATE TABLE b (y TEXT)\n")


@pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL")
async def test_both_dialects_define_the_same_tables_columns_and_indexes(tmp_path):
    path = str(tmp_path / "metadata.sqlite3")
    sqlite_store = await connected("sqlite", path)
    await sqlite_store.migrate()
    await sqlite_store.close()
    tables = [
        name
        for (name,) in raw_execute(
            "sqlite",
            path,
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )
    ]
    sqlite_columns = {t: sorted(c[1] for c in raw_execute("sqlite", path, f"PRAGMA table_info({t})")) for t in tables}
    sqlite_indexes = sorted(
        n
        for (n,) in raw_execute(
            "sqlite", path, "SELECT name FROM sqlite_master WHERE type = 'index' AND name NOT LIKE 'sqlite_%'"
        )
    )
    with test_database() as url:
        pg_store = await connected("postgres", url)
        await pg_store.migrate()
        await pg_store.close()
        pg_columns: dict[str, list[str]] = {}
        for table, column in raw_execute(
            "postgres",
            url,
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'",
        ):
            pg_columns.setdefault(table, []).append(column)
        pg_indexes = sorted(
            n
            for (n,) in raw_execute(
                "postgres",
                url,
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND indexname !~ '_(pkey|key)$'",
            )
        )
    assert sqlite_columns == {t: sorted(c) for t, c in pg_columns.items()}
    assert sqlite_indexes == pg_indexes
