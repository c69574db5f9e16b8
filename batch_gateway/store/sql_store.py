"""The metadata store in SQL: every query written once, for SQLite and PostgreSQL.

As procrastinate does with its connectors, the queries live here and a backend (`sqlite.py`, `postgres.py`) brings the
connections and a small `Dialect` for the few places where the two databases differ:

- placeholders: queries are written with `?`; the PostgreSQL driver gets `%s`;
- lists: `one_of(column)` takes the whole list as one parameter (`= ANY(?)`, or `IN` over `json_each(?)` in SQLite);
- JSON: how a value is written (text, or jsonb) and how a number is read out of a document;
- claiming rows: PostgreSQL locks the rows it picks and skips those another claim holds (SQLite has one writer);
- errors: which driver errors mean "the database cannot serve now" (`StorageUnavailable`), or a duplicate key;
- migrations: the `schema_migrations` table and how processes starting together take turns.

Each statement commits on its own; only `complete_upload`, `delete_file` (the row and its list place) and `migrate`
group statements in a transaction. Rows come back as dicts from both.

Cursor pagination looks up the `seq` of the `after` object inside the query; an `after` that is unknown or another
tenant's gives an empty page. A deleted file's `seq` stays in `file_cursors` for a day (gc forgets older ones), so that
a client deleting the files of each page as it lists them still finds the next page.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

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

log = structlog.get_logger(__name__)

Row = dict[str, Any]

_FILES = ", ".join(rows.FILE_COLUMNS)
_BATCHES = ", ".join(rows.BATCH_COLUMNS)
_KEYS = ", ".join(rows.KEY_COLUMNS)
_EVENTS = ", ".join(rows.WEBHOOK_EVENT_COLUMNS)
_UPLOADS = ", ".join(rows.UPLOAD_COLUMNS)
_PARTS = ", ".join(rows.UPLOAD_PART_COLUMNS)
# "limit" is a reserved word in PostgreSQL
_LOADS = 'owner, inflight, "limit", demand, completed, weight, at, tenant, budget'

# Active batches past their deadline, and in the last fifth of their window (metrics, alerts).
DEADLINES_SQL = (
    "SELECT COALESCE(SUM(CASE WHEN expires_at <= ? THEN 1 ELSE 0 END), 0) AS overdue, "
    f"COALESCE(SUM(CASE WHEN expires_at > ? AND (expires_at - ?) * {NEAR_DEADLINE_FRACTION} < expires_at - created_at "
    "THEN 1 ELSE 0 END), 0) AS near FROM batches "
    "WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
)


def marks(values: Sequence[Any]) -> str:
    """One placeholder per value, for a VALUES list."""
    return ", ".join("?" * len(values))


class Dialect(abc.ABC):
    """What differs between the SQL databases; the queries themselves do not."""

    name: str  # the migrations folder: store/sql/<name>/
    skip_locked: str  # ends a SELECT picking rows to claim: concurrent claims take different rows
    migrations_table: str  # CREATE TABLE IF NOT EXISTS schema_migrations (...)
    migration_lock: str | None  # a statement making concurrent migrators take turns, if BEGIN does not

    @abc.abstractmethod
    def one_of(self, column: str) -> str:
        """A condition that `column` is in the list given as one parameter (`values()` prepares it)."""

    @abc.abstractmethod
    def values(self, items: Collection[str]) -> Any:
        """The list parameter of `one_of`."""

    @abc.abstractmethod
    def json(self, value: Any) -> Any:
        """A JSON column's parameter (None stays NULL)."""

    @abc.abstractmethod
    def json_int(self, column: str, key: str) -> str:
        """The integer at `key` of the JSON document in `column`."""

    @abc.abstractmethod
    def unavailable(self, exc: BaseException) -> bool:
        """Whether the error means the database cannot serve right now (not a bug in a query)."""

    @abc.abstractmethod
    def duplicate(self, exc: BaseException) -> bool:
        """Whether the error is a unique-key violation."""


class Session(abc.ABC):
    """Statements on one connection: autocommit, or inside a transaction (`SqlStore._transaction`)."""

    @abc.abstractmethod
    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement written with `?` placeholders and return its rows (also of an UPDATE ... RETURNING)."""

    @abc.abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement and return the number of rows it changed."""

    @abc.abstractmethod
    async def script(self, sql: str) -> None:
        """Run a migration file: several statements, no parameters."""


