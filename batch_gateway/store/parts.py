"""Checkpoint parts: a batch's durable results while it runs, in object storage.

The runner writes them (`runner/checkpoint.py`) and reads them back to resume and to finalise; the API reads them for
partial results (`api/partial.py`). So their format lives here, in storage, which both may use.

A part is an immutable JSONL object under `<tenant>/batches/<batch_id>/parts/`; each record is
`[line, kind, usage, result_line]`: the input line number, whether the result goes to the output or the error file,
the request's token usage (or null) and the result line itself, embedded as JSON. A line may appear in more than one
part (two runners racing after a lease expired, or a crash between a compaction's write and its deletes); the first
record of a line wins, for every reader.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator

import msgspec

from batch_gateway.errors import StorageUnavailable
from batch_gateway.store.objects import ObjectMissing, ObjectStore
from batch_gateway.wire import TokenUsage


class ResultKind(enum.IntEnum):
    """Which file a line's result ends in (stored as the number)."""

    OUTPUT = 0  # a 2xx answer
    ERROR = 1  # an error answer, or no answer at all


Record = tuple[int, ResultKind, TokenUsage | None, bytes]

_record_decoder = msgspec.json.Decoder(tuple[int, ResultKind, TokenUsage | None, msgspec.Raw])
_usage_encoder = msgspec.json.Encoder()


def encode_record(line: int, kind: ResultKind, usage: TokenUsage | None, result_line: bytes) -> bytes:
    usage_json = _usage_encoder.encode(usage) if usage is not None else b"null"
    return b"[%d,%d,%s,%s]\n" % (line, kind, usage_json, result_line.rstrip(b"\n"))


class Parts:
    """The checkpoint parts of one batch, for reading."""

    def __init__(self, objects: ObjectStore, prefix: str) -> None:
        """`prefix`: the batch's prefix in the object store (`objects.batch_prefix`)."""
        self.objects = objects
        self.parts_prefix = f"{prefix}/parts/"

    async def part_keys(self) -> list[str]:
        return await self.objects.list(self.parts_prefix)

    async def records(self, keys: list[str]) -> AsyncIterator[Record]:
        """Every record of the parts `keys`. A part can vanish before or while it is read: a runner compacted it into
        a bigger part, which it wrote before deleting the small ones. Then the parts are listed again and those not
        read yet are read too; the merged part repeats lines already yielded, which every reader skips (the first
        record of a line wins)."""
        read: set[str] = set()
        pending = list(keys)
        while pending:
            key = pending.pop(0)
            read.add(key)
            try:
                async for raw_line in lines(await self.objects.stream(key)):
                    line, kind, usage, result = _record_decoder.decode(raw_line)
                    yield line, kind, usage, bytes(result)
            except (ObjectMissing, StorageUnavailable) as exc:
                listed = await self.part_keys()
                if isinstance(exc, StorageUnavailable) and key in listed:
                    raise  # the part is still there: the store failed, not a compaction
                pending = [k for k in listed if k not in read]


async def lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The non-empty lines of a JSONL stream, without their newlines."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line:
                yield line
    if pending:
        yield pending
