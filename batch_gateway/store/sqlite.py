"""The embedded metadata store: one SQLite file shared by the API and its runner subprocesses.

WAL mode lets readers work beside one writer across processes; a busy timeout absorbs short write contention, and
every write is one autocommit statement, so no process holds the write lock for long. sqlite3 blocks, so each
connection lives on one worker thread of its own: calls are serialised there and never tie up the event loop or the
default thread pool. A transaction gets a connection (and thread) of its own, as another process would, so no other
call's statement ever runs inside it.

The queries are in `sql_store.py`; this module is the connection and the dialect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from batch_gateway.errors import StorageUnavailable
from batch_gateway.store import rows
from batch_gateway.store.sql_store import Dialect, Row, Session, SqlStore

T = TypeVar("T")

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
_DUPLICATE_CODES = {sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY}


class SqliteDialect(Dialect):
    name = "sqlite"
    skip_locked = ""  # one writer at a time: a claim's UPDATE never races another
    migrations_table = (
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
        "applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
    )
    migration_lock = None  # the transaction's BEGIN IMMEDIATE takes the write lock

    def one_of(self, column: str) -> str:
        return f"{column} IN (SELECT value FROM json_each(?))"

    def values(self, items: Collection[str]) -> str:
        return json.dumps(list(items))

    def json(self, value: Any) -> str | None:
        return rows.encode_json(value)

    def json_int(self, column: str, key: str) -> str:
        return f"json_extract({column}, '$.{key}')"

    def unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error) and (exc.sqlite_errorcode or 0) & 0xFF in _UNAVAILABLE_CODES

    def duplicate(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and exc.sqlite_errorcode in _DUPLICATE_CODES


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


def _dict_row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, values, strict=True)}


class _Connection(Session):
    """One sqlite3 connection, used only from its own worker thread."""

    def __init__(self, path: str, busy_timeout: float, dialect: SqliteDialect) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.dialect = dialect
        self._connection: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit; a transaction says BEGIN itself.
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        connection.row_factory = _dict_row
        connection.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against process crashes in WAL mode; only a power loss can drop the last commits.
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    async def call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            try:
                if self._connection is None:
                    self._connection = self._connect()
                return work(self._connection)
            except sqlite3.Error as exc:
                if self.dialect.unavailable(exc):
                    raise StorageUnavailable(f"SQLite database {self.path}: {exc}") from exc
                raise

        return await asyncio.get_running_loop().run_in_executor(self._thread, run)

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        # fetchall() also for UPDATE ... RETURNING: the statement only completes (and commits) once fully stepped.
        return await self.call(lambda c: c.execute(sql, params).fetchall())

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return await self.call(lambda c: c.execute(sql, params).rowcount)

    async def script(self, sql: str) -> None:
        def work(c: sqlite3.Connection) -> None:
            for statement in split_statements(sql):
                c.execute(statement)

        await self.call(work)

    async def end(self, statement: str) -> None:
        """COMMIT or ROLLBACK; a rollback only if still in a transaction (a full disk or an I/O error rolls back by
        itself)."""

        def work(c: sqlite3.Connection) -> None:
            if c.in_transaction or statement != "ROLLBACK":
                c.execute(statement)

        await self.call(work)

    async def close(self) -> None:
        def work() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await asyncio.get_running_loop().run_in_executor(self._thread, work)
        self._thread.shutdown(wait=False)


class SqliteStore(SqlStore):
    dialect = SqliteDialect()

    def __init__(self, path: str, *, busy_timeout: float = 20.0) -> None:
        self.path = self.location = path
        self.busy_timeout = busy_timeout
        self._main: _Connection | None = None

    def _connection(self) -> _Connection:
        if self._main is None:
            self._main = _Connection(self.path, self.busy_timeout, self.dialect)
        return self._main

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Session]:
        yield self._connection()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Session]:
        connection = _Connection(self.path, self.busy_timeout, self.dialect)
        try:
            await connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                await connection.end("ROLLBACK")
                raise
            await connection.end("COMMIT")
        finally:
            await connection.close()

    async def connect(self) -> None:
        await self._connection().call(lambda c: None)

    async def close(self) -> None:
        main, self._main = self._main, None
        if main is not None:
            await main.close()
