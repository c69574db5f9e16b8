"""The embedded metadata store: one SQLite file shared by the API and its runner subprocesses.

WAL mode lets readers and one writer work at once across processes; a busy timeout absorbs short write contention.
sqlite3 is blocking, so every call runs in a worker thread; one connection per store, serialised by a lock.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Collection
from typing import Any

import msgspec

from batch_gateway import wire
from batch_gateway.errors import StorageUnavailable
from batch_gateway.store.metadata import TRANSITION_FIELDS, ApiKeyRecord, BatchRecord, FileRecord, MetadataStore
from batch_gateway.store.migrations import migrations

_FILE_COLUMNS = "id, tenant, bytes, created_at, filename, purpose, object_key, expires_at, status"
_BATCH_COLUMNS = (
    "id, tenant, endpoint, input_file_id, completion_window, status, created_at, expires_at, metadata, "
    "output_expires_after, model, errors, output_file_id, error_file_id, in_progress_at, finalizing_at, completed_at, "
    "failed_at, expired_at, cancelling_at, cancelled_at, request_counts, usage, fingerprint, idempotency_key"
)
_JSON_FIELDS = {
    "metadata": dict[str, str] | None,
    "errors": list[wire.BatchError] | None,
    "request_counts": wire.RequestCounts,
    "usage": wire.Usage | None,
}
_LIVE_STATUSES = ("in_progress", "finalizing", "cancelling")


def _encode(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


def _file(row: sqlite3.Row) -> FileRecord:
    return FileRecord(**dict(row))


def _batch(row: sqlite3.Row) -> BatchRecord:
    values = dict(row)
    for name, kind in _JSON_FIELDS.items():
        raw = values[name]
        values[name] = None if raw is None else msgspec.json.decode(raw, type=kind)
    return BatchRecord(**values)


class SqliteStore(MetadataStore):
    def __init__(self, path: str) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    # --- plumbing ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=30000")
        return connection

    async def _run(self, work):
        def call():
            with self._lock:
                if self._connection is None:
                    self._connection = self._connect()
                try:
                    return work(self._connection)
                except sqlite3.OperationalError as exc:
                    raise StorageUnavailable(f"SQLite at {self.path}: {exc}") from exc

        return await asyncio.to_thread(call)

    async def _fetch(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        return await self._run(lambda c: c.execute(sql, params).fetchall())

    async def _fetch_one(self, sql: str, params: Any = ()) -> sqlite3.Row | None:
        return await self._run(lambda c: c.execute(sql, params).fetchone())

    async def _execute(self, sql: str, params: Any = ()) -> int:
        return await self._run(lambda c: c.execute(sql, params).rowcount)

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        await self.migrate()

    async def migrate(self) -> list[int]:
        """Apply pending migrations; safe when several processes start at once (BEGIN IMMEDIATE)."""

        def work(c: sqlite3.Connection) -> list[int]:
            c.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
            applied_now = []
            c.execute("BEGIN IMMEDIATE")
            try:
                done = {row[0] for row in c.execute("SELECT version FROM schema_migrations")}
                for migration in migrations("sqlite"):
                    if migration.version in done:
                        continue
                    for statement in migration.sql.split(";"):
                        if statement.strip() and not all(
                            line.strip().startswith("--") or not line.strip() for line in statement.splitlines()
                        ):
                            c.execute(statement)
                    c.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", (migration.version, migration.name))
                    applied_now.append(migration.version)
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            return applied_now

        return await self._run(work)

    async def close(self) -> None:
        def work() -> None:
            with self._lock:
                if self._connection is not None:
                    self._connection.close()
                    self._connection = None

        await asyncio.to_thread(work)

    async def ping(self) -> None:
        await self._fetch_one("SELECT 1")

    # --- files -------------------------------------------------------------------------------

    async def insert_file(self, record: FileRecord) -> None:
        await self._execute(
            f"INSERT INTO files ({_FILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            (record.id, record.tenant, record.bytes, record.created_at, record.filename, record.purpose,
             record.object_key, record.expires_at, record.status),
        )

    async def get_file(self, file_id: str, tenant: str | None) -> FileRecord | None:
        if tenant is None:
            row = await self._fetch_one(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ?", (file_id,))
        else:
            row = await self._fetch_one(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ? AND tenant = ?", (file_id, tenant))
        return _file(row) if row else None

    async def list_files(
        self, tenant: str, *, purpose: str | None, order: str, after: str | None, limit: int
    ) -> tuple[list[FileRecord], bool]:
        descending = order != "asc"
        clauses, params = ["tenant = ?"], [tenant]
        if purpose is not None:
            clauses.append("purpose = ?")
            params.append(purpose)
        if after is not None:
            clauses.append(f"seq {'<' if descending else '>'} (SELECT seq FROM files WHERE id = ? AND tenant = ?)")
            params += [after, tenant]
        rows = await self._fetch(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE {' AND '.join(clauses)} "
            f"ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?",
            (*params, limit + 1),
        )
        return [_file(r) for r in rows[:limit]], len(rows) > limit

    async def delete_file(self, file_id: str, tenant: str | None) -> bool:
        if tenant is None:
            return await self._execute("DELETE FROM files WHERE id = ?", (file_id,)) > 0
        return await self._execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)) > 0

    async def expired_files(self, now: int, limit: int) -> list[FileRecord]:
        rows = await self._fetch(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?",
            (now, limit),
        )
        return [_file(r) for r in rows]

    # --- batches -----------------------------------------------------------------------------

    async def insert_batch(self, record: BatchRecord) -> tuple[BatchRecord, bool]:
        values = msgspec.structs.asdict(record)
        names = _BATCH_COLUMNS.split(", ")
        params = [_encode(values[n]) if n in _JSON_FIELDS else values[n] for n in names]
        inserted = await self._execute(
            f"INSERT INTO batches ({_BATCH_COLUMNS}) VALUES ({', '.join('?' for _ in names)}) "
            "ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
            params,
        )
        if inserted:
            return record, True
        row = await self._fetch_one(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE tenant = ? AND idempotency_key = ?",
            (record.tenant, record.idempotency_key),
        )
        assert row is not None
        return _batch(row), False

    async def find_recent_batch(self, tenant: str, fingerprint: str, since: int) -> BatchRecord | None:
        row = await self._fetch_one(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE tenant = ? AND fingerprint = ? AND created_at >= ? "
            "ORDER BY seq DESC LIMIT 1",
            (tenant, fingerprint, since),
        )
        return _batch(row) if row else None

    async def get_batch(self, batch_id: str, tenant: str | None) -> BatchRecord | None:
        if tenant is None:
            row = await self._fetch_one(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ?", (batch_id,))
        else:
            row = await self._fetch_one(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE id = ? AND tenant = ?", (batch_id, tenant)
            )
        return _batch(row) if row else None

    async def list_batches(self, tenant: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        if after is None:
            rows = await self._fetch(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE tenant = ? ORDER BY seq DESC LIMIT ?", (tenant, limit + 1)
            )
        else:
            rows = await self._fetch(
                f"SELECT {_BATCH_COLUMNS} FROM batches WHERE tenant = ? "
                "AND seq < (SELECT seq FROM batches WHERE id = ? AND tenant = ?) ORDER BY seq DESC LIMIT ?",
                (tenant, after, tenant, limit + 1),
            )
        return [_batch(r) for r in rows[:limit]], len(rows) > limit

    async def transition(
        self, batch_id: str, from_statuses: Collection[str], to_status: str, now: int, **changes: Any
    ) -> BatchRecord | None:
        unknown = set(changes) - TRANSITION_FIELDS
        if unknown:
            raise ValueError(f"transition cannot change {sorted(unknown)}")
        if to_status not in wire.BatchStatus.__args__:  # type: ignore[attr-defined]
            raise ValueError(f"unknown status {to_status!r}")
        sets = ["status = ?", f"{to_status}_at = COALESCE({to_status}_at, ?)"]
        params: list[Any] = [to_status, now]
        for name, value in changes.items():
            sets.append(f"{name} = ?")
            params.append(_encode(value) if name in _JSON_FIELDS else value)
        placeholders = ", ".join("?" for _ in from_statuses)
        row = await self._fetch_one(
            f"UPDATE batches SET {', '.join(sets)} WHERE id = ? AND status IN ({placeholders}) RETURNING {_BATCH_COLUMNS}",
            (*params, batch_id, *from_statuses),
        )
        return _batch(row) if row else None

    async def save_progress(self, batch_id: str, counts: wire.RequestCounts, usage: wire.Usage | None) -> None:
        await self._execute(
            f"UPDATE batches SET request_counts = ?, usage = ? WHERE id = ? AND status IN {_LIVE_STATUSES}",
            (_encode(counts), _encode(usage), batch_id),
        )

    async def batches_with_status(self, statuses: Collection[str], limit: int = 1000) -> list[BatchRecord]:
        statuses = list(statuses)
        rows = await self._fetch(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE status IN ({', '.join('?' for _ in statuses)}) ORDER BY seq LIMIT ?",
            (*statuses, limit),
        )
        return [_batch(r) for r in rows]

    async def overdue_batches(self, now: int, limit: int = 1000) -> list[BatchRecord]:
        active = sorted(wire.ACTIVE_STATUSES)
        rows = await self._fetch(
            f"SELECT {_BATCH_COLUMNS} FROM batches WHERE status IN ({', '.join('?' for _ in active)}) "
            "AND expires_at <= ? ORDER BY expires_at LIMIT ?",
            (*active, now, limit),
        )
        return [_batch(r) for r in rows]

    # --- leases ------------------------------------------------------------------------------

    async def claim_batch(self, batch_id: str, owner: str, now: int, lease_seconds: int) -> bool:
        return (
            await self._execute(
                "UPDATE batches SET runner_owner = ?, lease_until = ? WHERE id = ? "
                "AND (runner_owner IS NULL OR runner_owner = ? OR lease_until IS NULL OR lease_until < ?)",
                (owner, now + lease_seconds, batch_id, owner, now),
            )
            > 0
        )

    async def renew_lease(self, batch_id: str, owner: str, now: int, lease_seconds: int) -> bool:
        return (
            await self._execute(
                "UPDATE batches SET lease_until = ? WHERE id = ? AND runner_owner = ?", (now + lease_seconds, batch_id, owner)
            )
            > 0
        )

    async def release_batch(self, batch_id: str, owner: str) -> None:
        await self._execute(
            "UPDATE batches SET runner_owner = NULL, lease_until = NULL WHERE id = ? AND runner_owner = ?", (batch_id, owner)
        )

    # --- keys --------------------------------------------------------------------------------

    async def insert_key(self, record: ApiKeyRecord) -> None:
        await self._execute(
            "INSERT INTO api_keys (id, tenant, key_hash, prefix, created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?)",
            (record.id, record.tenant, record.key_hash, record.prefix, record.created_at, record.revoked_at),
        )

    async def list_keys(self) -> list[ApiKeyRecord]:
        rows = await self._fetch("SELECT id, tenant, key_hash, prefix, created_at, revoked_at FROM api_keys ORDER BY created_at, id")
        return [ApiKeyRecord(**dict(r)) for r in rows]

    async def revoke_key(self, key_id: str, now: int) -> bool:
        return await self._execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, key_id)) > 0

    async def active_key_count(self) -> int:
        row = await self._fetch_one("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL")
        return int(row[0]) if row else 0

    async def tenant_for_key_hash(self, key_hash: str) -> str | None:
        row = await self._fetch_one("SELECT tenant FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,))
        return row[0] if row else None
