"""The body of POST /v1/batches: parsed, validated with OpenAI's errors, and fingerprinted for retry folding."""

from __future__ import annotations

import hashlib
import re

import msgspec

from batch_gateway import wire
from batch_gateway.api.validation import (
    expires_after_object,
    invalid_choice,
    invalid_type,
    invalid_value,
    missing,
    parse_json,
    required_string,
)

OPENAI_WINDOW = "24h"  # OpenAI's only completion window: it lasts the operator's --completion-window-seconds
_WINDOW = re.compile(r"^([1-9][0-9]{0,5})([mhd])$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400}
METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512


class BatchSpec(msgspec.Struct, frozen=True):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    output_expires_after: int | None  # seconds

    def fingerprint(self, tenant: str) -> str:
        """Same tenant and same request (after normalisation) give the same fingerprint."""
        canonical = msgspec.json.encode({"tenant": tenant, "request": self}, order="sorted")
        return hashlib.sha256(canonical).hexdigest()


def parse_batch_create(body: bytes, windows: tuple[str, ...] = (OPENAI_WINDOW,)) -> BatchSpec:
    raw = parse_json(body, wire.BatchCreate)
    return BatchSpec(
        input_file_id=required_string("input_file_id", raw.input_file_id),
        endpoint=_choice("endpoint", raw.endpoint, wire.SUPPORTED_ENDPOINTS),
        completion_window=_choice("completion_window", raw.completion_window, windows),
        metadata=_metadata(raw.metadata),
        output_expires_after=_output_expires_after(raw.output_expires_after),
    )


def completion_windows(allowed: str, openai_window_seconds: int) -> dict[str, int]:
    """The windows clients may ask for (`--completion-windows`, e.g. "1h,4h,24h,72h") and how long each lasts: "24h"
    (OpenAI's only value) lasts `--completion-window-seconds`, every other what it says. Raises ValueError."""
    windows: dict[str, int] = {}
    for label in (item.strip() for item in allowed.split(",")):
        match = _WINDOW.match(label)
        if match is None:
            raise ValueError(
                f"--completion-windows: {label!r} is not a window; use a number and m, h or d, as in 1h,4h,24h,72h"
            )
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        windows[label] = openai_window_seconds if label == OPENAI_WINDOW else seconds
    return windows


def window_label(seconds: int) -> str:
    """A batch's real completion window in OpenAI's notation: "24h", or "90m" or "45s" when not whole hours. A
    client asks for one of the allowed windows; the batch shows the one it has, which its `expires_at` follows (a
    "24h" request gets the operator's `--completion-window-seconds`)."""
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def _choice(param: str, value: object, supported: tuple[str, ...]) -> str:
    if value is None:
        raise missing(param)
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    if value not in supported:
        raise invalid_choice(param, value, supported)
    return value


def _metadata(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_type("metadata", "an object", value)
    if len(value) > METADATA_MAX_PAIRS:
        raise invalid_value(
            "metadata",
            f"Invalid 'metadata': too many properties. Expected an object with at most {METADATA_MAX_PAIRS} "
            f"properties, but got an object with {len(value)} properties instead.",
        )
    for key, item in value.items():
        if len(key) > METADATA_MAX_KEY_CHARS:
            raise invalid_value(
                "metadata",
                f"Invalid 'metadata': key too long. Expected keys with at most {METADATA_MAX_KEY_CHARS} characters, "
                f"but got a key with {len(key)} characters instead.",
            )
        param = f"metadata.{key}"
        if not isinstance(item, str):
            raise invalid_type(param, "a string", item)
        if len(item) > METADATA_MAX_VALUE_CHARS:
            raise invalid_value(
                param,
                f"Invalid '{param}': string too long. Expected a string with maximum length "
                f"{METADATA_MAX_VALUE_CHARS}, but got a string with length {len(item)} instead.",
            )
    return dict(value)


def _output_expires_after(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise invalid_type("output_expires_after", "an object", value)
    return expires_after_object("output_expires_after", value)
