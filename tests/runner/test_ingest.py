"""Reading the input: streaming line split, whole-file checks, and the compact index."""

import tracemalloc

import msgspec
import numpy as np

from batch_gateway.runner.ingest import Limits, ingest, read_request, split_lines
from batch_gateway.runner.prefix import plan_order, shared_depths
from batch_gateway.runner.run import plan
from batch_gateway.runner.schedule import GroupScheduler

CHAT = "/v1/chat/completions"


def req(custom_id: str, model: str = "m", system: str = "You are helpful.") -> bytes:
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": custom_id}]}
    return msgspec.json.encode({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body})


async def chunks_of(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def run(data: bytes, tmp_path, *, chunk: int = 7, max_requests: int = 100, max_line: int = 10_000, known=True):
    async def check_model(model: str) -> str | None:
        return None if known else "no upstream serves it."

    return await ingest(
        chunks_of(data, chunk), tmp_path / "w" / "input.jsonl", CHAT, Limits(max_requests, max_line), check_model
    )


async def test_split_lines_across_chunks_and_oversized(tmp_path):
    data = b"aa\nbbbbbbbbbb\n\ncc"
    got = [x async for x in split_lines(chunks_of(data, 3), max_line_bytes=5)]
    assert got == [(1, b"aa"), (2, None), (3, b""), (4, b"cc")]


async def test_valid_file_index_and_bodies(tmp_path):
    lines = [req("a"), req("b"), req("c")]
    data = b"\n".join(lines) + b"\r\n\n"
    ingested = await run(data, tmp_path)
    assert ingested.errors == []
    assert ingested.count == 3 and ingested.model == "m"
    with open(ingested.path, "rb") as f:
        assert [read_request(ingested, f.fileno(), i) for i in range(3)] == lines
    assert ingested.line_numbers.tolist() == [1, 2, 3]
    # Same system prompt: the first key block is shared.
    assert len(set(ingested.keys.column(0).tolist())) == 1


async def test_every_bad_line_is_reported(tmp_path):
    data = b"\n".join([req("a"), b"{oops", req("a"), req("b", model="other"), b"", req("c")])
    ingested = await run(data, tmp_path)
    got = sorted((e.code, e.line) for e in ingested.errors)
    assert got == [("duplicate_custom_id", 3), ("invalid_json_line", 2), ("model_mismatch", 4)]


async def test_empty_file_and_too_many(tmp_path):
    assert [e.code for e in (await run(b"\n \n", tmp_path)).errors] == ["empty_file"]
    many = b"\n".join(req(str(i)) for i in range(5))
    assert [e.code for e in (await run(many, tmp_path, max_requests=3)).errors] == ["too_many_tasks"]


async def test_unknown_model_and_long_line(tmp_path):
    assert [(e.code, e.param) for e in (await run(req("a"), tmp_path, known=False)).errors] == [
        ("model_not_found", "body.model")
    ]
    long = req("a", system="x" * 500)
    assert [(e.code, e.line) for e in (await run(req("b") + b"\n" + long, tmp_path, max_line=200)).errors] == [
        ("line_too_long", 2)
    ]


async def test_error_list_is_capped(tmp_path):
    ingested = await run(b"\n".join(b"{bad" for _ in range(600)), tmp_path, max_requests=1000)
    assert len(ingested.errors) == 501
    assert ingested.errors[-1].code == "too_many_errors"


async def test_errors_are_reported_in_line_order_even_when_found_later(tmp_path):
    """Duplicate custom_ids are found after the last line: they still take their place by line, and within the cap
    the earliest lines win."""
    lines = [req("dup"), req("dup"), b"{bad", req("x", model="other"), req("y")]
    got = [(e.code, e.line) for e in (await run(b"\n".join(lines), tmp_path)).errors]
    assert got == [("duplicate_custom_id", 2), ("invalid_json_line", 3), ("model_mismatch", 4)]

    many = [req("same"), req("same"), *(b"{bad" for _ in range(600))]
    errors = (await run(b"\n".join(many), tmp_path, max_requests=1000)).errors
    assert [(e.code, e.line) for e in errors[:3]] == [
        ("duplicate_custom_id", 2),
        ("invalid_json_line", 3),
        ("invalid_json_line", 4),
    ]
    assert [e.line for e in errors[:-1]] == sorted(e.line for e in errors[:-1])
    assert errors[-1].code == "too_many_errors" and errors[-1].message.startswith("101 more errors")
    too_many = (await run(b"\n".join([b"{bad", req("a"), req("b"), req("c")]), tmp_path, max_requests=2)).errors
    assert [(e.code, e.line) for e in too_many] == [("invalid_json_line", 1), ("too_many_tasks", None)]


async def test_a_byte_order_mark_at_the_start_is_skipped(tmp_path):
    data = b"\xef\xbb\xbf" + req("a") + b"\n" + req("b")
    for chunk in (1, 2, 7):
        ingested = await run(data, tmp_path, chunk=chunk)
        assert ingested.errors == [] and ingested.count == 2
        with open(ingested.path, "rb") as f:
            assert read_request(ingested, f.fileno(), 0) == req("a")
    inside = req("a") + b"\n\xef\xbb\xbf" + req("b")  # only at the start of the file
    assert [(e.code, e.line) for e in (await run(inside, tmp_path)).errors] == [("invalid_json_line", 2)]


def tiny(i: int, system: str | None = None) -> bytes:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": f"hi {i}"}]
    body = {"model": "m", "messages": messages, "max_tokens": 1}
    return msgspec.json.encode({"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": body})


async def test_index_stays_within_its_per_line_budget(tmp_path):
    """A short prompt has one key block: the index holds offset (8), length (4), line number (4) and key (1 + 8)
    bytes a line, not 8 × MAX_BLOCKS for the key. At a million lines every byte here is a megabyte."""
    n = 20_000
    data = b"\n".join(tiny(i) for i in range(n))
    ingested = await run(data, tmp_path, chunk=1 << 20, max_requests=n)
    assert ingested.errors == [] and ingested.count == n
    assert ingested.keys is not None and ingested.keys.depth == 1
    index = ingested.offsets.nbytes + ingested.lengths.nbytes + ingested.line_numbers.nbytes + ingested.keys.nbytes
    assert index / n <= 25, f"{index / n:.1f} bytes per line"


async def test_plan_frees_the_keys_matches_the_prefix_tree_and_stays_small(tmp_path):
    n = 30_000
    # 100 shared system prompts over a third of the lines, the rest distinct: groups of many sizes and singletons.
    systems = [f"You are assistant {k}. " + "Follow the house rules. " * 20 for k in range(100)]
    data = b"\n".join(tiny(i, systems[i % 100] if i % 3 == 0 else None) for i in range(n))
    ingested = await run(data, tmp_path, chunk=1 << 20, max_requests=n)
    assert ingested.errors == []
    done = np.zeros(n, dtype=bool)
    done[::7] = True
    keys = ingested.keys
    order = plan_order(keys)
    keep = ~done[order]
    expected = GroupScheduler(order[keep], depths=shared_depths(keys, order[keep]))  # the tree of the lines left

    tracemalloc.start()
    try:
        scheduler = plan(ingested, done, prefix_ordering=True, endpoints=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ingested.keys is None  # dispatch does not need them: released
    assert np.array_equal(scheduler.lines, order[keep])
    assert np.array_equal(scheduler._children, expected._children)
    assert np.array_equal(scheduler._offsets, expected._offsets)
    # The scheduler keeps ~20 bytes a request; planning's temporaries come on top, a few n-long arrays at a time.
    assert peak / n < 64, f"planning peaked at {peak / n:.0f} bytes per request"

    unordered = plan(ingested, done, prefix_ordering=False, endpoints=1)
    assert np.array_equal(unordered.lines, np.flatnonzero(~done))
