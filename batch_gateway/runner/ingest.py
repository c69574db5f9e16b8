"""Read and validate: stream the input file once into a local work file plus a compact per-line index.

Memory stays flat whatever the input size: request bodies go to the work file, and per line we keep only its offset,
length, line number, prefix key blocks and a hash of its custom_id, in packed arrays: 25 bytes per line plus 8 per key
block (one block for a prompt under 64 bytes, at most MAX_BLOCKS). Later stages read a body back by offset when it is
about to be sent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import heapq
import os
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import msgspec
import numpy as np

from batch_gateway.errors import DiskFull
from batch_gateway.runner.prefix import MAX_BLOCKS, PrefixKeys, prefix_key
from batch_gateway.runner.validate import ValidLine, validate_line
from batch_gateway.wire import BatchError

MAX_REPORTED_ERRORS = 500
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark at the start of the file is no content (as at upload)


@dataclass
class Limits:
    max_requests: int
    max_line_bytes: int


@dataclass
class Ingested:
    path: Path
    offsets: np.ndarray  # uint64, byte offset of request i in the work file
    lengths: np.ndarray  # uint32
    keys: PrefixKeys | None  # prefix key blocks; None once planning no longer needs them (see run.plan)
    line_numbers: np.ndarray  # uint32, 1-based line of request i in the input file (blank lines are skipped)
    model: str | None
    errors: list[BatchError] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.offsets)


class _Errors:
    """Reports errors in line order, whatever order they are found in (duplicate custom_ids are found after every
    line was read): the first MAX_REPORTED_ERRORS line errors, kept in a bounded heap, then the errors about the
    whole file (no line), and a count of the rest."""

    def __init__(self) -> None:
        self._lines: list[tuple[int, int, BatchError]] = []  # (-line, -arrival, error): the last line on top
        self._file: list[BatchError] = []
        self._arrivals = 0
        self.dropped = 0

    @property
    def empty(self) -> bool:
        return not self._lines and not self._file

    def add(self, errors: list[BatchError]) -> None:
        for error in errors:
            if error.line is None:
                self._file.append(error)
                continue
            self._arrivals += 1
            item = (-error.line, -self._arrivals, error)
            if len(self._lines) < MAX_REPORTED_ERRORS:
                heapq.heappush(self._lines, item)
                continue
            self.dropped += 1
            if item[:2] > self._lines[0][:2]:  # an earlier line than the last one kept: it takes that one's place
                heapq.heapreplace(self._lines, item)

    def result(self) -> list[BatchError]:
        ordered = [error for *_, error in sorted(self._lines, key=lambda item: item[:2], reverse=True)]
        if self.dropped:
            self._file.append(
                BatchError(code="too_many_errors", message=f"{self.dropped} more errors were not listed.")
            )
        return [*ordered, *self._file]


def _custom_id_hash(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "little")


async def split_lines(chunks: AsyncIterator[bytes], max_line_bytes: int) -> AsyncIterator[tuple[int, bytes | None]]:
    """Yield (1-based line number, line bytes) from a byte stream; None for a line over the size limit, whose bytes
    are skipped rather than buffered."""
    pending = bytearray()
    oversized = False
    line_no = 0
    async for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not oversized:
                    pending += chunk[start:]
                    if len(pending) > max_line_bytes:
                        oversized, pending = True, bytearray()
                break
            line_no += 1
            if oversized:
                yield line_no, None
            else:
                pending += chunk[start:end]
                yield line_no, (None if len(pending) > max_line_bytes else bytes(pending))
            pending, oversized = bytearray(), False
            start = end + 1
    if pending or oversized:
        yield line_no + 1, (None if oversized else bytes(pending))


async def ingest(
    chunks: AsyncIterator[bytes],
    work_file: Path,
    endpoint: str,
    limits: Limits,
    check_model: Callable[[str], Awaitable[str | None]],
) -> Ingested:
    """`check_model(model)` says why the batch's model cannot run (None: it can); asked once, for the first line's
    model (every other line must name the same one)."""
    work_file.parent.mkdir(parents=True, exist_ok=True)
    offsets, lengths, id_hashes, line_numbers = array("Q"), array("I"), array("Q"), array("I")
    key_counts, key_levels = array("B"), [array("Q") for _ in range(MAX_BLOCKS)]
    errors = _Errors()
    model: str | None = None
    model_line = 0
    too_many = False
    position = 0
    with _work_file(work_file) as out:
        async for line_no, raw in split_lines(chunks, limits.max_line_bytes):
            if raw is None:
                errors.add(
                    [
                        BatchError(
                            "line_too_long", f"The line is longer than {limits.max_line_bytes} bytes.", None, line_no
                        )
                    ]
                )
                continue
            raw = raw.rstrip(b"\r")
            if line_no == 1:
                raw = raw.removeprefix(BOM)
            if not raw.strip():
                continue  # blank lines are not requests
            if len(offsets) >= limits.max_requests:
                too_many = True
                break
            checked = validate_line(raw, line_no, endpoint)
            parsed: ValidLine | None = None
            if isinstance(checked, list):
                errors.add(checked)  # the line keeps its place in the index all the same; this batch fails anyway
            else:
                parsed = checked
                if model is None:
                    model, model_line = parsed.model, line_no
                    problem = await check_model(model)
                    if problem is not None:
                        errors.add([_model_not_found(model, line_no, problem)])
                elif parsed.model != model:
                    errors.add(
                        [
                            BatchError(
                                "model_mismatch",
                                f"All requests in a batch must use the same model: line {model_line} uses '{model}', "
                                f"this line uses '{parsed.model}'.",
                                "body.model",
                                line_no,
                            )
                        ]
                    )
            out.write(raw)
            out.write(b"\n")
            offsets.append(position)
            lengths.append(len(raw))
            position += len(raw) + 1
            blocks = prefix_key(endpoint, parsed.body)[:MAX_BLOCKS] if parsed else ()
            key_counts.append(len(blocks))
            for level, block in zip(key_levels, blocks, strict=False):  # a short prompt fills fewer levels
                level.append(block)
            id_hashes.append(_custom_id_hash(parsed.custom_id) if parsed else 0)
            line_numbers.append(line_no)

    if too_many:
        errors.add(
            [
                BatchError(
                    "too_many_tasks",
                    f"The input file has more than {limits.max_requests} requests, the most one batch may hold.",
                    None,
                    None,
                )
            ]
        )
    elif not offsets and errors.empty:
        errors.add([BatchError("empty_file", "The input file has no requests.", None, None)])

    ingested = Ingested(
        path=work_file,
        offsets=_packed(offsets, np.uint64),
        lengths=_packed(lengths, np.uint32),
        keys=PrefixKeys(_packed(key_counts, np.uint8), [_packed(level, np.uint64) for level in key_levels]),
        line_numbers=_packed(line_numbers, np.uint32),
        model=model,
    )
    if not too_many:
        errors.add(_duplicate_ids(ingested, np.frombuffer(id_hashes, dtype=np.uint64) if id_hashes else None))
    ingested.errors = errors.result()
    return ingested


@contextlib.contextmanager
def _work_file(path: Path) -> Iterator[BinaryIO]:
    """The work file, open for writing. If anything fails it is removed, since a partial file would keep a full disk
    full; a full disk becomes DiskFull, which the runner waits out like any storage outage."""
    try:
        with open(path, "wb", buffering=1024 * 1024) as out:
            yield out
    except BaseException as exc:
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(
                f"the runner's work disk is full at {path.parent}: free space there (or point --work-dir elsewhere) "
                "and the runner carries on by itself"
            ) from exc
        raise


def _packed(values: array, dtype: type[np.generic]) -> np.ndarray:
    """The array's buffer as a numpy array, without a copy."""
    return np.frombuffer(values, dtype=dtype) if values else np.zeros(0, dtype)


