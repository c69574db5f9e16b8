"""What only the SQLite store has: WAL mode, the busy timeout, and several processes sharing one file."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from batch_gateway.errors import StorageUnavailable
from batch_gateway.store.migrations import latest_version, versions
from batch_gateway.store.sqlite import SqliteStore
from tests.store.test_metadata_store import batch_record


async def test_wal_mode_lets_a_reader_see_committed_rows_while_a_writer_holds_the_lock(tmp_path: Path):
    path = str(tmp_path / "metadata.sqlite3")
    store = SqliteStore(path)
    await store.open()
    batch, _ = await store.insert_batch(batch_record())
    with sqlite3.connect(path, isolation_level=None) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        raw.execute("BEGIN IMMEDIATE")  # another process in the middle of a write transaction
        raw.execute("UPDATE batches SET model = 'uncommitted'")
        assert (await store.get_batch(batch.id, None)).model is None  # readers are not blocked
        raw.execute("ROLLBACK")
    await store.close()


async def test_a_write_lock_held_too_long_is_storage_unavailable(tmp_path: Path):
    path = str(tmp_path / "metadata.sqlite3")
    store = SqliteStore(path, busy_timeout=0.2)
    await store.open()
    batch, _ = await store.insert_batch(batch_record())
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="locked"):
        await store.claim_batch(batch.id, "runner", 100, 30)
    assert time.monotonic() - started < 2
    raw.execute("ROLLBACK")
    raw.close()
    assert await store.claim_batch(batch.id, "runner", 100, 30)  # fine again once the lock is gone
    await store.close()


async def test_a_short_write_lock_is_waited_out(tmp_path: Path):
    path = str(tmp_path / "metadata.sqlite3")
    store = SqliteStore(path)
    await store.open()
    batch, _ = await store.insert_batch(batch_record())
    raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    raw.execute("BEGIN IMMEDIATE")
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, raw.execute, "ROLLBACK")
    assert await store.claim_batch(batch.id, "runner", 100, 30)
    raw.close()
    await store.close()


async def test_sql_errors_are_not_mistaken_for_an_outage(tmp_path: Path):
    store = SqliteStore(str(tmp_path / "metadata.sqlite3"))
    await store.open()
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await store._rows("SELECT * FROM no_such_table")
    await store.close()


async def test_an_unopenable_path_is_storage_unavailable(tmp_path: Path):
    store = SqliteStore(str(tmp_path / "missing-dir" / "metadata.sqlite3"))
    with pytest.raises(StorageUnavailable):
        await store.open()
    await store.close()


_CONTENDER = textwrap.dedent(
    """
    import asyncio, pathlib, sys
    from batch_gateway.store.sqlite import SqliteStore

    async def wait_for(flag):
        while not flag.exists():
            await asyncio.sleep(0.005)

    async def main(path, owner, batch_ids, flags):
        store = SqliteStore(path)
        await store.connect()
        (flags / f"ready-{owner}").touch()
        await wait_for(flags / "migrate")
        applied = await store.migrate()
        await wait_for(flags / "claim")
        won = [b for b in batch_ids if await store.claim_batch(b, owner, 1000, 30)]
        await store.close()
        print("RESULT", len(applied), *won)  # structlog also writes to stdout

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3].split(","), pathlib.Path(sys.argv[4])))
    """
)


@pytest.mark.process
async def test_processes_sharing_the_file_migrate_once_and_claim_each_batch_once(tmp_path: Path):
    """The API server and runner subprocesses share one file: start-up migrations and lease claims across real
    processes (each with its own file locks), each phase released to all of them at once."""
    path = str(tmp_path / "metadata.sqlite3")
    flags = tmp_path / "flags"
    flags.mkdir()
    script = tmp_path / "contender.py"
    script.write_text(_CONTENDER)
    batch_ids = [batch_record().id for _ in range(30)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            path,
            f"runner-{i}",
            ",".join(batch_ids),
            str(flags),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).parents[2],
        )
        for i in range(3)
    ]
    try:
        deadline = time.monotonic() + 30
        while len(list(flags.glob("ready-*"))) < len(procs):
            assert time.monotonic() < deadline, "contenders did not start"
            for p in procs:
                if p.returncode is not None:
                    _, err = await p.communicate()
                    raise AssertionError(f"a contender died before it was ready: {err.decode()[-2000:]}")
            await asyncio.sleep(0.02)
        (flags / "migrate").touch()

        store = SqliteStore(path)
        while True:  # one of the contenders migrates; then the batches go in
            try:
                if await store.schema_version() == latest_version("sqlite"):
                    break
            except sqlite3.OperationalError:  # no schema_migrations table yet
                pass
            assert time.monotonic() < deadline, "nobody migrated"
            await asyncio.sleep(0.01)
        for batch_id in batch_ids:
            await store.insert_batch(batch_record(id=batch_id, status="in_progress"))
        await store.close()
        (flags / "claim").touch()

        outputs = [await asyncio.wait_for(p.communicate(), 30) for p in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    results = [
        line.split()[1:] for out, _ in outputs for line in out.decode().splitlines() if line.startswith("RESULT")
    ]
    # one process applied every migration
    assert sorted(int(result[0]) for result in results) == [0, 0, len(versions("sqlite"))]
    won = [batch_id for result in results for batch_id in result[1:]]
    assert sorted(won) == sorted(batch_ids)  # every batch claimed, and by one process only
