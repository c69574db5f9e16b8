"""Request validation with OpenAI's error messages, codes and `param` names.

The messages follow the shapes OpenAI answers with ("Missing required parameter: 'x'.", "Invalid type for 'x': expected
a string, but got an integer instead.", "Invalid value: 'x'. Supported values are: ..."), so code written against
OpenAI that matches on `code` or `param` keeps working.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

import msgspec
from litestar import Request

from batch_gateway.errors import InvalidRequest

EXPIRES_AFTER_MIN_SECONDS = 3600
EXPIRES_AFTER_MAX_SECONDS = 2_592_000
EXPIRES_AFTER_ANCHOR = "created_at"

BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library "
    "correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)

T = TypeVar("T")


# msgspec's words for a field a Struct with forbid_unknown_fields does not have, and where it was.
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<name>[^`]*)`(?: - at `\$\.(?P<path>[^`]*)`)?")


def parse_json(body: bytes, kind: type[T]) -> T:
    """A request body as `kind` (a loosely typed Struct that forbids unknown fields), or OpenAI's answer to a body
    that is not JSON, is not an object, or has a parameter OpenAI does not know (400 `unknown_parameter`)."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:  # not the object `kind` is (a DecodeError too: caught first)
        unknown = _UNKNOWN_FIELD.search(str(exc))
        if unknown is not None and _is_json(body):  # msgspec stops at the field: the rest may not even be JSON
            path = unknown.group("path")
            raise unknown_parameter(f"{path}.{unknown.group('name')}" if path else unknown.group("name")) from None
        raise InvalidRequest(BAD_JSON) from None
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nesting deeper than the decoder may follow
        raise InvalidRequest(BAD_JSON) from None


def expires_after_object(param: str, value: dict) -> int:
    """An `{anchor, seconds}` object (a file's `expires_after`, a batch's `output_expires_after`) in seconds."""
    for key in value:
        if key not in ("anchor", "seconds"):
            raise unknown_parameter(f"{param}.{key}")
    return expires_after_seconds(param, value.get("anchor"), value.get("seconds"))


def _is_json(body: bytes) -> bool:
    try:
        msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def unknown_parameter(param: str) -> InvalidRequest:
    """OpenAI's answer to a body parameter it does not know (it rejects them; it never ignores one)."""
    return InvalidRequest(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")


def json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def missing(param: str) -> InvalidRequest:
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def invalid_type(param: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {json_type_name(value)} instead.",
        param=param,
        code="invalid_type",
    )


def invalid_choice(param: str, value: object, supported: Sequence[str]) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid value: '{value}'. Supported values are: {supported_list(supported)}.",
        param=param,
        code="invalid_value",
    )


def invalid_value(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def supported_list(values: Sequence[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) <= 1:
        return "".join(quoted)
    if len(quoted) == 2:
        return f"{quoted[0]} and {quoted[1]}"
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def required_string(param: str, value: object) -> str:
    if value is None:
        raise missing(param)
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    if value == "":
        raise invalid_value(
            param,
            f"Invalid '{param}': empty string. Expected a string with minimum length 1, but got an empty string "
            "instead.",
        )
    return value


def check_int_range(param: str, value: int, minimum: int, maximum: int) -> int:
    if value < minimum:
        raise invalid_value(
            param,
            f"Invalid '{param}': integer below minimum value. Expected a value >= {minimum}, but got {value} instead.",
        )
    if value > maximum:
        raise invalid_value(
            param,
            f"Invalid '{param}': integer above maximum value. Expected a value <= {maximum}, but got {value} instead.",
        )
    return value


def expires_after_seconds(param: str, anchor: object, seconds: object) -> int:
    """Validate an `{anchor, seconds}` expiry (already pulled apart) and return the seconds."""
    if anchor is None:
        raise missing(f"{param}.anchor")
    if seconds is None:
        raise missing(f"{param}.seconds")
    if not isinstance(anchor, str):
        raise invalid_type(f"{param}.anchor", "a string", anchor)
    if anchor != EXPIRES_AFTER_ANCHOR:
        raise invalid_choice(f"{param}.anchor", anchor, [EXPIRES_AFTER_ANCHOR])
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise invalid_type(f"{param}.seconds", "an integer", seconds)
    return check_int_range(f"{param}.seconds", seconds, EXPIRES_AFTER_MIN_SECONDS, EXPIRES_AFTER_MAX_SECONDS)


# --- query parameters -------------------------------------------------------------------------


def query_str(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    return value if value != "" else None


def query_int(request: Request, name: str, *, default: int, minimum: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid_type(name, "an integer", raw) from None
    return check_int_range(name, value, minimum, maximum)


def query_choice(request: Request, name: str, *, default: str, choices: Sequence[str]) -> str:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if raw not in choices:
        raise invalid_choice(name, raw, choices)
    return raw


def form_int(fields: Mapping[str, str], name: str) -> int | str | None:
    """A form field that should hold an integer: the int, the raw text when it is not one, or None when absent."""
    raw = fields.get(name)
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        return raw
