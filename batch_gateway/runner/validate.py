"""Validation of one input line, with OpenAI's error codes.

OpenAI validates the whole file before running anything and reports every bad line (1-based `line`, `param`); we do
the same. Per-line checks live here; whole-file checks (duplicate custom_id, mixed models, empty file, too many
requests) live in `ingest.py`, which sees every line.
"""

from __future__ import annotations

from typing import Any

import msgspec

from batch_gateway.wire import BatchError

_ENDPOINT_LABEL = {
    "/v1/chat/completions": "Chat Completions",
    "/v1/completions": "Completions",
    "/v1/embeddings": "Embeddings",
    "/v1/responses": "Responses",
    "/v1/moderations": "Moderations",
    "/v1/images/generations": "Images",
    "/v1/images/edits": "Images",
    "/v1/videos": "Videos",
}
# What each endpoint's body must carry, as (any of these fields, the name in the error): a Responses request takes
# its input from `input`, a stored prompt template (`prompt`) or a conversation; an image edit needs its image(s).
_REQUIRED: dict[str, list[tuple[tuple[str, ...], str]]] = {
    "/v1/chat/completions": [(("messages",), "Messages")],
    "/v1/completions": [(("prompt",), "Prompt")],
    "/v1/embeddings": [(("input",), "Input")],
    "/v1/responses": [(("input", "prompt", "conversation"), "Input")],
    "/v1/moderations": [(("input",), "Input")],
    "/v1/images/generations": [(("prompt",), "Prompt")],
    "/v1/images/edits": [(("prompt",), "Prompt"), (("image", "images"), "Image")],
    "/v1/videos": [(("prompt",), "Prompt")],
}


class ValidLine(msgspec.Struct):
    custom_id: str
    model: str
    body: dict[str, Any]


def validate_line(raw: bytes, line_no: int, endpoint: str) -> ValidLine | list[BatchError]:
    """Check one JSONL line against the batch's endpoint; return the parsed request or its errors."""
    try:
        obj = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested deeper than the decoder may follow
        return [_err("invalid_json_line", "This line is not parseable as valid JSON.", None, line_no)]
    if not isinstance(obj, dict):
        return [_err("invalid_json_line", "This line is not a JSON object.", None, line_no)]

    errors: list[BatchError] = []
    for name in ("custom_id", "method", "url", "body"):
        if obj.get(name) is None:
            errors.append(_err("missing_required_parameter", f"Missing required parameter: '{name}'.", name, line_no))
    if errors:
        return errors

    custom_id, method, url, body = obj["custom_id"], obj["method"], obj["url"], obj["body"]
    if not isinstance(custom_id, str) or not custom_id:
        errors.append(_err("invalid_type", "'custom_id' must be a non-empty string.", "custom_id", line_no))
    if method != "POST":  # as at OpenAI, exactly "POST": "post" is refused too
        errors.append(
            _err(
                "invalid_value", f"Invalid value for 'method': {method!r}. Only 'POST' is supported.", "method", line_no
            )
        )
    if not isinstance(url, str) or url != endpoint:
        # A relative path equal to the batch endpoint is the only accepted URL: an absolute URL would let a line
        # send the gateway's upstream credentials anywhere (the peer's SSRF hole).
        errors.append(
            _err("invalid_url", "The URL provided for this request does not match the batch endpoint.", "url", line_no)
        )
    if not isinstance(body, dict):
        errors.append(_err("invalid_type", "'body' must be a JSON object.", "body", line_no))
        return errors

    if body.get("stream") is True:
        label = _ENDPOINT_LABEL.get(endpoint, "This endpoint")
        errors.append(
            _err(
                "streaming_unsupported",
                f"{label}: Streaming is not supported in the Batch API.",
                "body.stream",
                line_no,
            )
        )
    model = body.get("model")
    if model is None or model == "":
        errors.append(_err("invalid_request", "Model parameter is required.", "body.model", line_no))
    elif not isinstance(model, str):
        errors.append(_err("invalid_type", "'body.model' must be a string.", "body.model", line_no))
    for fields, label in _REQUIRED.get(endpoint, ()):
        if not any(_present(body.get(name)) for name in fields):
            alternatives = " or ".join(f"'{name}'" for name in fields[1:])
            message = f"{label} parameter is required." + (
                f" (It may also come from {alternatives}.)" if alternatives else ""
            )
            errors.append(_err("invalid_request", message, f"body.{fields[0]}", line_no))
    if errors or not isinstance(model, str):  # a model that is no string is among the errors
        return errors
    return ValidLine(custom_id=custom_id, model=model, body=body)


def _present(value: object) -> bool:
    """Given and not empty: `null`, "" and [] carry nothing to send."""
    return value is not None and value != "" and value != [] and value != {}


def _err(code: str, message: str, param: str | None, line: int | None) -> BatchError:
    return BatchError(code=code, message=message, param=param, line=line)
