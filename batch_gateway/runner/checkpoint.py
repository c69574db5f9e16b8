"""Durable, exactly-once results: checkpoint parts in object storage, merged into the output and error files.

As results arrive they are buffered and written every few seconds as an immutable *part* object under
`<tenant>/batches/<batch_id>/parts/` (their format, and reading them, are in `store/parts.py`). A runner that is
killed and started again loads the parts, skips every line that already has a durable result, and re-sends only the
rest. Finalising streams the parts into the output and error files; a line found in two parts (two runners racing
after a lease expired, or a crash between a compaction's write and its deletes) is written once, so every input line
ends in exactly one file.

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
from batch_gateway.store.objects import ObjectStore
from batch_gateway.store.parts import Parts, ResultKind, encode_record

COMPACT_FANIN = 32  # parts of one level merged into one part of the next


class Totals(msgspec.Struct):
    completed: int = 0
    failed: int = 0
    usage: wire.Usage = msgspec.field(default_factory=wire.Usage)

    def add(self, kind: ResultKind, usage: wire.TokenUsage | None) -> None:
        if kind == ResultKind.OUTPUT:
            self.completed += 1
            if usage is not None:
                self.usage.add(usage.as_usage())
        else:
            self.failed += 1


class Checkpoints(Parts):
    """This runner's parts of one batch: written as results arrive, compacted as they accumulate, read back."""

    def __init__(self, objects: ObjectStore, prefix: str, owner: str) -> None:
        super().__init__(objects, prefix)
        self.owner = owner  # in part names, so two runners never overwrite each other's parts
        self._buffer = bytearray()
        self._buffered = 0
        self._sequence = 0
        self._levels: list[list[str]] = [[]]  # this runner's part keys, by compaction level

    # --- writing ---
    def add(self, line: int, kind: ResultKind, usage: wire.TokenUsage | None, result_line: bytes) -> None:
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
    async def load(self, count: int) -> tuple[np.ndarray, Totals]:
        """Which lines already have a durable result, and their totals. The first record of a line wins."""
        done = np.zeros(count, dtype=bool)
        totals = Totals()
        async for line, kind, usage, _ in self.records(await self.part_keys()):
            if 0 <= line < count and not done[line]:
                done[line] = True
                totals.add(kind, usage)
        return done, totals

    async def write_file(self, key: str, kind: ResultKind, count: int, extra: Iterator[bytes] | None = None) -> int:
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
