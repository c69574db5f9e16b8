"""Checkpoint parts: durable results, resume, and exactly-once merging."""

import msgspec

from batch_gateway.runner.checkpoint import ERROR, OUTPUT, Checkpoints
from batch_gateway.runner.upstream import TokenUsage
from batch_gateway.store.objects import ObjectStore


def result(line: int) -> bytes:
    return msgspec.json.encode({"id": f"r{line}", "custom_id": f"c{line}", "response": {"body": {"n": 2**60 + 1}}, "error": None}) + b"\n"


async def test_flush_load_and_merge(tmp_path):
    objects = ObjectStore((tmp_path / "o").as_uri())
    first = Checkpoints(objects, "t/batches/b", "runner-a")
    first.add(0, OUTPUT, TokenUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5, cached_tokens=1), result(0))
    first.add(2, ERROR, None, result(2))
    await first.flush()
    first.add(3, OUTPUT, TokenUsage(prompt_tokens=1, total_tokens=1), result(3))  # never flushed: "lost in a crash"

    resumed = Checkpoints(objects, "t/batches/b", "runner-b")
    done, totals = await resumed.load(5)
    assert done.tolist() == [True, False, True, False, False]
    assert (totals.completed, totals.failed) == (1, 1)
    assert totals.usage.input_tokens == 3 and totals.usage.input_tokens_details.cached_tokens == 1

    # A second runner racing the first writes line 0 again; it must appear once in the merged file.
    resumed.add(0, OUTPUT, None, result(0))
    resumed.add(1, OUTPUT, None, result(1))
    await resumed.flush()
    size = await resumed.write_file("t/files/out", OUTPUT, 5)
    merged = await objects.get_bytes("t/files/out")
    assert size == len(merged)
    lines = [msgspec.json.decode(x) for x in merged.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["c0", "c1"]
    assert lines[0]["response"]["body"]["n"] == 2**60 + 1  # embedded raw, no precision loss

    errors = await resumed.write_file("t/files/err", ERROR, 5, iter([b'{"custom_id":"c4"}\n']))
    assert errors > 0
    assert [msgspec.json.decode(x)["custom_id"] for x in (await objects.get_bytes("t/files/err")).splitlines()] == ["c2", "c4"]

    await resumed.delete()
    assert await resumed.part_keys() == []


async def test_failed_flush_keeps_results(tmp_path):
    objects = ObjectStore((tmp_path / "o").as_uri())
    checkpoints = Checkpoints(objects, "t/batches/b", "r")
    checkpoints.add(0, OUTPUT, None, result(0))

    async def broken(*args, **kwargs):
        raise OSError("disk full")

    objects.put_bytes = broken  # type: ignore[method-assign]
    try:
        await checkpoints.flush()
    except OSError:
        pass
    assert checkpoints.pending == 1
