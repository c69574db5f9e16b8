"""Reading the input: streaming line split, whole-file checks, and the compact index."""

import msgspec

from batch_gateway.runner.ingest import Limits, ingest, read_request, split_lines

CHAT = "/v1/chat/completions"


def req(custom_id: str, model: str = "m", system: str = "You are helpful.") -> bytes:
    body = {"model": model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": custom_id}]}
    return msgspec.json.encode({"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body})


async def chunks_of(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def run(data: bytes, tmp_path, *, chunk: int = 7, max_requests: int = 100, max_line: int = 10_000, known=True):
    return await ingest(chunks_of(data, chunk), tmp_path / "w" / "input.jsonl", CHAT, Limits(max_requests, max_line), lambda m: known)


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
    assert len(set(ingested.keys[:, 0].tolist())) == 1


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
