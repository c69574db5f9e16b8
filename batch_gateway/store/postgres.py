"""The production metadata store: PostgreSQL through psycopg 3 and a connection pool.

Outages: a connection failure or a pool timeout becomes `StorageUnavailable` (the API answers 503, runners retry).
The pool checks each connection as it hands it out, so connections killed by a server restart or a failover are
replaced instead of failing a request, and it reconnects by itself once the server is back.

Cursor pagination looks up the `seq` of the `after` object inside the query; an `after` that is unknown, deleted or
another tenant's gives an empty page. `seq` comes from a sequence, so it follows insertion, not commit, order: a row
committed late with a lower `seq` can be missed by a page that was already read, which the API can live with.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any

import msgspec
import psycopg
import structlog
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import AsyncConnectionPool

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

_FILES = ", ".join(rows.FILE_COLUMNS)
_BATCHES = ", ".join(rows.BATCH_COLUMNS)
_KEYS = ", ".join(rows.KEY_COLUMNS)
_EVENTS = ", ".join(f"e.{name}" for name in rows.WEBHOOK_EVENT_COLUMNS)
_UPLOADS = ", ".join(rows.UPLOAD_COLUMNS)
_PARTS = ", ".join(rows.UPLOAD_PART_COLUMNS)

# pg_advisory_xact_lock key serialising migrations across processes ("bgmigr").
MIGRATION_LOCK = 0x62676D696772


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("%s" for _ in values)


def _jsonb(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value, dumps=msgspec.json.encode)


async def _configure(connection: psycopg.AsyncConnection) -> None:
    # Hand json/jsonb over undecoded: msgspec decodes it straight into the record types.
    set_json_loads(lambda data: data, connection)


# Active batches past their deadline, and in the last fifth of their window (metrics, alerts).
DEADLINES_SQL = (
    "SELECT COALESCE(SUM(CASE WHEN expires_at <= %s THEN 1 ELSE 0 END), 0) AS overdue, "
    "COALESCE(SUM(CASE WHEN expires_at > %s AND (expires_at - %s) * "
    f"{NEAR_DEADLINE_FRACTION}"
    " < expires_at - created_at "
    "THEN 1 ELSE 0 END), 0) AS near FROM batches "
    "WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling')"
)


class PostgresStore(MetadataStore):
    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 8,
        timeout: float = 5.0,
        connect_timeout: int = 5,
        reconnect_timeout: float = 30.0,
    ) -> None:
        """`timeout` bounds the wait for a pooled connection (how long a request waits before a 503);
        `reconnect_timeout` bounds the pool's backoff between reconnection attempts during an outage."""
        self.url = url
        self._pool_options = dict(
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            reconnect_timeout=reconnect_timeout,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": connect_timeout},
        )
        self._pool: AsyncConnectionPool | None = None

    # --- plumbing ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection]:
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open")
        try:
            async with self._pool.connection() as connection:
                yield connection
        except psycopg.OperationalError as exc:  # includes the pool's PoolTimeout and PoolClosed
            raise StorageUnavailable(f"PostgreSQL: {exc}") from exc

    async def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        async with self._connection() as connection:
            cursor = await connection.execute(sql, params)
            return await cursor.fetchall()

    async def _row(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        found = await self._rows(sql, params)
        return found[0] if found else None

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._connection() as connection:
            cursor = await connection.execute(sql, params)
            return cursor.rowcount

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        await self.connect()
        await self.migrate()

    async def connect(self) -> None:
        """Open the connection pool without migrating (open() does both); waits for the first connection."""
        if self._pool is None:
            pool = AsyncConnectionPool(
                self.url,
                open=False,
                configure=_configure,
                check=AsyncConnectionPool.check_connection,
                name="batch-gateway-metadata",
                **self._pool_options,
            )
            try:
                await pool.open(wait=True, timeout=self._pool_options["timeout"])
            except psycopg.OperationalError as exc:
                await pool.close()
                raise StorageUnavailable(f"PostgreSQL: {exc}") from exc
            self._pool = pool

    async def migrate(self, target: int | None = None) -> list[int]:
        """Apply pending migrations (up to `target`) in one transaction; returns the versions applied. An advisory
        lock makes processes starting together take turns, so each migration is applied once."""
        async with self._connection() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cursor = await connection.execute("SELECT version FROM schema_migrations")
            applied = {row["version"] for row in await cursor.fetchall()}
            done = []
            for migration in pending("postgres", applied, target):
                await connection.execute(migration.sql)  # no parameters: the file may hold several statements
                await connection.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (migration.version, migration.name)
                )
                done.append(migration.version)
        if max(applied | set(done), default=0) > latest_version("postgres"):
            log.warning("store.schema_newer_than_code", version=max(applied))
        if done:
            log.info("store.migrated", versions=done)
        return done

    async def schema_version(self) -> int:
        row = await self._row("SELECT COALESCE(MAX(version), 0) AS version FROM schema_migrations")
        return int(row["version"]) if row else 0

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def ping(self) -> None:
        await self._rows("SELECT 1 AS ok")

    # --- files -------------------------------------------------------------------------------

    async def insert_file(self, record: FileRecord) -> None:
        values = rows.file_values(record)
        await self._execute(
            f"INSERT INTO files ({_FILES}) VALUES ({_marks(values)}) ON CONFLICT (id) DO NOTHING", values
        )

    async def get_file(self, file_id: str, tenant: str | None) -> FileRecord | None:
        if tenant is None:
            row = await self._row(f"SELECT {_FILES} FROM files WHERE id = %s AND deleted_at IS NULL", (file_id,))
        else:
            row = await self._row(
                f"SELECT {_FILES} FROM files WHERE id = %s AND tenant = %s AND deleted_at IS NULL", (file_id, tenant)
            )
        return rows.file_from_row(row) if row else None

    async def list_files(
        self, tenant: str, *, purpose: str | None, order: str, after: str | None, limit: int
    ) -> tuple[list[FileRecord], bool]:
        rows.check_page(order, limit)
        clauses, params = ["tenant = %s", "deleted_at IS NULL"], [tenant]
        if purpose is not None:
            clauses.append("purpose = %s")
            params.append(purpose)
        if after is not None:
            clauses.append(
                f"seq {'>' if order == 'asc' else '<'} (SELECT seq FROM files WHERE id = %s AND tenant = %s)"
            )
            params += [after, tenant]
        found = await self._rows(
            f"SELECT {_FILES} FROM files WHERE {' AND '.join(clauses)} ORDER BY seq {order.upper()} LIMIT %s",
            (*params, limit + 1),
        )
        return [rows.file_from_row(r) for r in found[:limit]], len(found) > limit

    async def delete_file(self, file_id: str, tenant: str | None) -> bool:
        if tenant is None:
            return await self._execute("DELETE FROM files WHERE id = %s", (file_id,)) > 0
        return await self._execute("DELETE FROM files WHERE id = %s AND tenant = %s", (file_id, tenant)) > 0

    async def hide_file(self, file_id: str, tenant: str | None, now: int) -> FileRecord | None:
        scope, params = ("", ()) if tenant is None else (" AND tenant = %s", (tenant,))
        row = await self._row(
            f"UPDATE files SET deleted_at = %s WHERE id = %s{scope} AND deleted_at IS NULL RETURNING {_FILES}",
            (now, file_id, *params),
        )
        return rows.file_from_row(row) if row else None

    async def file_in_use(self, file_id: str) -> bool:
        row = await self._row(
            "SELECT 1 AS used FROM batches WHERE input_file_id = %s AND status = ANY(%s) LIMIT 1",
            (file_id, list(rows.ACTIVE_STATUSES)),
        )
        return row is not None

    async def deletable_hidden_files(self, limit: int) -> list[FileRecord]:
        found = await self._rows(
            f"SELECT {_FILES} FROM files AS f WHERE deleted_at IS NOT NULL AND NOT EXISTS (SELECT 1 FROM batches AS b "
            "WHERE b.input_file_id = f.id AND b.tenant = f.tenant AND b.status = ANY(%s)) "
            "ORDER BY deleted_at, seq LIMIT %s",
            (list(rows.ACTIVE_STATUSES), limit),
        )
        return [rows.file_from_row(r) for r in found]

    async def expired_files(self, now: int, limit: int) -> list[FileRecord]:
        found = await self._rows(
            f"SELECT {_FILES} FROM files WHERE expires_at <= %s AND deleted_at IS NULL "
            "ORDER BY expires_at, seq LIMIT %s",
            (now, limit),
        )
        return [rows.file_from_row(r) for r in found]

    # --- uploads -----------------------------------------------------------------------------

    async def insert_upload(self, record: UploadRecord) -> None:
        values = rows.upload_values(record)
        await self._execute(f"INSERT INTO uploads ({_UPLOADS}) VALUES ({_marks(values)})", values)

    async def get_upload(self, upload_id: str, tenant: str | None) -> UploadRecord | None:
        scope, params = ("", ()) if tenant is None else (" AND tenant = %s", (tenant,))
        row = await self._row(f"SELECT {_UPLOADS} FROM uploads WHERE id = %s{scope}", (upload_id, *params))
        return rows.upload_from_row(row) if row else None

    async def add_upload_part(self, part: UploadPartRecord, now: int) -> bool:
        # One statement: the part goes in only if, at that moment, its upload is pending and unexpired. A complete or
        # cancel committing meanwhile may still miss the part; such a part is never listed in a complete (its id was
        # not answered yet) and gc deletes it with the upload's other leftovers.
        values = rows.upload_part_values(part)
        inserted = await self._execute(
            f"INSERT INTO upload_parts ({_PARTS}) SELECT {_marks(values)} WHERE EXISTS (SELECT 1 FROM uploads "
            "WHERE id = %s AND tenant = %s AND status = %s AND expires_at > %s)",
            (*values, part.upload_id, part.tenant, UploadStatus.PENDING.value, now),
        )
        return inserted > 0

    async def upload_parts(self, upload_id: str) -> list[UploadPartRecord]:
        found = await self._rows(f"SELECT {_PARTS} FROM upload_parts WHERE upload_id = %s ORDER BY seq", (upload_id,))
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
        clauses, params = ["id = %s", "status = ANY(%s)"], [upload_id, sources]
        if tenant is not None:
            clauses.append("tenant = %s")
            params.append(tenant)
        if unexpired_at is not None:
            clauses.append("expires_at > %s")
            params.append(unexpired_at)
        row = await self._row(
            f"UPDATE uploads SET status = %s WHERE {' AND '.join(clauses)} RETURNING {_UPLOADS}", (to_status, *params)
        )
        return rows.upload_from_row(row) if row else None

    async def complete_upload(self, upload_id: str, file: FileRecord) -> UploadRecord | None:
        async with self._connection() as connection, connection.transaction():
            cursor = await connection.execute(
                f"UPDATE uploads SET status = %s, file_id = %s WHERE id = %s AND status = %s RETURNING {_UPLOADS}",
                (UploadStatus.COMPLETED.value, file.id, upload_id, UploadStatus.COMPLETING.value),
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            values = rows.file_values(file)
            await connection.execute(
                f"INSERT INTO files ({_FILES}) VALUES ({_marks(values)}) ON CONFLICT (id) DO NOTHING", values
            )
        return rows.upload_from_row(row)

    async def expire_uploads(self, now: int, limit: int) -> list[UploadRecord]:
        found = await self._rows(
            "WITH due AS (SELECT seq FROM uploads WHERE status = ANY(%s) AND expires_at <= %s "
            "ORDER BY expires_at, seq LIMIT %s FOR UPDATE SKIP LOCKED) "
            f"UPDATE uploads u SET status = %s FROM due WHERE u.seq = due.seq "
            f"RETURNING {', '.join('u.' + name for name in rows.UPLOAD_COLUMNS)}",
            (list(OPEN_UPLOAD_STATUSES), now, limit, UploadStatus.EXPIRED.value),
        )
        return [rows.upload_from_row(r) for r in found]

    async def stale_upload_parts(self, limit: int) -> list[UploadPartRecord]:
        found = await self._rows(
            f"SELECT {_PARTS} FROM upload_parts AS p WHERE NOT EXISTS (SELECT 1 FROM uploads AS u WHERE "
            "u.id = p.upload_id AND u.status = ANY(%s)) ORDER BY seq LIMIT %s",
            (list(OPEN_UPLOAD_STATUSES), limit),
        )
        return [rows.upload_part_from_row(r) for r in found]

    async def delete_upload_part(self, part_id: str) -> None:
        await self._execute("DELETE FROM upload_parts WHERE id = %s", (part_id,))

    # --- batches -----------------------------------------------------------------------------

    async def insert_batch(self, record: BatchRecord) -> tuple[BatchRecord, bool]:
        values = rows.batch_values(record, json=_jsonb)
        # The conflict target is the partial unique index (tenant, idempotency_key): a concurrent insert with the
        # same key waits for the winner's commit, does nothing, and then reads the winner.
        inserted = await self._execute(
            f"INSERT INTO batches ({_BATCHES}) VALUES ({_marks(values)}) "
            "ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
            values,
        )
        if inserted:
            return record, True
        row = await self._row(
            f"SELECT {_BATCHES} FROM batches WHERE tenant = %s AND idempotency_key = %s",
            (record.tenant, record.idempotency_key),
        )
        if row is None:  # batches are never deleted, so the winner is there
            raise StorageUnavailable(f"batch with idempotency key {record.idempotency_key!r} vanished")
        return rows.batch_from_row(row), False

    async def claim_fold(
        self, tenant: str, fingerprint: str, batch_id: str, now: int, older_than: int | None
    ) -> str | None:
        # The upsert takes the fingerprint over, or (a retry, the recorded batch being recent) leaves it and returns
        # nothing, in one statement: a concurrent claim waits on the row and then sees the winner's values.
        condition = "" if older_than is None else " WHERE batch_folds.created_at < %s"
        claimed = await self._row(
            "INSERT INTO batch_folds (tenant, fingerprint, batch_id, created_at) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (tenant, fingerprint) DO UPDATE SET batch_id = excluded.batch_id, "
            f"created_at = excluded.created_at{condition} RETURNING batch_id",
            (tenant, fingerprint, batch_id, now, *(() if older_than is None else (older_than,))),
        )
        if claimed is not None:
            return claimed["batch_id"]
        holder = await self._row(
            "SELECT batch_id FROM batch_folds WHERE tenant = %s AND fingerprint = %s", (tenant, fingerprint)
        )
        return holder["batch_id"] if holder else None

    async def release_fold(self, tenant: str, fingerprint: str, batch_id: str) -> None:
        await self._execute(
            "DELETE FROM batch_folds WHERE tenant = %s AND fingerprint = %s AND batch_id = %s",
            (tenant, fingerprint, batch_id),
        )

    async def get_batch(self, batch_id: str, tenant: str | None) -> BatchRecord | None:
        if tenant is None:
            row = await self._row(f"SELECT {_BATCHES} FROM batches WHERE id = %s", (batch_id,))
        else:
            row = await self._row(f"SELECT {_BATCHES} FROM batches WHERE id = %s AND tenant = %s", (batch_id, tenant))
        return rows.batch_from_row(row) if row else None

    async def list_batches(self, tenant: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        rows.check_page("desc", limit)
        if after is None:
            found = await self._rows(
                f"SELECT {_BATCHES} FROM batches WHERE tenant = %s ORDER BY seq DESC LIMIT %s", (tenant, limit + 1)
            )
        else:
            found = await self._rows(
                f"SELECT {_BATCHES} FROM batches WHERE tenant = %s "
                "AND seq < (SELECT seq FROM batches WHERE id = %s AND tenant = %s) ORDER BY seq DESC LIMIT %s",
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
        sets, params = ["status = %s"], [to_status]
        if stamp is not None:
            sets.append(f"{stamp} = COALESCE({stamp}, %s)")
            params.append(now)
        for name, value in changes.items():
            sets.append(f"{name} = %s")
            params.append(_jsonb(value) if name in rows.BATCH_JSON_TYPES else value)
        row = await self._row(
            f"UPDATE batches SET {', '.join(sets)} WHERE id = %s AND status = ANY(%s) RETURNING {_BATCHES}",
            (*params, batch_id, sources),
        )
        return rows.batch_from_row(row) if row else None

    async def save_progress(self, batch_id: str, counts: wire.RequestCounts, usage: wire.Usage | None) -> None:
        # Only while running, and never backwards: a stale writer (a runner resumed from an older checkpoint, a
        # delayed update) cannot undo newer progress.
        await self._execute(
            "UPDATE batches SET request_counts = %s, usage = %s WHERE id = %s AND status = ANY(%s) "
            "AND (request_counts->>'completed')::bigint + (request_counts->>'failed')::bigint <= %s",
            (_jsonb(counts), _jsonb(usage), batch_id, list(rows.LIVE_STATUSES), counts.completed + counts.failed),
        )

    async def batches_with_status(self, statuses: Collection[str], limit: int = 1000) -> list[BatchRecord]:
        wanted = rows.checked_statuses(statuses)
        found = await self._rows(
            f"SELECT {_BATCHES} FROM batches WHERE status = ANY(%s) ORDER BY seq LIMIT %s", (wanted, limit)
        )
        return [rows.batch_from_row(r) for r in found]

    async def overdue_batches(self, now: int, limit: int = 1000) -> list[BatchRecord]:
        found = await self._rows(
            f"SELECT {_BATCHES} FROM batches WHERE status = ANY(%s) AND expires_at <= %s "
            "ORDER BY expires_at, seq LIMIT %s",
            (list(rows.ACTIVE_STATUSES), now, limit),
        )
        return [rows.batch_from_row(r) for r in found]

    async def storage_stats(self, now: int | None = None) -> StorageStats:
        """Whole-table counts (all tenants) for a metrics scrape."""
        batches = await self._rows("SELECT status, COUNT(*) AS n FROM batches GROUP BY status")
        files = await self._rows(
            "SELECT purpose, COUNT(*) AS n, COALESCE(SUM(bytes), 0) AS bytes FROM files GROUP BY purpose"
        )
        now = ids.now() if now is None else now
        deadlines = await self._row(DEADLINES_SQL, (now, now, now))
        return StorageStats(
            batches_by_status={row["status"]: row["n"] for row in batches},
            files_by_purpose={row["purpose"]: (row["n"], int(row["bytes"])) for row in files},
            overdue_batches=int(deadlines["overdue"]) if deadlines else 0,
            near_deadline_batches=int(deadlines["near"]) if deadlines else 0,
        )

    # --- leases ------------------------------------------------------------------------------

    async def claim_batch(self, batch_id: str, owner: str, now: int, lease_seconds: int) -> bool:
        taken = await self._execute(
            "UPDATE batches SET runner_owner = %s, lease_until = %s WHERE id = %s "
            "AND (runner_owner IS NULL OR runner_owner = %s OR lease_until IS NULL OR lease_until < %s)",
            (owner, now + lease_seconds, batch_id, owner, now),
        )
        return taken > 0

    async def renew_lease(self, batch_id: str, owner: str, now: int, lease_seconds: int) -> bool:
        renewed = await self._execute(
            "UPDATE batches SET lease_until = %s WHERE id = %s AND runner_owner = %s",
            (now + lease_seconds, batch_id, owner),
        )
        return renewed > 0

    async def release_batch(self, batch_id: str, owner: str) -> None:
        await self._execute(
            "UPDATE batches SET runner_owner = NULL, lease_until = NULL WHERE id = %s AND runner_owner = %s",
            (batch_id, owner),
        )

    async def leased_batches(self, now: int) -> set[str]:
        active = rows.ACTIVE_STATUSES
        found = await self._rows(
            "SELECT id FROM batches WHERE status = ANY(%s) AND runner_owner IS NOT NULL AND lease_until >= %s",
            (list(active), now),
        )
        return {row["id"] for row in found}

    # --- the load board ----------------------------------------------------------------------

    async def share_load(self, endpoint: str, load: RunnerLoad, fresh_after: float) -> list[RunnerLoad]:
        # "limit" is quoted: a reserved word in PostgreSQL.
        await self._execute(
            'INSERT INTO runner_loads (endpoint, owner, inflight, "limit", demand, completed, weight, at, tenant) '
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (endpoint, owner) DO UPDATE SET "
            'inflight = EXCLUDED.inflight, "limit" = EXCLUDED."limit", demand = EXCLUDED.demand, '
            "completed = EXCLUDED.completed, weight = EXCLUDED.weight, at = EXCLUDED.at, tenant = EXCLUDED.tenant",
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
            "WHERE endpoint = %s AND owner <> %s AND at > %s",
            (endpoint, load.owner, fresh_after),
        )
        return [rows.runner_load_from_row(row) for row in found]

    async def withdraw_load(self, owner: str, older_than: float) -> None:
        await self._execute("DELETE FROM runner_loads WHERE owner = %s OR at < %s", (owner, older_than))

    # --- deadlines ------------------------------------------------------------------------

    async def set_tenant_policy(self, tenant: str, policy: TenantPolicy) -> None:
        await self._execute(
            "INSERT INTO tenants (name, weight, max_running) VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
            "weight = EXCLUDED.weight, max_running = EXCLUDED.max_running",
            (tenant, policy.weight, policy.max_running),
        )

    async def tenant_policies(self) -> dict[str, TenantPolicy]:
        found = await self._rows("SELECT name, weight, max_running FROM tenants")
        return {row["name"]: TenantPolicy(row["weight"], row["max_running"]) for row in found}

    async def save_forecast(self, batch_id: str, forecast: BatchForecast) -> None:
        await self._execute("UPDATE batches SET forecast = %s WHERE id = %s", (_jsonb(forecast), batch_id))

    async def forecasts(self, batch_ids: Collection[str]) -> dict[str, BatchForecast]:
        wanted = sorted(batch_ids)
        if not wanted:
            return {}
        found = await self._rows(
            "SELECT id, forecast FROM batches WHERE id = ANY(%s) AND forecast IS NOT NULL", (wanted,)
        )
        return {row["id"]: rows.forecast_from_json(row["forecast"]) for row in found}

    async def add_webhook_event(self, event_id: str, batch_id: str, tenant: str, type: str, now: int) -> bool:
        added = await self._execute(
            "INSERT INTO webhook_events (id, batch_id, tenant, type, created_at, due_at) "
            "VALUES (%s, %s, %s, %s, %s, 0) ON CONFLICT (id) DO NOTHING",
            (event_id, batch_id, tenant, type, now),
        )
        return added > 0

    # --- webhook outbox --------------------------------------------------------------------

    async def claim_webhook_events(self, now: float, lease_seconds: float, limit: int) -> list[WebhookEventRecord]:
        # SKIP LOCKED: a deliverer claiming at the same moment takes other rows instead of waiting for these.
        found = await self._rows(
            "WITH due AS (SELECT seq FROM webhook_events WHERE state = %s AND due_at <= %s "
            "ORDER BY due_at, seq LIMIT %s FOR UPDATE SKIP LOCKED) "
            "UPDATE webhook_events e SET due_at = %s, attempts = e.attempts + 1 FROM due WHERE e.seq = due.seq "
            f"RETURNING {_EVENTS}, e.seq",
            (WebhookState.PENDING.value, now, limit, now + lease_seconds),
        )
        return [rows.webhook_event_from_row(r) for r in sorted(found, key=lambda r: r["seq"])]

    async def reschedule_webhook_event(self, event_id: str, due_at: float, error: str) -> None:
        await self._execute(
            "UPDATE webhook_events SET due_at = %s, last_error = %s WHERE id = %s AND state = %s",
            (due_at, error, event_id, WebhookState.PENDING.value),
        )

    async def finish_webhook_event(
        self, event_id: str, state: WebhookState, now: int, error: str | None = None
    ) -> None:
        await self._execute(
            "UPDATE webhook_events SET state = %s, finished_at = %s, last_error = COALESCE(%s, last_error) "
            "WHERE id = %s AND state = %s",
            (state.value, now, error, event_id, WebhookState.PENDING.value),
        )

    # --- keys --------------------------------------------------------------------------------

    async def insert_key(self, record: ApiKeyRecord) -> None:
        values = rows.key_values(record)
        try:
            await self._execute(f"INSERT INTO api_keys ({_KEYS}) VALUES ({_marks(values)})", values)
        except psycopg.errors.UniqueViolation as exc:
            raise ValueError(f"API key {record.id} (or its hash) already exists") from exc

    async def list_keys(self) -> list[ApiKeyRecord]:
        found = await self._rows(f"SELECT {_KEYS} FROM api_keys ORDER BY created_at, id")
        return [rows.key_from_row(r) for r in found]

    async def revoke_key(self, key_id: str, now: int) -> bool:
        revoked = await self._execute(
            "UPDATE api_keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL", (now, key_id)
        )
        return revoked > 0

    async def active_key_count(self) -> int:
        row = await self._row("SELECT COUNT(*) AS n FROM api_keys WHERE revoked_at IS NULL")
        return int(row["n"]) if row else 0

    async def tenant_for_key_hash(self, key_hash: str) -> str | None:
        row = await self._row("SELECT tenant FROM api_keys WHERE key_hash = %s AND revoked_at IS NULL", (key_hash,))
        return row["tenant"] if row else None
