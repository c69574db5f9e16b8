"""Rows to records and back, for the SQL store (`sql_store.py`).

Both databases store the same columns; only the JSON column type differs (`Dialect.json`). Column lists are spelled
out (never `*`) so that bookkeeping columns (`seq`, the runner lease) stay out of the records.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import msgspec

from batch_gateway import wire
from batch_gateway.store.metadata import (
    TRANSITION_FIELDS,
    ApiKeyRecord,
    BatchForecast,
    BatchRecord,
    FileRecord,
    RunnerLoad,
    UploadPartRecord,
    UploadRecord,
    UploadStatus,
    WebhookEventRecord,
)

FILE_COLUMNS: tuple[str, ...] = tuple(FileRecord.__struct_fields__)
BATCH_COLUMNS: tuple[str, ...] = tuple(BatchRecord.__struct_fields__)
KEY_COLUMNS: tuple[str, ...] = tuple(ApiKeyRecord.__struct_fields__)
WEBHOOK_EVENT_COLUMNS: tuple[str, ...] = tuple(WebhookEventRecord.__struct_fields__)
UPLOAD_COLUMNS: tuple[str, ...] = tuple(UploadRecord.__struct_fields__)
UPLOAD_PART_COLUMNS: tuple[str, ...] = tuple(UploadPartRecord.__struct_fields__)
UPLOAD_STATUSES: frozenset[str] = frozenset(status.value for status in UploadStatus)

# Columns holding JSON, with the type each decodes to.
BATCH_JSON_TYPES: dict[str, Any] = {
    "metadata": dict[str, str] | None,
    "errors": list[wire.BatchError] | None,
    "request_counts": wire.RequestCounts,
    "usage": wire.Usage | None,
}

ALL_STATUSES: frozenset[str] = frozenset(wire.BatchStatus)
# Statuses a runner reports progress in; a terminal batch never has its counts rewritten.
LIVE_STATUSES: tuple[str, ...] = (
    wire.BatchStatus.IN_PROGRESS,
    wire.BatchStatus.FINALIZING,
    wire.BatchStatus.CANCELLING,
)
ACTIVE_STATUSES: tuple[str, ...] = tuple(sorted(wire.ACTIVE_STATUSES))

PAGE_ORDERS = ("asc", "desc")


def encode_json(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


def file_from_row(row: Mapping[str, Any]) -> FileRecord:
    return FileRecord(**{name: row[name] for name in FILE_COLUMNS})


def runner_load_from_row(row: Mapping[str, Any]) -> RunnerLoad:
    return RunnerLoad(**{name: row[name] for name in RunnerLoad.__struct_fields__})


def forecast_from_json(raw: str | bytes) -> BatchForecast:
    return msgspec.json.decode(raw, type=BatchForecast)


def key_from_row(row: Mapping[str, Any]) -> ApiKeyRecord:
    return ApiKeyRecord(**{name: row[name] for name in KEY_COLUMNS})


def webhook_event_from_row(row: Mapping[str, Any]) -> WebhookEventRecord:
    return WebhookEventRecord(**{name: row[name] for name in WEBHOOK_EVENT_COLUMNS})


def upload_from_row(row: Mapping[str, Any]) -> UploadRecord:
    return UploadRecord(**{name: row[name] for name in UPLOAD_COLUMNS})


def upload_part_from_row(row: Mapping[str, Any]) -> UploadPartRecord:
    return UploadPartRecord(**{name: row[name] for name in UPLOAD_PART_COLUMNS})


def upload_values(record: UploadRecord) -> list[Any]:
    return [getattr(record, name) for name in UPLOAD_COLUMNS]


def upload_part_values(record: UploadPartRecord) -> list[Any]:
    return [getattr(record, name) for name in UPLOAD_PART_COLUMNS]


def checked_upload_statuses(statuses: Collection[str]) -> list[str]:
    unknown = set(statuses) - UPLOAD_STATUSES
    if unknown:
        raise ValueError(f"unknown upload statuses {sorted(unknown)}")
    return sorted(statuses)


def batch_from_row(row: Mapping[str, Any]) -> BatchRecord:
    """JSON columns arrive as text or bytes (both backends hand them over undecoded) and are decoded by msgspec."""
    values = {name: row[name] for name in BATCH_COLUMNS}
    for name, kind in BATCH_JSON_TYPES.items():
        raw = values[name]
        values[name] = None if raw is None else msgspec.json.decode(raw, type=kind)
    values["status"] = wire.BatchStatus(values["status"])
    return BatchRecord(**values)


def file_values(record: FileRecord) -> list[Any]:
    return [getattr(record, name) for name in FILE_COLUMNS]


def key_values(record: ApiKeyRecord) -> list[Any]:
    return [getattr(record, name) for name in KEY_COLUMNS]


def batch_values(record: BatchRecord, json: Any = encode_json) -> list[Any]:
    """Column values in `BATCH_COLUMNS` order; `json` wraps the JSON columns for the driver."""
    return [
        json(getattr(record, name)) if name in BATCH_JSON_TYPES else getattr(record, name) for name in BATCH_COLUMNS
    ]


def timestamp_column(status: str) -> str | None:
    """The `<status>_at` column set when a batch enters `status` (`validating` has none: it is `created_at`)."""
    if status not in ALL_STATUSES:
        raise ValueError(f"unknown batch status {status!r}")
    return None if status == wire.BatchStatus.VALIDATING else f"{status}_at"


def checked_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """The changes a transition may make; anything else is a programming error, never silently written."""
    unknown = set(changes) - TRANSITION_FIELDS
    if unknown:
        raise ValueError(f"a transition cannot change {sorted(unknown)}; allowed: {sorted(TRANSITION_FIELDS)}")
    return dict(changes)


def checked_statuses(statuses: Collection[str]) -> list[str]:
    unknown = set(statuses) - ALL_STATUSES
    if unknown:
        raise ValueError(f"unknown batch statuses {sorted(unknown)}")
    return sorted(statuses)


def check_page(order: str, limit: int) -> None:
    if order not in PAGE_ORDERS:
        raise ValueError(f"order must be one of {PAGE_ORDERS}, not {order!r}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
