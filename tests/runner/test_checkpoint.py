"""Checkpoint parts: durable results, resume, and exactly-once merging."""

import msgspec
import pytest

from batch_gateway.runner import checkpoint as checkpoint_module
from batch_gateway.runner.checkpoint import Checkpoints
from batch_gateway.store.objects import ObjectStore
from batch_gateway.store.parts import ResultKind
from batch_gateway.wire import TokenUsage


def result(line: int) -> bytes:
    return (
        msgspec.json.encode(
            {"id": f"r{line}", "custom_id": f"c{line}", "response": {"body": {"n": 2**60 + 1}}, "error": None}
        )
        + b"\n"
    )


async def test_flush_load_and_merge(tmp_path):
    objects = ObjectStore((tmp_path / "o").as_uri())
    first = Checkpoints(objects, "t/batches/b", "runner-a")
    first.add(
        0,
        ResultKind.OUTPUT,
        TokenUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5, cached_tokens=1),
        result(0),
    )
    first.add(2, ResultKind.ERROR, None, result(2))
    await first.flush()
    first.add(
        3, ResultKind.OUTPUT, TokenUsage(prompt_tokens=1, total_tokens=1), result(3)
    )  # never flushed: "lost in a crash"

    resumed = Checkpoints(objects, "t/batches/b", "runner-b")
    done, totals = await resumed.load(5)
    assert done.tolist() == [True, False, True, False, False]
    assert (totals.completed, totals.failed) == (1, 1)
    assert totals.usage.input_tokens == 3 and totals.usage.input_tokens_details.cached_tokens == 1

    # A second runner racing the first writes line 0 again; it must appear once in the merged file.
    resumed.add(0, ResultKind.OUTPUT, None, result(0))
    resumed.add(1, ResultKind.OUTPUT, None, result(1))
    await resumed.flush()
    size = await resumed.write_file("t/files/out", ResultKind.OUTPUT, 5)
    merged = await objects.get_bytes("t/files/out")
    assert size == len(merged)
    lines = [msgspec.json.decode(x) for x in merged.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["c0", "c1"]
    assert lines[0]["response"]["body"]["n"] == 2**60 + 1  # embedded raw, no precision loss

    errors = await resumed.write_file("t/files/err", ResultKind.ERROR, 5, iter([b'{"custom_id":"c4"}\n']))
    assert errors > 0
    assert [msgspec.json.decode(x)["custom_id"] for x in (await objects.get_bytes("t/files/err")).splitlines()] == [
        "c2",
        "c4",
    ]

    await resumed.delete()
    assert await resumed.part_keys() == []


async def test_failed_flush_keeps_results(tmp_path):
    objects = ObjectStore((tmp_path / "o").as_uri())
    checkpoints = Checkpoints(objects, "t/batches/b", "r")
    checkpoints.add(0, ResultKind.OUTPUT, None, result(0))

    async def broken(*args, **kwargs):
        raise OSError("disk full")

    objects.put_bytes = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk full"):
        await checkpoints.flush()
    assert checkpoints.pending == 1


async def test_parts_are_compacted_level_by_level(tmp_path, monkeypatch):
    from batch_gateway.runner import checkpoint

    monkeypatch.setattr(checkpoint, "COMPACT_FANIN", 3)
    objects = ObjectStore((tmp_path / "o").as_uri())
    checkpoints = Checkpoints(objects, "t/batches/b", "r")
    flushes = 3 * 3 * 2 + 3 + 2  # two level-2 parts, one level-1 part, two small parts
    for line in range(flushes):
        checkpoints.add(line, ResultKind.OUTPUT if line % 2 else ResultKind.ERROR, None, result(line))
        await checkpoints.flush()
    assert len(await checkpoints.part_keys()) == 2 + 1 + 2

    done, totals = await Checkpoints(objects, "t/batches/b", "next").load(flushes)
    assert done.all() and (totals.completed, totals.failed) == (flushes // 2, flushes - flushes // 2)
    await checkpoints.write_file("t/files/out", ResultKind.OUTPUT, flushes)
    out = [msgspec.json.decode(x)["custom_id"] for x in (await objects.get_bytes("t/files/out")).splitlines()]
    assert sorted(out) == sorted(f"c{line}" for line in range(1, flushes, 2))


async def test_a_crash_between_compaction_and_deletes_duplicates_nothing(tmp_path, monkeypatch):
    from batch_gateway.runner import checkpoint

    monkeypatch.setattr(checkpoint, "COMPACT_FANIN", 2)
    objects = ObjectStore((tmp_path / "o").as_uri())
    checkpoints = Checkpoints(objects, "t/batches/b", "r")

    async def crash(key):
        raise OSError("killed")

    objects.delete = crash  # type: ignore[method-assign]
    checkpoints.add(0, ResultKind.OUTPUT, None, result(0))
    await checkpoints.flush()  # one part: nothing to compact yet
    checkpoints.add(1, ResultKind.OUTPUT, None, result(1))
    with pytest.raises(OSError, match="killed"):
        await checkpoints.flush()  # two parts, merged into one; the crash comes while deleting the small ones
    assert len(await checkpoints.part_keys()) == 3  # the merged part and both small ones
    done, totals = await Checkpoints(objects, "t/batches/b", "next").load(2)
    assert done.all() and totals.completed == 2
    await checkpoints.write_file("t/files/out", ResultKind.OUTPUT, 2)
    assert len((await objects.get_bytes("t/files/out")).splitlines()) == 2


async def test_a_failed_compaction_loses_nothing_and_is_retried(tmp_path, monkeypatch):
    from batch_gateway.errors import StorageUnavailable
    from batch_gateway.runner import checkpoint

    monkeypatch.setattr(checkpoint, "COMPACT_FANIN", 2)
    objects = ObjectStore((tmp_path / "o").as_uri())
    checkpoints = Checkpoints(objects, "t/batches/b", "r")
    put_stream = objects.put_stream

    async def full_disk(*args, **kwargs):
        raise StorageUnavailable("disk full")

    objects.put_stream = full_disk  # type: ignore[method-assign]
    for line in range(2):
        checkpoints.add(line, ResultKind.OUTPUT, None, result(line))
        await checkpoints.flush()  # the part is durable; its compaction fails quietly
    assert checkpoints.pending == 0 and len(await checkpoints.part_keys()) == 2
    objects.put_stream = put_stream  # type: ignore[method-assign]
    checkpoints.add(2, ResultKind.OUTPUT, None, result(2))
    await checkpoints.flush()
    assert len(await checkpoints.part_keys()) == 1  # all three merged at the next flush
    done, totals = await Checkpoints(objects, "t/batches/b", "next").load(3)
    assert done.all() and totals.completed == 3


async def test_a_reader_interleaved_with_compactions_gets_every_line(tmp_path, monkeypatch):
    """A reader (partial results, a second runner) lists the parts, then the runner compacts some of them away while
    they are read: the reader finds them in the merged parts and misses no line."""
    monkeypatch.setattr(checkpoint_module, "COMPACT_FANIN", 3)
    objects = ObjectStore((tmp_path / "o").as_uri())
    writer = Checkpoints(objects, "t/batches/b", "runner-a")
    written = 0

    async def flush_one() -> None:
        nonlocal written
        writer.add(written, ResultKind.OUTPUT, None, result(written))
        written += 1
        await writer.flush()

    for _ in range(20):
        await flush_one()
    durable = written
    reader = Checkpoints(objects, "t/batches/b", "reader")
    listed = await reader.part_keys()
    read: list[int] = []
    async for line, kind, _, body in reader.records(listed):
        assert (kind, body) == (ResultKind.OUTPUT, result(line).rstrip(b"\n"))
        read.append(line)
        for _ in range(2 if written < 80 else 0):  # the runner goes on flushing, and compacting, while it reads
            await flush_one()
    assert not set(listed) <= set(await reader.part_keys()), (
        "no listed part was compacted away: the test proves nothing"
    )
    assert set(range(durable)) <= set(read)  # every line durable when the reader listed, deduplicated by the reader
    done, totals = await reader.load(written)
    assert done.all() and totals.completed == written
