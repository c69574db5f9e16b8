"""The body of POST /v1/batches: parsed, validated with OpenAI's errors, and fingerprinted for retry folding."""

from __future__ import annotations

import hashlib

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

COMPLETION_WINDOWS = ("24h",)  # what clients may ask for, as at OpenAI; the window itself is the operator's
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


def parse_batch_create(body: bytes) -> BatchSpec:
    raw = parse_json(body, wire.BatchCreate)
    return BatchSpec(
        input_file_id=required_string("input_file_id", raw.input_file_id),
        endpoint=_choice("endpoint", raw.endpoint, wire.SUPPORTED_ENDPOINTS),
        completion_window=_choice("completion_window", raw.completion_window, COMPLETION_WINDOWS),
        metadata=_metadata(raw.metadata),
        output_expires_after=_output_expires_after(raw.output_expires_after),
    )


def window_label(seconds: int) -> str:
    """A batch's real completion window in OpenAI's notation: "24h", or "90m" or "45s" when not whole hours. A
    client asks for "24h" (the only value OpenAI accepts); the batch shows the window the operator configured
    (`--completion-window-seconds`), which its `expires_at` follows."""
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