def _model_not_found(model: str, line_no: int, problem: str) -> BatchError:
    return BatchError(
        "model_not_found",
        f"The provided model '{model}' is not supported by the Batch API: {problem}",
        "body.model",
        line_no,
    )


def read_request(ingested: Ingested, fd: int, index: int) -> bytes:
    """The raw bytes of request `index`, read back from the work file."""
    return os.pread(fd, int(ingested.lengths[index]), int(ingested.offsets[index]))


def _duplicate_ids(ingested: Ingested, id_hashes: np.ndarray | None) -> list[BatchError]:
    """custom_id must be unique. Compare 64-bit hashes, then confirm candidates against the real ids."""
    if id_hashes is None or len(id_hashes) < 2:
        return []
    order = np.argsort(id_hashes, kind="stable")
    sorted_hashes = id_hashes[order]
    repeats = np.nonzero((sorted_hashes[1:] == sorted_hashes[:-1]) & (sorted_hashes[1:] != 0))[0] + 1
    if not len(repeats):
        return []
    errors: list[BatchError] = []
    with open(ingested.path, "rb") as f:
        fd = f.fileno()
        seen: dict[str, int] = {}
        candidates = sorted({int(order[i]) for i in repeats} | {int(order[i - 1]) for i in repeats})
        for index in candidates:
            custom_id = msgspec.json.decode(read_request(ingested, fd, index)).get("custom_id")
            if custom_id in seen:
                errors.append(
                    BatchError(
                        "duplicate_custom_id",
                        f"The custom_id '{custom_id}' is used more than once; "
                        "each custom_id must be unique in a batch.",
                        "custom_id",
                        int(ingested.line_numbers[index]),
                    )
                )
            else:
                seen[custom_id] = index
    return errors
