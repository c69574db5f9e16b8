"""What the client shows: plain-text tables, value formats, JSON for scripts, one-line errors and notes on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"

EXIT_CODES_HELP = """\
exit codes:
  0    the batch completed (some requests may still have failed: see the errors file)
  1    error: the server refused a request or could not be reached, or a local file problem
  2    bad command-line arguments
  3    the batch failed (its input did not validate; the errors are printed)
  4    the batch expired before finishing (partial results are downloaded)
  5    the batch was cancelled (partial results are downloaded)
  130  interrupted while waiting: the batch keeps running; `batch-gateway batches watch ID` resumes
"""


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; numbers aligned right. `None` shows as `-`."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    numeric = [bool(rows) and all(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    return str(value)


def format_time(timestamp: int | None) -> str | None:
    """A Unix timestamp as local time, `2025-11-24 09:32:10`."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def format_bytes(size: int | None) -> str | None:
    """`512 B`, `3.4 KB`, `12.0 MB` (powers of 1000, like the OpenAI dashboard)."""
    if size is None:
        return None
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


class CommandError(Exception):
    """A problem the user can fix, reported as one line without a traceback."""


def err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def as_json(obj: Any) -> Any:
    """An SDK object as the server sent it (unknown fields kept, unset ones left out)."""
    return obj.to_dict(mode="json")


def file_id_or_none(value: str | None) -> str | None:
    # Some servers send "" instead of null for a missing file (see the contract, pitfall 2).
    return value or None
