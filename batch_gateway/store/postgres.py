"""The production metadata store: PostgreSQL through psycopg 3 and a connection pool.

Outages: a connection failure or a pool timeout becomes `StorageUnavailable` (the API answers 503, runners retry).
The pool checks each connection as it hands it out, so connections killed by a server restart or a failover are
replaced instead of failing a request, and it reconnects by itself once the server is back.

`seq` comes from a sequence, so it follows insertion, not commit, order: a row committed late with a lower `seq` can
be missed by a page that was already read, which the API can live with.

The queries are in `sql_store.py`; this module is the connection pool and the dialect.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any

import msgspec
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import AsyncConnectionPool

from batch_gateway.errors import StorageUnavailable
from batch_gateway.store.sql_store import Dialect, Row, Session, SqlStore

# pg_advisory_xact_lock key serialising migrations across processes ("bgmigr").
MIGRATION_LOCK = 0x62676D696772


class PostgresDialect(Dialect):
    name = "postgres"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    migrations_table = (
        "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
        "applied_at timestamptz NOT NULL DEFAULT now())"
    )
    migration_lock = f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"

    def one_of(self, column: str) -> str:
        return f"{column} = ANY(?)"

    def values(self, items: Collection[str]) -> list[str]:
        return list(items)

    def json(self, value: Any) -> Jsonb | None:
        return None if value is None else Jsonb(value, dumps=msgspec.json.encode)

    def json_int(self, column: str, key: str) -> str:
        return f"({column}->>'{key}')::bigint"

    def unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.OperationalError)  # includes the pool's PoolTimeout and PoolClosed

    def duplicate(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.errors.UniqueViolation)


@functools.lru_cache(maxsize=512)
def placeholders(sql: str) -> str:
    """The query as psycopg wants it: `%s` for each `?`, and a literal `%` doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Session(Session):
    def __init__(self, connection: psycopg.AsyncConnection[DictRow]) -> None:
        self.connection = connection

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cursor = await self.connection.execute(placeholders(sql), params)
        return await cursor.fetchall()

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self.connection.execute(placeholders(sql), params)
        return cursor.rowcount

    async def script(self, sql: str) -> None:
        await self.connection.execute(sql)  # without parameters psycopg sends it as is, several statements at once


async def _configure(connection: psycopg.AsyncConnection[DictRow]) -> None:
    # Hand json/jsonb over undecoded: msgspec decodes it straight into the record types.
    set_json_loads(lambda data: data, connection)


def _location(url: str) -> str:
    """The server and database of `url`, without credentials."""
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql"
    return f"postgresql://{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"


class PostgresStore(SqlStore):
    dialect = PostgresDialect()

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
        self.location = _location(url)
        self.timeout = timeout
        self._pool_options: dict[str, Any] = dict(
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            reconnect_timeout=reconnect_timeout,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": connect_timeout},
        )
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[DictRow]] | None = None

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[DictRow]]:
        if self._pool is None:
            raise RuntimeError("PostgresStore is not open")
        try:
            async with self._pool.connection() as connection:
                yield connection
        except psycopg.Error as exc:
            if self.dialect.unavailable(exc):
                raise StorageUnavailable(f"PostgreSQL: {exc}") from exc
            raise

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Session]:
        async with self._connection() as connection:
            yield _Session(connection)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Session]:
        async with self._connection() as connection, connection.transaction():
            yield _Session(connection)

    async def connect(self) -> None:
        """Open the connection pool; waits for the first connection."""
        if self._pool is None:
            pool: AsyncConnectionPool[psycopg.AsyncConnection[DictRow]] = AsyncConnectionPool(
                self.url,
                open=False,
                configure=_configure,
                check=AsyncConnectionPool.check_connection,
                name="batch-gateway-metadata",
                **self._pool_options,
            )
            try:
                await pool.open(wait=True, timeout=self.timeout)
            except psycopg.OperationalError as exc:
                await pool.close()
                raise StorageUnavailable(f"PostgreSQL: {exc}") from exc
            self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