class SqlStore(MetadataStore):
    """The metadata store over a SQL backend: `dialect`, `_session`, `_transaction`, `connect` and `close` are the
    backend's; a new query goes here, once."""

    dialect: Dialect
    location: str  # where the database is, for logs and errors (never with a password)

    # --- plumbing ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _session(self) -> AbstractAsyncContextManager[Session]:
        """A connection for one autocommit statement."""

    @abc.abstractmethod
    def _transaction(self) -> AbstractAsyncContextManager[Session]:
        """A connection in a transaction (holding the write lock in SQLite), committed when the block ends and
        rolled back when it raises. Nothing else runs in it."""

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self._session() as session:
            return await session.rows(sql, params)

    async def _row(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        found = await self._rows(sql, params)
        return found[0] if found else None

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._session() as session:
            return await session.execute(sql, params)

    # --- lifecycle ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect without migrating (open() does both)."""

    async def open(self) -> None:
        await self.connect()
        await self.migrate()

    async def migrate(self, target: int | None = None) -> list[int]:
        """Apply pending migrations (up to `target`) in one transaction; returns the versions applied. The
        transaction takes a lock before reading what is applied, so processes starting together apply each
        migration once."""
        dialect = self.dialect
        async with self._transaction() as tx:
            if dialect.migration_lock:
                await tx.execute(dialect.migration_lock)
            await tx.execute(dialect.migrations_table)
            applied = {row["version"] for row in await tx.rows("SELECT version FROM schema_migrations")}
            done = []
            for migration in pending(dialect.name, applied, target):
                await tx.script(migration.sql)
                await tx.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (?, ?)", (migration.version, migration.name)
                )
                done.append(migration.version)
        newest = max(applied | set(done), default=0)
        if newest > latest_version(dialect.name):
            log.warning("store.schema_newer_than_code", database=self.location, version=newest)
        if done:
            log.info("store.migrated", database=self.location, versions=done)
        return done

    async def schema_version(self) -> int:
        row = await self._row("SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations")
        return int(row["version"]) if row else 0

    async def ping(self) -> None:
        await self._rows("SELECT version FROM schema_migrations LIMIT 1")

    # --- files -------------------------------------------------------------------------------

    async def insert_file(self, record: FileRecord) -> None:
        values = rows.file_values(record)
        await self._execute(
            f"INSERT INTO files ({_FILES}) VALUES ({marks(values)}) ON CONFLICT (id) DO NOTHING", values
        )

    async def get_file(self, file_id: str, tenant: str | None) -> FileRecord | None:
        scope, params = _tenant_scope(tenant)
        row = await self._row(
            f"SELECT {_FILES} FROM files WHERE id = ?{scope} AND deleted_at IS NULL", (file_id, *params)
        )
        return rows.file_from_row(row) if row else None

    async def list_files(
        self, tenant: str, *, purpose: str | None, order: str, after: str | None, limit: int
    ) -> tuple[list[FileRecord], bool]:
        rows.check_page(order, limit)
        clauses = ["tenant = ?", "deleted_at IS NULL"]
        params: list[Any] = [tenant]
        if purpose is not None:
            clauses.append("purpose = ?")
            params.append(purpose)
        if after is not None:
            # A file deleted since the client read its page keeps its place for a while (`file_cursors`).
            clauses.append(
                f"seq {'>' if order == 'asc' else '<'} COALESCE((SELECT seq FROM files WHERE id = ? AND tenant = ?), "
                "(SELECT seq FROM file_cursors WHERE id = ? AND tenant = ?))"
            )
            params += [after, tenant, after, tenant]
        found = await self._rows(
            f"SELECT {_FILES} FROM files WHERE {' AND '.join(clauses)} ORDER BY seq {order.upper()} LIMIT ?",
            (*params, limit + 1),
        )
        return [rows.file_from_row(r) for r in found[:limit]], len(found) > limit

    async def delete_file(self, file_id: str, tenant: str | None) -> bool:
        scope, params = _tenant_scope(tenant)
        async with self._transaction() as tx:
            await tx.execute(
                "INSERT INTO file_cursors (id, tenant, seq, deleted_at) "
                f"SELECT id, tenant, seq, COALESCE(deleted_at, ?) FROM files WHERE id = ?{scope} "
                "ON CONFLICT (id) DO NOTHING",
                (ids.now(), file_id, *params),
            )
            return await tx.execute(f"DELETE FROM files WHERE id = ?{scope}", (file_id, *params)) > 0

    async def forget_file_cursors(self, deleted_before: int) -> int:
        return await self._execute("DELETE FROM file_cursors WHERE deleted_at < ?", (deleted_before,))

    async def hide_file(self, file_id: str, tenant: str | None, now: int) -> FileRecord | None:
        scope, params = _tenant_scope(tenant)
        row = await self._row(
            f"UPDATE files SET deleted_at = ? WHERE id = ?{scope} AND deleted_at IS NULL RETURNING {_FILES}",
            (now, file_id, *params),
        )
        return rows.file_from_row(row) if row else None

    async def file_in_use(self, file_id: str) -> bool:
        d = self.dialect
        row = await self._row(
            f"SELECT 1 AS used FROM batches WHERE input_file_id = ? AND {d.one_of('status')} LIMIT 1",
            (file_id, d.values(rows.ACTIVE_STATUSES)),
        )
        return row is not None

    async def deletable_hidden_files(self, limit: int) -> list[FileRecord]:
        d = self.dialect
        found = await self._rows(
            f"SELECT {_FILES} FROM files AS f WHERE deleted_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM batches AS b "
            f"WHERE b.input_file_id = f.id AND b.tenant = f.tenant AND {d.one_of('b.status')}) "
            "ORDER BY deleted_at, seq LIMIT ?",
            (d.values(rows.ACTIVE_STATUSES), limit),
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
        await self._execute(f"INSERT INTO uploads ({_UPLOADS}) VALUES ({marks(values)})", values)

    async def get_upload(self, upload_id: str, tenant: str | None) -> UploadRecord | None:
        scope, params = _tenant_scope(tenant)
        row = await self._row(f"SELECT {_UPLOADS} FROM uploads WHERE id = ?{scope}", (upload_id, *params))
        return rows.upload_from_row(row) if row else None

    async def add_upload_part(self, part: UploadPartRecord, now: int) -> bool:
        # One statement: the part goes in only if, at that moment, its upload is pending and unexpired. A complete or
        # cancel committing meanwhile may still miss the part; such a part is never listed in a complete (its id was
        # not answered yet) and gc deletes it with the upload's other leftovers.
        values = rows.upload_part_values(part)
        inserted = await self._execute(
            f"INSERT INTO upload_parts ({_PARTS}) SELECT {marks(values)} WHERE EXISTS (SELECT 1 FROM uploads "
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
        clauses = ["id = ?", self.dialect.one_of("status")]
        params: list[Any] = [upload_id, self.dialect.values(sources)]
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
        async with self._transaction() as tx:
            found = await tx.rows(
                f"UPDATE uploads SET status = ?, file_id = ? WHERE id = ? AND status = ? RETURNING {_UPLOADS}",
                (UploadStatus.COMPLETED.value, file.id, upload_id, UploadStatus.COMPLETING.value),
            )
            if not found:
                return None
            values = rows.file_values(file)
            await tx.execute(
                f"INSERT INTO files ({_FILES}) VALUES ({marks(values)}) ON CONFLICT (id) DO NOTHING", values
            )
        return rows.upload_from_row(found[0])

    async def expire_uploads(self, now: int, limit: int) -> list[UploadRecord]:
        d = self.dialect
        found = await self._rows(
            f"UPDATE uploads SET status = ? WHERE seq IN (SELECT seq FROM uploads WHERE {d.one_of('status')} "
            f"AND expires_at <= ? ORDER BY expires_at, seq LIMIT ?{d.skip_locked}) RETURNING {_UPLOADS}",
            (UploadStatus.EXPIRED.value, d.values(OPEN_UPLOAD_STATUSES), now, limit),
        )
        return [rows.upload_from_row(r) for r in found]

    async def stale_upload_parts(self, limit: int) -> list[UploadPartRecord]:
        d = self.dialect
        found = await self._rows(
            f"SELECT {_PARTS} FROM upload_parts AS p WHERE NOT EXISTS (SELECT 1 FROM uploads AS u WHERE "
            f"u.id = p.upload_id AND {d.one_of('u.status')}) ORDER BY seq LIMIT ?",
            (d.values(OPEN_UPLOAD_STATUSES), limit),
        )
        return [rows.upload_part_from_row(r) for r in found]

    async def delete_upload_part(self, part_id: str) -> None:
        await self._execute("DELETE FROM upload_parts WHERE id = ?", (part_id,))

    # --- batches -----------------------------------------------------------------------------

    async def insert_batch(self, record: BatchRecord) -> tuple[BatchRecord, bool]:
        values = rows.batch_values(record, json=self.dialect.json)
        # The conflict target is the partial unique index (tenant, idempotency_key): a concurrent insert with the
        # same key waits for the winner's commit (or, in SQLite, for the write lock), does nothing, and then reads
        # the winner.
        inserted = await self._execute(
            f"INSERT INTO batches ({_BATCHES}) VALUES ({marks(values)}) "
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
        # nothing, in one statement: the primary key lets exactly one of concurrent claims win (in PostgreSQL a
        # concurrent claim waits on the row and then sees the winner's values).
        condition, params = ("", ()) if older_than is None else (" WHERE batch_folds.created_at < ?", (older_than,))
        claimed = await self._row(
            "INSERT INTO batch_folds (tenant, fingerprint, batch_id, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (tenant, fingerprint) DO UPDATE SET batch_id = excluded.batch_id, "
            f"created_at = excluded.created_at{condition} RETURNING batch_id",
            (tenant, fingerprint, batch_id, now, *params),
        )
        if claimed is not None:
            return str(claimed["batch_id"])
        holder = await self._row(
            "SELECT batch_id FROM batch_folds WHERE tenant = ? AND fingerprint = ?", (tenant, fingerprint)
        )
        return str(holder["batch_id"]) if holder else None

    async def release_fold(self, tenant: str, fingerprint: str, batch_id: str) -> None:
        await self._execute(
            "DELETE FROM batch_folds WHERE tenant = ? AND fingerprint = ? AND batch_id = ?",
            (tenant, fingerprint, batch_id),
        )

    async def get_batch(self, batch_id: str, tenant: str | None) -> BatchRecord | None:
        scope, params = _tenant_scope(tenant)
        row = await self._row(f"SELECT {_BATCHES} FROM batches WHERE id = ?{scope}", (batch_id, *params))
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
        sets = ["status = ?"]
        params: list[Any] = [to_status]
        if stamp is not None:
            sets.append(f"{stamp} = COALESCE({stamp}, ?)")
            params.append(now)
        for name, value in changes.items():
            sets.append(f"{name} = ?")
            params.append(self.dialect.json(value) if name in rows.BATCH_JSON_TYPES else value)
        row = await self._row(
            f"UPDATE batches SET {', '.join(sets)} WHERE id = ? AND {self.dialect.one_of('status')} "
            f"RETURNING {_BATCHES}",
            (*params, batch_id, self.dialect.values(sources)),
        )
        return rows.batch_from_row(row) if row else None

    async def save_progress(self, batch_id: str, counts: wire.RequestCounts, usage: wire.Usage | None) -> None:
        # Only while running, and never backwards: a stale writer (a runner resumed from an older checkpoint, a
        # delayed update) cannot undo newer progress.
        d = self.dialect
        done = f"{d.json_int('request_counts', 'completed')} + {d.json_int('request_counts', 'failed')}"
        await self._execute(
            f"UPDATE batches SET request_counts = ?, usage = ? WHERE id = ? AND {d.one_of('status')} AND {done} <= ?",
            (d.json(counts), d.json(usage), batch_id, d.values(rows.LIVE_STATUSES), counts.completed + counts.failed),
        )

    async def batches_with_status(self, statuses: Collection[str], limit: int = 1000) -> list[BatchRecord]:
        wanted = rows.checked_statuses(statuses)
        if not wanted:
            return []
        found = await self._rows(
            f"SELECT {_BATCHES} FROM batches WHERE {self.dialect.one_of('status')} ORDER BY seq LIMIT ?",
            (self.dialect.values(wanted), limit),
        )
        return [rows.batch_from_row(r) for r in found]

    async def overdue_batches(self, now: int, limit: int = 1000) -> list[BatchRecord]:
        found = await self._rows(
            f"SELECT {_BATCHES} FROM batches WHERE {self.dialect.one_of('status')} AND expires_at <= ? "
            "ORDER BY expires_at, seq LIMIT ?",
            (self.dialect.values(rows.ACTIVE_STATUSES), now, limit),
        )
        return [rows.batch_from_row(r) for r in found]

    async def storage_stats(self, now: int | None = None) -> StorageStats:
        """Whole-table counts (all tenants): GROUP BY over the status index and the files table, cheap enough for a
        metrics scrape."""
        batches = await self._rows("SELECT status, COUNT(*) AS n FROM batches GROUP BY status")
        files = await self._rows(
            "SELECT purpose, COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS bytes FROM files GROUP BY purpose"
        )
        now = ids.now() if now is None else now
        deadlines = await self._row(DEADLINES_SQL, (now, now, now))
        return StorageStats(
            batches_by_status={row["status"]: int(row["n"]) for row in batches},
            files_by_purpose={row["purpose"]: (int(row["n"]), int(row["bytes"])) for row in files},
            overdue_batches=int(deadlines["overdue"]) if deadlines else 0,
            near_deadline_batches=int(deadlines["near"]) if deadlines else 0,
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
        found = await self._rows(
            f"SELECT id FROM batches WHERE {self.dialect.one_of('status')} "
            "AND runner_owner IS NOT NULL AND lease_until >= ?",
            (self.dialect.values(rows.ACTIVE_STATUSES), now),
        )
        return {row["id"] for row in found}

    # --- the load board ----------------------------------------------------------------------

    async def share_load(self, endpoint: str, load: RunnerLoad, fresh_after: float) -> list[RunnerLoad]:
        await self._execute(
            f"INSERT INTO runner_loads (endpoint, {_LOADS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            'ON CONFLICT (endpoint, owner) DO UPDATE SET inflight = excluded.inflight, "limit" = excluded."limit", '
            "demand = excluded.demand, completed = excluded.completed, weight = excluded.weight, at = excluded.at, "
            "tenant = excluded.tenant, budget = excluded.budget",
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
                load.budget,
            ),
        )
        found = await self._rows(
            f"SELECT {_LOADS} FROM runner_loads WHERE endpoint = ? AND owner <> ? AND at > ?",
            (endpoint, load.owner, fresh_after),
        )
        return [rows.runner_load_from_row(row) for row in found]

    async def withdraw_load(self, owner: str, older_than: float) -> None:
        await self._execute("DELETE FROM runner_loads WHERE owner = ? OR at < ?", (owner, older_than))

    # --- deadlines: tenants' admission policies, running batches' forecasts -------------------

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
        await self._execute("UPDATE batches SET forecast = ? WHERE id = ?", (self.dialect.json(forecast), batch_id))

    async def forecasts(self, batch_ids: Collection[str]) -> dict[str, BatchForecast]:
        if not batch_ids:
            return {}
        found = await self._rows(
            f"SELECT id, forecast FROM batches WHERE {self.dialect.one_of('id')} AND forecast IS NOT NULL",
            (self.dialect.values(sorted(batch_ids)),),
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
        pending_state = WebhookState.PENDING.value
        # Polled every second: look first, so that an idle outbox costs a read and never the write lock (SQLite takes
        # it for an UPDATE even when it changes nothing).
        due = await self._row(
            "SELECT 1 AS due FROM webhook_events WHERE state = ? AND due_at <= ? LIMIT 1", (pending_state, now)
        )
        if due is None:
            return []
        found = await self._rows(
            "UPDATE webhook_events SET due_at = ?, attempts = attempts + 1 WHERE seq IN (SELECT seq FROM "
            f"webhook_events WHERE state = ? AND due_at <= ? ORDER BY due_at, seq LIMIT ?{self.dialect.skip_locked}) "
            f"RETURNING {_EVENTS}, seq",
            (now + lease_seconds, pending_state, now, limit),
        )
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
            await self._execute(f"INSERT INTO api_keys ({_KEYS}) VALUES ({marks(values)})", values)
        except Exception as exc:
            if self.dialect.duplicate(exc):
                raise ValueError(f"API key {record.id} (or its hash) already exists") from exc
            raise

    async def list_keys(self) -> list[ApiKeyRecord]:
        found = await self._rows(f"SELECT {_KEYS} FROM api_keys ORDER BY created_at, id")
        return [rows.key_from_row(r) for r in found]

    async def revoke_key(self, key_id: str, now: int) -> bool:
        revoked = await self._execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, key_id)
        )
        return revoked > 0

    async def active_key_count(self) -> int:
        row = await self._row("SELECT COUNT(*) AS n FROM api_keys WHERE revoked_at IS NULL")
        return int(row["n"]) if row else 0

    async def tenant_for_key_hash(self, key_hash: str) -> str | None:
        row = await self._row("SELECT tenant FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", (key_hash,))
        return str(row["tenant"]) if row else None


def _tenant_scope(tenant: str | None) -> tuple[str, tuple[str, ...]]:
    """The condition scoping a query to `tenant` (None: the service's own view, every tenant)."""
    return ("", ()) if tenant is None else (" AND tenant = ?", (tenant,))
