"""Prefix keys: order requests so that those sharing a prompt prefix reach the engine back to back.

The key of a request is built from the text the engine will see first, in order. Its first block is the request's
*static head*: `tools` (canonical JSON) and the leading system/developer messages for chat, `instructions` for
/v1/responses — whatever its length, so requests sharing a system prompt always share their first block. The rest
(the leading turns, with text of string or content-part contents and image URLs; the `prompt` for /v1/completions;
`input` for embeddings) is cut into blocks of growing size (64, 256, 1024 characters: fine near the start, where
prefixes diverge, coarse later). Blocks are hashed chained, so block i's hash covers everything up to block i:
requests sharing a longer prefix share more leading hashes, and a lexicographic sort of the keys puts them next to
each other. BLAKE2b makes keys deterministic across processes and machines (Python's `hash()` is salted per
process).
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import numpy as np

BLOCK_SIZES = (64, 256, 1024)  # after the static head
MAX_BLOCKS = 1 + len(BLOCK_SIZES)

_canonical = msgspec.json.Encoder(order="sorted")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif isinstance(part.get("image_url"), dict):
                    parts.append(f"<image:{part['image_url'].get('url', '')}>")
                else:
                    parts.append(_canonical.encode(part).decode())
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return "" if content is None else _canonical.encode(content).decode()


def prefix_text(endpoint: str, body: dict[str, Any]) -> tuple[str, str]:
    """The normalised text the engine sees first for this request: (static head, the rest)."""
    head: list[str] = []
    rest: list[str] = []
    if body.get("tools"):
        head.append(_canonical.encode(body["tools"]).decode())
    if endpoint == "/v1/chat/completions":
        messages = [m for m in body.get("messages") or () if isinstance(m, dict)]
        leading = True
        for message in messages:
            role = message.get("role", "")
            leading = leading and role in ("system", "developer")
            (head if leading else rest).append(f"<{role}>{_content_text(message.get('content'))}")
    elif endpoint == "/v1/completions":
        prompt = body.get("prompt")
        rest.append(prompt[0] if isinstance(prompt, list) and prompt and isinstance(prompt[0], str) else _content_text(prompt))
    elif endpoint == "/v1/responses":
        if body.get("instructions"):
            head.append(str(body["instructions"]))
        value = body.get("input")
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    rest.append(f"<{item.get('role', '')}>{_content_text(item.get('content'))}")
        else:
            rest.append(_content_text(value))
    else:
        rest.append(_content_text(body.get("input")))
    return "\x1e".join(head), "\x1e".join(rest)


def prefix_key(endpoint: str, body: dict[str, Any]) -> tuple[int, ...]:
    """Chained hashes: the static head, then the blocks of the rest that are present (MAX_BLOCKS at most)."""
    head, rest = prefix_text(endpoint, body)
    hasher = hashlib.blake2b(head.encode(), digest_size=8)
    keys = [_nonzero(hasher)]
    data = rest.encode()
    start = 0
    for size in BLOCK_SIZES:
        block = data[start : start + size]
        if not block:
            break
        hasher.update(block)
        keys.append(_nonzero(hasher))
        start += size
    return tuple(keys)


def _nonzero(hasher) -> int:
    # Never 0: zero pads keys that have fewer blocks, and must sort before any real block.
    return int.from_bytes(hasher.copy().digest(), "big") | 1


def plan_order(keys: np.ndarray) -> np.ndarray:
    """A stable, deterministic order of request indices sorting the (n, MAX_BLOCKS) keys lexicographically."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    # np.lexsort sorts by the last key first, so pass the columns reversed; it is stable, so ties keep input order.
    return np.lexsort(tuple(keys[:, i] for i in range(keys.shape[1] - 1, -1, -1))).astype(np.int64)


def group_ids(sorted_keys: np.ndarray) -> np.ndarray:
    """For keys in planned order, a group number per request: requests sharing their first block (the start of the
    system prompt or tools, where a chat template puts them) form one group, whose prefix one request warms up."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    first = sorted_keys[:, 0]
    starts = np.empty(n, dtype=bool)
    starts[0] = True
    starts[1:] = first[1:] != first[:-1]
    return np.cumsum(starts).astype(np.int64) - 1
