"""Durable, exactly-once results: checkpoint parts in object storage, merged into the output and error files.

As results arrive they are buffered and written every few seconds as an immutable *part* object under
`<tenant>/batches/<batch_id>/parts/`. A part is JSONL; each record is `[line, kind, usage, result_line]`. A runner that
is killed and started again loads the parts, skips every line that already has a durable result, and re-sends only
the rest. Finalising streams the parts into the output and error files; a line found in two parts (two runners
racing after a lease expired, or a crash between a compaction's write and its deletes) is written once, so every
input line ends in exactly one file.

Frequent small parts keep what a crash loses small, but a day-long batch would leave ~100,000 of them to read back one
by one. So each runner compacts its own parts as it goes, like an LSM tree: every `COMPACT_FANIN` parts of one level
are concatenated into one part of the next level, written before the small ones are deleted.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import msgspec
import numpy as np

from batch_gateway import wire
from batch_gateway.errors import StorageUnavailable
from batch_gateway.runner.upstream import TokenUsage
from batch_gateway.store.objects import ObjectMissing, ObjectStore

OUTPUT, ERROR = 0, 1
COMPACT_FANIN = 32  # parts of one level merged into one part of the next


class Totals(msgspec.Struct):
    completed: int = 0
    failed: int = 0
    usage: wire.Usage = msgspec.field(default_factory=wire.Usage)

    def add(self, kind: int, usage: TokenUsage | None) -> None:
        if kind == OUTPUT:
            self.completed += 1
            if usage is not None:
                self.usage.add(
                    wire.Usage(
                        input_tokens=usage.prompt_tokens,
                        input_tokens_details=wire.InputTokensDetails(cached_tokens=usage.cached_tokens),
                        output_tokens=usage.completion_tokens,
                        output_tokens_details=wire.OutputTokensDetails(reasoning_tokens=usage.reasoning_tokens),
                        total_tokens=usage.total_tokens,
                    )
                )
        else:
            self.failed += 1


_record_decoder = msgspec.json.Decoder(tuple[int, int, TokenUsage | None, msgspec.Raw])
_usage_encoder = msgspec.json.Encoder()


def encode_record(line: int, kind: int, usage: TokenUsage | None, result_line: bytes) -> bytes:
    usage_json = _usage_encoder.encode(usage) if usage is not None else b"null"
    return b"[%d,%d,%s,%s]\n" % (line, kind, usage_json, result_line.rstrip(b"\n"))


class Checkpoints:
    def __init__(self, objects: ObjectStore, prefix: str, owner: str) -> None:
        self.objects = objects
        self.parts_prefix = f"{prefix}/parts/"
        self.owner = owner  # in part names, so two runners never overwrite each other's parts
        self._buffer = bytearray()
        self._buffered = 0
        self._sequence = 0
        self._levels: list[list[str]] = [[]]  # this runner's part keys, by compaction level

    # --- writing ---
    def add(self, line: int, kind: int, usage: TokenUsage | None, result_line: bytes) -> None:
        self._buffer += encode_record(line, kind, usage, result_line)
        self._buffered += 1

    @property
    def pending(self) -> int:
        """Results not yet durable."""
        return self._buffered

    @property
    def pending_bytes(self) -> int:
        return len(self._buffer)

    async def flush(self) -> None:
        if not self._buffered:
            return
        data, self._buffer, self._buffered = bytes(self._buffer), bytearray(), 0
        self._sequence += 1
        key = f"{self.parts_prefix}{self.owner}-{self._sequence:08d}.jsonl"
        try:
            await self.objects.put_bytes(key, data)
        except BaseException:
            # Not durable: keep the results for the next flush rather than lose them.
            self._buffer[:0] = data
            self._buffered += data.count(b"\n")
            raise
        self._levels[0].append(key)
        # The results are durable in the small parts; compaction is retried at the next flush.
        with contextlib.suppress(StorageUnavailable):
            await self._compact()

    async def _concatenated(self, keys: list[str]) -> AsyncIterator[bytes]:
        for key in keys:
            async for chunk in await self.objects.stream(key):
                yield chunk

    async def _compact(self) -> None:
        level = 0
        while len(self._levels[level]) >= COMPACT_FANIN:
            keys = self._levels[level]
            self._sequence += 1
            merged = f"{self.parts_prefix}{self.owner}-{self._sequence:08d}.jsonl"
            await self.objects.put_stream(merged, self._concatenated(keys))
            self._levels[level] = []
            if len(self._levels) == level + 1:
                self._levels.append([])
            self._levels[level + 1].append(merged)
            for key in keys:  # a crash before these deletes leaves duplicates, which readers skip
                await self.objects.delete(key)
            level += 1

    # --- reading ---
    async def part_keys(self) -> list[str]:
        return await self.objects.list(self.parts_prefix)

    async def records(self, keys: list[str]) -> AsyncIterator[tuple[int, int, TokenUsage | None, bytes]]:
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
                async for raw_line in _lines(await self.objects.stream(key)):
                    line, kind, usage, result = _record_decoder.decode(raw_line)
                    yield line, kind, usage, bytes(result)
            except (ObjectMissing, StorageUnavailable) as exc:
                listed = await self.part_keys()
                if isinstance(exc, StorageUnavailable) and key in listed:
                    raise  # the part is still there: the store failed, not a compaction
                pending = [k for k in listed if k not in read]

    async def load(self, count: int) -> tuple[np.ndarray, Totals]:
        """Which lines already have a durable result, and their totals. The first record of a line wins."""
        done = np.zeros(count, dtype=bool)
        totals = Totals()
        async for line, kind, usage, _ in self.records(await self.part_keys()):
            if 0 <= line < count and not done[line]:
                done[line] = True
                totals.add(kind, usage)
        return done, totals

    async def write_file(self, key: str, kind: int, count: int, extra: Iterator[bytes] | None = None) -> int:
        """Stream every durable result of `kind` (deduplicated by line) plus `extra` lines into one object; return
        its size in bytes."""
        keys = await self.part_keys()
        size = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal size
            seen = np.zeros(count, dtype=bool)
            chunk = bytearray()
            async for line, record_kind, _, result in self.records(keys):
                if seen[line]:
                    continue
                seen[line] = True
                if record_kind == kind:
                    chunk += result + b"\n"
                    if len(chunk) >= 1 << 20:
                        size += len(chunk)
                        yield bytes(chunk)
                        chunk = bytearray()
            for result in extra or ():
                chunk += result
                if len(chunk) >= 1 << 20:
                    size += len(chunk)
                    yield bytes(chunk)
                    chunk = bytearray()
            if chunk:
                size += len(chunk)
                yield bytes(chunk)

        # Two parts in flight: the parts are read far faster than they upload, and at obstore's default of 12 a
        # 400 MB file held ~65 MB of queued parts in the runner (2: ~19 MB).
        await self.objects.put_stream(key, body(), max_concurrency=2)
        return size

    async def delete(self) -> None:
        await self.objects.delete_prefix(self.parts_prefix)


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line:
                yield line
    if pending:
        yield pending
