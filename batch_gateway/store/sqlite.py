"""The embedded metadata store: one SQLite file shared by the API and its runner subprocesses.

WAL mode lets readers work beside one writer across processes; a busy timeout absorbs short write contention, and
every write is one autocommit statement, so no process holds the write lock for long. sqlite3 blocks, so each store
owns one connection living on one worker thread of its own: calls are serialised there and never tie up the
event loop or the default thread pool.

Cursor pagination looks up the `seq` of the `after` object inside the query; an `after` that is unknown, deleted or
another tenant's gives an empty page.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from batch_gateway import ids, wire
from batch_gateway.errors import StorageUnavailable
from batch_gateway.store import rows
from batch_gateway.store.metadata import (
    NEAR_DEADLINE_FRACTION,
    OPEN_UPLOAD_STATUSES,
    ApiKeyRecord,
    BatchForecast,
    BatchRecord,
    FileRecord,
    MetadataStore,
    RunnerLoad,
    StorageStats,
    TenantPolicy,
    UploadPartRecord,
    UploadRecord,
    UploadStatus,
    WebhookEventRecord,
    WebhookState,
)
from batch_gateway.store.migrations import latest_version, pending

T = TypeVar("T")
log = structlog.get_logger(__name__)

_FILES = ", ".join(rows.FILE_COLUMNS)
_BATCHES = ", ".join(rows.BATCH_COLUMNS)
_KEYS = ", ".join(rows.KEY_COLUMNS)
_EVENTS = ", ".join(rows.WEBHOOK_EVENT_COLUMNS)
_UPLOADS = ", ".join(rows.UPLOAD_COLUMNS)
_PARTS = ", ".join(rows.UPLOAD_PART_COLUMNS)

# Primary result codes that mean "the database cannot serve right now", as opposed to a bug in a query.
_UNAVAILABLE_CODES = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_PROTOCOL,
    sqlite3.SQLITE_READONLY,
}


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


def split_statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit the surrounding transaction)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    stripped = "\n".join(line for line in current.splitlines() if not line.strip().startswith("--")).strip()
    if stripped:
        raise ValueError(f"migration ends with an unterminated statement: {stripped[:80]!r}")
    return statements


# Active batches past their deadline, and in the last fifth of their window (metrics, alerts).
DEADLINES_SQL = (
    "SELECT COALESCE(SUM(CASE WHEN expires_at <= ? THEN 1 ELSE 0 END), 0) AS overdue, "
    "COALESCE(SUM(CASE WHEN expires_at > ? AND (expires_at - ?) * "
    f"{NEAR_DEADLINE_FRACTION}"
    " < expires_at - created_at "
    "THEN 1 ELSE 0 END), 0) AS near FROM batches "
    "WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
)


class SqliteStore(MetadataStore):
    def __init__(self, path: str, *, busy_timeout: float = 20.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._connection: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None

    # --- plumbing ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit; the few multi-statement transactions say BEGIN themselves.
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against process crashes in WAL mode; only a power loss can drop the last commits.
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                if self._connection is None:
                    self._connection = self._connect()
                return work(self._connection)
            except sqlite3.OperationalError as exc:
                if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF in _UNAVAILABLE_CODES:
                    raise StorageUnavailable(f"SQLite database {self.path}: {exc}") from exc
                raise

        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        # fetchall() also for UPDATE ... RETURNING: the statement only completes (and commits) once fully stepped.
        return await self._run(lambda c: c.execute(sql, params).fetchall())

    async def _row(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        found = await self._rows(sql, params)
        return found[0] if found else None

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return await self._run(lambda c: c.execute(sql, params).rowcount)

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        await self.connect()
        await self.migrate()

    async def connect(self) -> None:
        """Open the connection without migrating (open() does both)."""
        await self._run(lambda c: None)

    async def migrate(self, target: int | None = None) -> list[int]:
        """Apply pending migrations (up to `target`); returns the versions applied. BEGIN IMMEDIATE takes the write
        lock before reading what is applied, so processes starting together apply each migration once."""

        def work(c: sqlite3.Connection) -> list[int]:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                    "applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
                )
                applied = {row[0] for row in c.execute("SELECT version FROM schema_migrations")}
                done = []
                for migration in pending("sqlite", applied, target):
                    for statement in split_statements(migration.sql):
                        c.execute(statement)
                    c.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (?, ?)",
                        (migration.version, migration.name),
                    )
                    done.append(migration.version)
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:  # some errors (a full disk, an I/O error) have rolled back already
                    c.execute("ROLLBACK")
                raise
            newest = max(applied | set(done), default=0)
            if newest > latest_version("sqlite"):
                log.warning("store.schema_newer_than_code", path=self.path, version=newest)
            if done:
                log.info("store.migrated", path=self.path, versions=done)
            return done

        return await self._run(work)

    async def schema_version(self) -> int:
        row = await self._row("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(row[0]) if row else 0

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return

        def work() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await asyncio.get_running_loop().run_in_executor(thread, work)
        thread.shutdown(wait=False)

    async def ping(self) -> None:
        await self._rows("SELECT version FROM schema_migrations LIMIT 1")

    # --- files -------------------------------------------------------------------------------

    async def insert_file(self, record: FileRecord) -> None:
        values = rows.file_values(record)
        await self._execute(
            f"INSERT INTO files ({_FILES}) VALUES ({_marks(values)}) ON CONFLICT (id) DO NOTHING", values
        )

    async def get_file(self, file_id: str, tenant: str | None) -> FileRecord | None:
        if tenant is None:
            row = await self._row(f"SELECT {_FILES} FROM files WHERE id = ? AND deleted_at IS NULL", (file_id,))
        else:
            row = await self._row(
                f"SELECT {_FILES} FROM files WHERE id = ? AND tenant = ? AND deleted_at IS NULL", (file_id, tenant)
            )
        return rows.file_from_row(row) if row else None

    async def list_files(
        self, tenant: str, *, purpose: str | None, order: str, after: str | None, limit: int
    ) -> tuple[list[FileRecord], bool]:
        rows.check_page(order, limit)
        clauses, params = ["tenant = ?", "deleted_at IS NULL"], [tenant]
        if purpose is not None:
            clauses.append("purpose = ?")
            params.append(purpose)
        if after is not None:
            clauses.append(f"seq {'>' if order == 'asc' else '<'} (SELECT seq FROM files WHERE id = ? AND tenant = ?)")
            params += [after, tenant]
        found = await self._rows(
            f"SELECT {_FILES} FROM files WHERE {' AND '.join(clauses)} ORDER BY seq {order.upper()} LIMIT ?",
            (*params, limit + 1),
        )
        return [rows.file_from_row(r) for r in found[:limit]], len(found) > limit

    async def delete_file(self, file_id: str, tenant: str | None) -> bool:
        if tenant is None:
            return await self._execute("DELETE FROM files WHERE id = ?", (file_id,)) > 0
        return await self._execute("DELETE FROM files WHERE id = ? AND tenant = ?", (file_id, tenant)) > 0

    async def hide_file(self, file_id: str, tenant: str | None, now: int) -> FileRecord | None:
        scope, params = ("", ()) if tenant is None else (" AND tenant = ?", (tenant,))
        row = await self._row(
            f"UPDATE files SET deleted_at = ? WHERE id = ?{scope} AND deleted_at IS NULL RETURNING {_FILES}",
            (now, file_id, *params),
        )
        return rows.file_from_row(row) if row else None

    async def file_in_use(self, file_id: str) -> bool:
        active = rows.ACTIVE_STATUSES
        row = await self._row(
            f"SELECT 1 FROM batches WHERE input_file_id = ? AND status IN ({_marks(active)}) LIMIT 1",
            (file_id, *active),
        )
        return row is not None

    async def deletable_hidden_files(self, limit: int) -> list[FileRecord]:
        active = rows.ACTIVE_STATUSES
        found = await self._rows(
            f"SELECT {_FILES} FROM files AS f WHERE deleted_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM batches AS b "
            f"WHERE b.input_file_id = f.id AND b.tenant = f.tenant AND b.status IN ({_marks(active)})) "
            "ORDER BY deleted_at, seq LIMIT ?",
            (*active, limit),
        )
        return [rows.file_from_row(r) for r in found]

    async def expired_files(self, now: int, limit: int) -> list[FileRecord]:
        found = await self._rows(
            f"SELECT {_FILES} FROM files WHERE expires_at <= ? AND deleted_at IS NULL ORDER BY expires_at, seq LIMIT ?",
            (now, limit),
        )
        return [rows.file_from_row(r) for r in found]

    # --- uploads -----------------------------------------------------------------------------

    async def insert_upload(self, record: UploadRecord) -> None:
        values = rows.upload_values(record)
        await self._execute(f"INSERT INTO uploads ({_UPLOADS}) VALUES ({_marks(values)})", values)

    async def get_upload(self, upload_id: str, tenant: str | None) -> UploadRecord | None:
        scope, params = ("", ()) if tenant is None else (" AND tenant = ?", (tenant,))
        row = await self._row(f"SELECT {_UPLOADS} FROM uploads WHERE id = ?{scope}", (upload_id, *params))
        return rows.upload_from_row(row) if row else None

    async def add_upload_part(self, part: UploadPartRecord, now: int) -> bool:
        values = rows.upload_part_values(part)
        inserted = await self._execute(
            f"INSERT INTO upload_parts ({_PARTS}) SELECT {_marks(values)} WHERE EXISTS (SELECT 1 FROM uploads "
            "WHERE id = ? AND tenant = ? AND status = ? AND expires_at > ?)",
            (*values, part.upload_id, part.tenant, UploadStatus.PENDING.value, now),
        )
        return inserted > 0

    async def upload_parts(self, upload_id: str) -> list[UploadPartRecord]:
        found = await self._rows(f"SELECT {_PARTS} FROM upload_parts WHERE upload_id = ? ORDER BY seq", (upload_id,))
        return [rows.upload_part_from_row(r) for r in found]

    async def transition_upload(
        self,
        upload_id: str,
        tenant: str | None,
        from_statuses: Collection[str],
        to_status: str,
        *,
        unexpired_at: int | None = None,
    ) -> UploadRecord | None:
        sources = rows.checked_upload_statuses(from_statuses)
        rows.checked_upload_statuses([to_status])
        clauses, params = ["id = ?", f"status IN ({_marks(sources)})"], [upload_id, *sources]
        if tenant is not None:
            clauses.append("tenant = ?")
            params.append(tenant)
        if unexpired_at is not None:
            clauses.append("expires_at > ?")
            params.append(unexpired_at)
        row = await self._row(
            f"UPDATE uploads SET status = ? WHERE {' AND '.join(clauses)} RETURNING {_UPLOADS}", (to_status, *params)
        )
        return rows.upload_from_row(row) if row else None

    async def complete_upload(self, upload_id: str, file: FileRecord) -> UploadRecord | None:
        def work(c: sqlite3.Connection) -> sqlite3.Row | None:
            c.execute("BEGIN IMMEDIATE")
            try:
                row = c.execute(
                    f"UPDATE uploads SET status = ?, file_id = ? WHERE id = ? AND status = ? RETURNING {_UPLOADS}",
                    (UploadStatus.COMPLETED.value, file.id, upload_id, UploadStatus.COMPLETING.value),
                ).fetchone()
                if row is not None:
                    values = rows.file_values(file)
                    c.execute(
                        f"INSERT INTO files ({_FILES}) VALUES ({_marks(values)}) ON CONFLICT (id) DO NOTHING", values
                    )
                c.execute("COMMIT" if row is not None else "ROLLBACK")
                return row
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise

        row = await self._run(work)
        return rows.upload_from_row(row) if row else None

    async def expire_uploads(self, now: int, limit: int) -> list[UploadRecord]:
        found = await self._rows(
            f"UPDATE uploads SET status = ? WHERE seq IN (SELECT seq FROM uploads WHERE status IN "
            f"({_marks(OPEN_UPLOAD_STATUSES)}) AND expires_at <= ? ORDER BY expires_at, seq LIMIT ?) RETURNING {_UPLOADS}",
            (UploadStatus.EXPIRED.value, *OPEN_UPLOAD_STATUSES, now, limit),
        )
        return [rows.upload_from_row(r) for r in found]

    async def stale_upload_parts(self, limit: int) -> list[UploadPartRecord]:
        found = await self._rows(
            f"SELECT {_PARTS} FROM upload_parts AS p WHERE NOT EXISTS (SELECT 1 FROM uploads AS u WHERE "
            f"u.id = p.upload_id AND u.status IN ({_marks(OPEN_UPLOAD_STATUSES)})) ORDER BY seq LIMIT ?",
            (*OPEN_UPLOAD_STATUSES, limit),
        )
        return [rows.upload_part_from_row(r) for r in found]

    async def delete_upload_part(self, part_id: str) -> None:
        await self._execute("DELETE FROM upload_parts WHERE id = ?", (part_id,))

    # --- batches -----------------------------------------------------------------------------

    async def insert_batch(self, record: BatchRecord) -> tuple[BatchRecord, bool]:
        values = rows.batch_values(record)
        # The conflict target is the partial unique index (tenant, idempotency_key): a concurrent insert with the
        # same key loses here, atomically, and then reads the winner.
        inserted = await self._execute(
            f"INSERT INTO batches ({_BATCHES}) VALUES ({_marks(values)}) "
            "ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
            values,
        )
        if inserted:
            return record, True
        row = await self._row(
            f"SELECT {_BATCHES} FROM batches WHERE tenant = ? AND idempotency_key = ?",
            (record.tenant, record.idempotency_key),
        )
        if row is None:  # batches are never deleted, so the winner is there
            raise StorageUnavailable(f"batch with idempotency key {record.idempotency_key!r} vanished")
        return rows.batch_from_row(row), False

    async def claim_fold(
        self, tenant: str, fingerprint: str, batch_id: str, now: int, older_than: int | None
    ) -> str | None:
        # The upsert takes the fingerprint over, or (a retry, the recorded batch being recent) leaves it and returns
        # nothing, in one statement: the primary key lets exactly one of concurrent claims win.
        condition = "" if older_than is None else " WHERE batch_folds.created_at < ?"
        claimed = await self._row(
            "INSERT INTO batch_folds (tenant, fingerprint, batch_id, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (tenant, fingerprint) DO UPDATE SET batch_id = excluded.batch_id, "
            f"created_at = excluded.created_at{condition} RETURNING batch_id",
            (tenant, fingerprint, batch_id, now, *(() if older_than is None else (older_than,))),
        )
        if claimed is not None:
            return claimed[0]
        holder = await self._row(
            "SELECT batch_id FROM batch_folds WHERE tenant = ? AND fingerprint = ?", (tenant, fingerprint)
        )
        return holder[0] if holder else None

    async def release_fold(self, tenant: str, fingerprint: str, batch_id: str) -> None:
        await self._execute(
            "DELETE FROM batch_folds WHERE tenant = ? AND fingerprint = ? AND batch_id = ?",
            (tenant, fingerprint, batch_id),
        )

    async def get_batch(self, batch_id: str, tenant: str | None) -> BatchRecord | None:
        if tenant is None:
            row = await self._row(f"SELECT {_BATCHES} FROM batches WHERE id = ?", (batch_id,))
        else:
            row = await self._row(f"SELECT {_BATCHES} FROM batches WHERE id = ? AND tenant = ?", (batch_id, tenant))
        return rows.batch_from_row(row) if row else None

    async def list_batches(self, tenant: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        rows.check_page("desc", limit)
        if after is None:
            found = await self._rows(
                f"SELECT {_BATCHES} FROM batches WHERE tenant = ? ORDER BY seq DESC LIMIT ?", (tenant, limit + 1)
            )
        else:
            found = await self._rows(
                f"SELECT {_BATCHES} FROM batches WHERE tenant = ? "
                "AND seq < (SELECT seq FROM batches WHERE id = ? AND tenant = ?) ORDER BY seq DESC LIMIT ?",
                (tenant, after, tenant, limit + 1),
            )
        return [rows.batch_from_row(r) for r in found[:limit]], len(found) > limit

    async def transition(
        self, batch_id: str, from_statuses: Collection[str], to_status: str, now: int, **changes: Any
    ) -> BatchRecord | None:
        changes = rows.checked_changes(changes)
        sources = rows.checked_statuses(from_statuses)
        stamp = rows.timestamp_column(to_status)  # validates to_status, which names a column
        if not sources:
            return None
        sets, params = ["status = ?"], [to_status]
        if stamp is not None:
            sets.append(f"{stamp} = COALESCE({stamp}, ?)")
            params.append(now)
        for name, value in changes.items():
            sets.append(f"{name} = ?")
            params.append(rows.encode_json(value) if name in rows.BATCH_JSON_TYPES else value)
        row = await self._row(
            f"UPDATE batches SET {', '.join(sets)} WHERE id = ? AND status IN ({_marks(sources)}) RETURNING {_BATCHES}",
            (*params, batch_id, *sources),
        )
        return rows.batch_from_row(row) if row else None

    async def save_progress(self, batch_id: str, counts: wire.RequestCounts, usage: wire.Usage | None) -> None:
        # Only while running, and never backwards: a stale writer (a runner resumed from an older checkpoint, a
        # delayed update) cannot undo newer progress.
        await self._execute(
            "UPDATE batches SET request_counts = ?, usage = ? "
            f"WHERE id = ? AND status IN ({_marks(rows.LIVE_STATUSES)}) "
            "AND json_extract(request_counts, '$.completed') + json_extract(request_counts, '$.failed') <= ?",
            (
                rows.encode_json(counts),
                rows.encode_json(usage),
                batch_id,
                *rows.LIVE_STATUSES,
                counts.completed + counts.failed,
            ),
        )

    async def batches_with_status(self, statuses: Collection[str], limit: int = 1000) -> list[BatchRecord]:
        wanted = rows.checked_statuses(statuses)
        if not wanted:
            return []
        found = await self._rows(
            f"SELECT {_BATCHES} FROM batches WHERE status IN ({_marks(wanted)}) ORDER BY seq LIMIT ?", (*wanted, limit)
        )
        return [rows.batch_from_row(r) for r in found]

    async def overdue_batches(self, now: int, limit: int = 1000) -> list[BatchRecord]:
        active = rows.ACTIVE_STATUSES
        found = await self._rows(
            f"SELECT {_BATCHES} FROM batches WHERE status IN ({_marks(active)}) AND expires_at <= ? "
            "ORDER BY expires_at, seq LIMIT ?",
            (*active, now, limit),
        )
        return [rows.batch_from_row(r) for r in found]

    async def storage_stats(self, now: int | None = None) -> StorageStats:
        """Whole-table counts (all tenants); GROUP BY over the status index and the files table, cheap enough for a
        metrics scrape at the sizes SQLite serves."""
        batches = await self._rows("SELECT status, COUNT(*) FROM batches GROUP BY status")
        files = await self._rows("SELECT purpose, COUNT(*), COALESCE(SUM(bytes), 0) FROM files GROUP BY purpose")
        now = ids.now() if now is None else now
        deadlines = await self._row(DEADLINES_SQL, (now, now, now))
        return StorageStats(
            batches_by_status={row[0]: row[1] for row in batches},
            files_by_purpose={row[0]: (row[1], row[2]) for row in files},
            overdue_batches=deadlines[0] if deadlines else 0,
            near_deadline_batches=deadlines[1] if deadlines else 0,
        )

    # --- leases ------------------------------------------------------------------------------

    async def claim_batch(self, batch_id: str, owner: str, now: int, lease_seconds: int) -> bool:
        taken = await self._execute(
            "UPDATE batches SET runner_owner = ?, lease_until = ? WHERE id = ? "
            "AND (runner_owner IS NULL OR runner_owner = ? OR lease_until IS NULL OR lease_until < ?)",
            (owner, now + lease_seconds, batch_id, owner, now),
        )
        return taken > 0

    async def renew_lease(self, batch_id: str, owner: str, now: int, lease_seconds: int) -> bool:
        renewed = await self._execute(
            "UPDATE batches SET lease_until = ? WHERE id = ? AND runner_owner = ?",
            (now + lease_seconds, batch_id, owner),
        )
        return renewed > 0

    async def release_batch(self, batch_id: str, owner: str) -> None:
        await self._execute(
            "UPDATE batches SET runner_owner = NULL, lease_until = NULL WHERE id = ? AND runner_owner = ?",
            (batch_id, owner),
        )

    async def leased_batches(self, now: int) -> set[str]:
        active = rows.ACTIVE_STATUSES
        found = await self._rows(
            f"SELECT id FROM batches WHERE status IN ({_marks(active)}) AND runner_owner IS NOT NULL AND lease_until >= ?",
            (*active, now),
        )
        return {row["id"] for row in found}

    # --- the load board ----------------------------------------------------------------------

    async def share_load(self, endpoint: str, load: RunnerLoad, fresh_after: float) -> list[RunnerLoad]:
        # "limit" is quoted: a reserved word in PostgreSQL.
        await self._execute(
            'INSERT INTO runner_loads (endpoint, owner, inflight, "limit", demand, completed, weight, at, tenant) '
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (endpoint, owner) DO UPDATE SET "
            'inflight = excluded.inflight, "limit" = excluded."limit", demand = excluded.demand, '
            "completed = excluded.completed, weight = excluded.weight, at = excluded.at, tenant = excluded.tenant",
            (
                endpoint,
                load.owner,
                load.inflight,
                load.limit,
                load.demand,
                load.completed,
                load.weight,
                load.at,
                load.tenant,
            ),
        )
        found = await self._rows(
            'SELECT owner, inflight, "limit", demand, completed, weight, at, tenant FROM runner_loads '
            "WHERE endpoint = ? AND owner <> ? AND at > ?",
            (endpoint, load.owner, fresh_after),
        )
        return [rows.runner_load_from_row(row) for row in found]

    async def withdraw_load(self, owner: str, older_than: float) -> None:
        await self._execute("DELETE FROM runner_loads WHERE owner = ? OR at < ?", (owner, older_than))

    # --- deadlines ------------------------------------------------------------------------

    async def set_tenant_policy(self, tenant: str, policy: TenantPolicy) -> None:
        await self._execute(
            "INSERT INTO tenants (name, weight, max_running) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
            "weight = excluded.weight, max_running = excluded.max_running",
            (tenant, policy.weight, policy.max_running),
        )

    async def tenant_policies(self) -> dict[str, TenantPolicy]:
        found = await self._rows("SELECT name, weight, max_running FROM tenants")
        return {row["name"]: TenantPolicy(row["weight"], row["max_running"]) for row in found}

    async def save_forecast(self, batch_id: str, forecast: BatchForecast) -> None:
        await self._execute("UPDATE batches SET forecast = ? WHERE id = ?", (rows.encode_json(forecast), batch_id))

    async def forecasts(self, batch_ids: Collection[str]) -> dict[str, BatchForecast]:
        wanted = sorted(batch_ids)
        if not wanted:
            return {}
        found = await self._rows(
            f"SELECT id, forecast FROM batches WHERE id IN ({_marks(wanted)}) AND forecast IS NOT NULL", wanted
        )
        return {row["id"]: rows.forecast_from_json(row["forecast"]) for row in found}

    async def add_webhook_event(self, event_id: str, batch_id: str, tenant: str, type: str, now: int) -> bool:
        added = await self._execute(
            "INSERT INTO webhook_events (id, batch_id, tenant, type, created_at, due_at) VALUES (?, ?, ?, ?, ?, 0) "
            "ON CONFLICT (id) DO NOTHING",
            (event_id, batch_id, tenant, type, now),
        )
        return added > 0

    # --- webhook outbox --------------------------------------------------------------------

    async def claim_webhook_events(self, now: float, lease_seconds: float, limit: int) -> list[WebhookEventRecord]:
        pending = WebhookState.PENDING.value

        def work(c: sqlite3.Connection) -> list[sqlite3.Row]:
            # Polled every second: look before taking the write lock, which an UPDATE takes even to change nothing.
            due = c.execute("SELECT 1 FROM webhook_events WHERE state = ? AND due_at <= ? LIMIT 1", (pending, now))
            if due.fetchone() is None:
                return []
            # One statement, and SQLite has one writer at a time: two processes cannot claim the same row.
            return c.execute(
                "UPDATE webhook_events SET due_at = ?, attempts = attempts + 1 WHERE seq IN (SELECT seq FROM "
                "webhook_events WHERE state = ? AND due_at <= ? ORDER BY due_at, seq LIMIT ?) "
                f"RETURNING {_EVENTS}, seq",
                (now + lease_seconds, pending, now, limit),
            ).fetchall()

        found = await self._run(work)
        return [rows.webhook_event_from_row(r) for r in sorted(found, key=lambda r: r["seq"])]

    async def reschedule_webhook_event(self, event_id: str, due_at: float, error: str) -> None:
        await self._execute(
            "UPDATE webhook_events SET due_at = ?, last_error = ? WHERE id = ? AND state = ?",
            (due_at, error, event_id, WebhookState.PENDING.value),
        )

    async def finish_webhook_event(
        self, event_id: str, state: WebhookState, now: int, error: str | None = None
    ) -> None:
        await self._execute(
            "UPDATE webhook_events SET state = ?, finished_at = ?, last_error = COALESCE(?, last_error) "
            "WHERE id = ? AND state = ?",
            (state.value, now, error, event_id, WebhookState.PENDING.value),
        )

    # --- keys --------------------------------------------------------------------------------

    async def insert_key(self, record: ApiKeyRecord) -> None:
        values = rows.key_values(record)
        try:
            await self._execute(f"INSERT INTO api_keys ({_KEYS}) VALUES ({_marks(values)})", values)
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"API key {record.id} (or its hash) already exists") from exc

    async def list_keys(self) -> list[ApiKeyRecord]:
        found = await self._rows(f"SELECT {_KEYS} FROM api_keys ORDER BY created_at, id")
        return [rows.key_from_row(r) for r in found]

    async def revoke_key(self, key_id: str, now: int) -> bool:
        return (
            await self._execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, key_id))
            > 0
        )

    async def active_key_count(self) -> int:
        row = await self._row("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL")
        return int(row[0]) if row else 0

    async def tenant_for_key_hash(self, key_hash: str) -> str | None:
        row = await self._row("SELECT tenant FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,))
        return row[0] if row else None
