"""Cheap checks on a `purpose=batch` upload, run chunk by chunk while it streams to storage.

Only what makes a file unusable as a whole is rejected here: not UTF-8, not JSONL-looking, a line over the size limit,
too many requests, a wrong file extension. Malformed lines are accepted, as at OpenAI: the runner reports each of
them, with its line number, when the batch is validated.
"""

from __future__ import annotations

import codecs
from pathlib import PurePosixPath

from batch_gateway.errors import ApiError, InvalidRequest

FORMAT_MESSAGE = "Invalid file format for Batch API. Must be .jsonl"
ALLOWED_EXTENSIONS = frozenset({".jsonl", ".json", ".txt"})
_BOM = b"\xef\xbb\xbf"
_BLANK = b" \t\r\f\v"


def check_batch_filename(filename: str) -> None:
    """A name without an extension (the SDK's `upload` for raw bytes) is fine; `.csv` and friends are not."""
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix and suffix not in ALLOWED_EXTENSIONS:
        raise InvalidRequest(FORMAT_MESSAGE)


class BatchFileChecker:
    """Feed it the upload's chunks; the first problem found is kept in `problem` (and scanning stops)."""

    def __init__(self, *, max_line_bytes: int, max_requests: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.max_requests = max_requests
        self.problem: ApiError | None = None
        self.requests = 0  # non-blank lines
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._line_number = 1  # 1-based physical line being read
        self._line_bytes = 0
        self._line_has_content = False
        self._seen_content = False
        self._at_start = True
        self._head = b""

    def feed(self, chunk: bytes) -> None:
        if self.problem is not None or not chunk:
            return
        try:
            self._decoder.decode(chunk)
        except UnicodeDecodeError:
            self.problem = InvalidRequest(f"{FORMAT_MESSAGE} (the file is not valid UTF-8).")
            return
        if self._at_start:
            # A UTF-8 byte-order mark at the start is no content (the runner skips it too); it may span chunks.
            self._head += chunk
            if len(self._head) < len(_BOM) and _BOM.startswith(self._head):
                return
            chunk, self._head, self._at_start = self._head.removeprefix(_BOM), b"", False
        self._scan(chunk)

    def _scan(self, chunk: bytes) -> None:
        start = 0
        while self.problem is None:
            newline = chunk.find(b"\n", start)
            end = len(chunk) if newline == -1 else newline
            self._line_part(chunk, start, end)
            if newline == -1:
                break
            self._end_line()
            start = newline + 1

    def finish(self) -> None:
        """Call once the whole file went through `feed`."""
        if self.problem is not None:
            return
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            self.problem = InvalidRequest(f"{FORMAT_MESSAGE} (the file is not valid UTF-8).")
            return
        if self._at_start:
            self._at_start = False
            self._scan(self._head.removeprefix(_BOM))
        if self.problem is None:
            self._end_line()

    def _line_part(self, chunk: bytes, start: int, end: int) -> None:
        self._line_bytes += end - start
        if self._line_bytes > self.max_line_bytes:
            self.problem = InvalidRequest(
                f"Line {self._line_number} of the file is longer than {self.max_line_bytes} bytes, "
                "the most one batch request may take."
            )
            return
        if self._line_has_content or end == start:
            return
        content = chunk[start:end].lstrip(_BLANK)
        if not content:
            return
        self._line_has_content = True
        if not self._seen_content:
            self._seen_content = True
            if not content.startswith(b"{"):
                self.problem = InvalidRequest(FORMAT_MESSAGE)

    def _end_line(self) -> None:
        if self._line_has_content:
            self.requests += 1
            if self.requests > self.max_requests:
                self.problem = InvalidRequest(
                    f"The file has more than {self.max_requests} requests, the most one batch may hold."
                )
        self._line_number += 1
        self._line_bytes = 0
        self._line_has_content = False
