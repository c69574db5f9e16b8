"""Prefix keys: order requests so that those sharing a prompt prefix reach the engine close together.

**Text.** The key of a request is built from the text the engine sees first, in order:
* chat: the leading system/developer messages, then `tools` (canonical JSON), then the remaining turns. Content may be
  a string or an array of parts: text parts count as text; images, audio and files count as a short hash of their
  data or URL.
* /v1/responses: `instructions`, then `tools`, then `input`.
* /v1/completions: `prompt` (a string, a list of strings, or token ids as JSON).
* embeddings: `input`.

Only the first `COVERED` characters matter.

**Blocks.** That text is cut into blocks of growing size (`BLOCK_SIZES`: 64, 128, ... 8192 bytes, so 16 KiB in all).
The blocks are fine near the start, where prompts diverge, and coarse further in. One exception: the first block ends
where the static head (system/developer messages, tools, instructions) ends, if that comes sooner. Requests that
share a system prompt therefore always share their first block, however short the prompt is.

Blocks are hashed chained: block i's hash covers bytes 0..end of block i. Requests that share a longer prefix
therefore share more leading hashes, and a lexicographic sort of the keys puts them next to each other. BLAKE2b
keeps keys identical across processes and machines (Python's `hash()` is salted per process). A real block never
hashes to 0: 0 pads the keys of short texts.

**Shape of the plan.** `shared_depths` gives, for every request in planned order, how many leading blocks it shares
with the one before it. Its zeros split the plan into *top-level groups*: requests that share at least their first
block. The depths inside a group describe the whole prefix tree; the scheduler uses them to warm each shared prefix
once before the requests that reuse it go out.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import numpy as np

BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
MAX_BLOCKS = len(BLOCK_SIZES)
COVERED = sum(BLOCK_SIZES)
_SEPARATOR = "\x1e"

_canonical = msgspec.json.Encoder(order="sorted")


def _digest(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def _part_text(part: Any) -> str:
    """One content part. Text stands for itself; media stand for a hash of their data (a data: URL can be megabytes)."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return _canonical.encode(part).decode()
    text = part.get("text")
    if isinstance(text, str):
        return text
    kind = part.get("type") or "part"
    return f"<{kind}:{_digest(_canonical.encode({k: v for k, v in part.items() if k != 'type'}))}>"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        return "\n".join(_part_text(part) for part in content)
    return _canonical.encode(content).decode()


class _Text:
    """Accumulates the normalised text, and tells the caller when COVERED characters are reached."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.head = 0  # characters of the static head (system prompt, tools, instructions)

    def end_head(self) -> None:
        self.head = min(self.length, COVERED)

    def add(self, text: str) -> bool:
        """Append; False once enough text has been collected (the rest cannot change the key)."""
        self.parts.append(text)
        self.length += len(text) + 1
        return self.length < COVERED

    def value(self) -> str:
        return _SEPARATOR.join(self.parts)[:COVERED]


def _add_message(text: _Text, message: Any) -> bool:
    if not isinstance(message, dict):
        return text.add(_canonical.encode(message).decode())
    return text.add(f"<{message.get('role', '')}>{_content_text(message.get('content'))}")


def _is_instruction(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in ("system", "developer")


def prefix_text(endpoint: str, body: dict[str, Any]) -> str:
    """The normalised text the engine sees first for this request (at most COVERED characters)."""
    return _normalised(endpoint, body).value()


def _normalised(endpoint: str, body: dict[str, Any]) -> _Text:
    text = _Text()
    if endpoint == "/v1/chat/completions":
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            messages = [messages]
        leading = 0
        while leading < len(messages) and _is_instruction(messages[leading]):
            if not _add_message(text, messages[leading]):
                return text
            leading += 1
        if body.get("tools") and not text.add(_canonical.encode(body["tools"]).decode()):
            return text
        text.end_head()
        for message in messages[leading:]:
            if not _add_message(text, message):
                break
    elif endpoint == "/v1/responses":
        if body.get("instructions") and not text.add(_content_text(body["instructions"])):
            return text
        if body.get("tools") and not text.add(_canonical.encode(body["tools"]).decode()):
            return text
        text.end_head()
        value = body.get("input")
        for item in value if isinstance(value, list) else [value]:
            if not (_add_message(text, item) if isinstance(item, dict) else text.add(_content_text(item))):
                break
    else:  # /v1/completions (prompt) and /v1/embeddings (input)
        value = body.get("prompt") if endpoint == "/v1/completions" else body.get("input")
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            for item in value:
                if not text.add(item):
                    break
        else:
            text.add(_content_text(value))  # a string, or token ids (as JSON: shared id prefixes stay shared)
    return text


def prefix_key(endpoint: str, body: dict[str, Any]) -> tuple[int, ...]:
    """Chained hashes of the blocks of the request's normalised prefix text: one per block present (≥ 1)."""
    text = _normalised(endpoint, body)
    value = text.value()
    data = value.encode()
    hasher = hashlib.blake2b(digest_size=8)
    keys: list[int] = []
    start = 0
    for size in BLOCK_SIZES:
        if not keys and text.head:  # the first block ends with a short static head
            size = min(size, len(value[: text.head].encode()))
        block = data[start : start + size]
        if not block and keys:
            break
        hasher.update(block)
        keys.append(int.from_bytes(hasher.copy().digest(), "big") | 1)  # never 0: 0 is padding
        start += size
    return tuple(keys)


class PrefixKeys:
    """The prefix keys of n requests, stored by depth: `levels[d]` holds block d's key for every request that has more
    than d blocks, in request order. Most prompts are short (one block below 64 bytes), so this takes 1 + 8 × blocks
    bytes per request where a padded (n, MAX_BLOCKS) array takes 64."""

    def __init__(self, counts: np.ndarray, levels: list[np.ndarray]) -> None:
        self.counts = counts  # uint8: blocks per request (0: no key, an invalid line)
        self.levels = [level for level in levels if len(level)]
        for d, level in enumerate(self.levels):
            if len(level) != int(np.count_nonzero(counts > d)):
                raise ValueError(f"level {d} has {len(level)} keys for {np.count_nonzero(counts > d)} requests")

    @classmethod
    def from_padded(cls, keys: np.ndarray) -> PrefixKeys:
        """From an (n, blocks) uint64 array, 0-padded: a request's key ends at its first 0."""
        keys = np.asarray(keys, dtype=np.uint64)
        if keys.ndim != 2:
            raise ValueError(f"keys must be a 2-D array of shape (n, blocks), got shape {keys.shape}")
        counts = np.logical_and.accumulate(keys != 0, axis=1).sum(axis=1).astype(np.uint8)
        return cls(counts, [keys[counts > d, d] for d in range(keys.shape[1])])

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def depth(self) -> int:
        """The most blocks any request has."""
        return len(self.levels)

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes + sum(level.nbytes for level in self.levels)

    def column(self, d: int) -> np.ndarray:
        """Block d's key for every request, 0 where a request has fewer blocks."""
        column = np.zeros(len(self.counts), dtype=np.uint64)
        if d < len(self.levels):
            column[self.counts > d] = self.levels[d]
        return column


def _prefix_keys(keys: PrefixKeys | np.ndarray) -> PrefixKeys:
    return keys if isinstance(keys, PrefixKeys) else PrefixKeys.from_padded(keys)


def plan_order(keys: PrefixKeys | np.ndarray) -> np.ndarray:
    """A deterministic order of request indices, from `PrefixKeys` or an (n, MAX_BLOCKS) uint64 array (0-padded).

    Keys are sorted lexicographically (stable: ties keep input order), then top-level groups (requests sharing their
    first block) are ordered by size, largest first, ties in key order. Large groups start early, when their warm-up
    is cheapest to hide. Requests that share nothing come last and make good filler for the final minutes.

    Memory: a few n-long arrays at a time (one key column, the order, the sort's result), never all columns at once."""
    keys = _prefix_keys(keys)
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Lexicographic and stable: a stable sort by each block in turn, the deepest first (np.lexsort's method, but it
    # copies every column up front).
    order = np.arange(n, dtype=np.int64)
    for d in range(keys.depth - 1, -1, -1):
        column = keys.column(d)
        if d < keys.depth - 1:
            column = column[order]
        by_block = np.argsort(column, kind="stable")
        del column
        order = by_block if d == keys.depth - 1 else order[by_block]
        del by_block
    if keys.depth == 0:
        return order
    first = keys.column(0)[order]
    boundary = np.empty(n, dtype=bool)
    boundary[0] = True
    np.not_equal(first[1:], first[:-1], out=boundary[1:])
    del first
    starts = np.flatnonzero(boundary)
    del boundary
    sizes = np.diff(starts, append=n)
    if (sizes == sizes[0]).all():
        return order  # groups of one size (all singletons, say) keep key order
    group_rank = np.argsort(-sizes, kind="stable")  # groups by size, largest first, ties in key order
    # Move each group whole, in rank order. `source[p]` is the position in key order of planned position p: it steps
    # by one inside a group and jumps at each group's start, so it is a cumulative sum of those steps.
    moved_starts, moved_sizes = starts[group_rank], sizes[group_rank]
    del starts, sizes, group_rank
    source = np.ones(n, dtype=np.int64)
    previous_last = np.empty_like(moved_starts)
    previous_last[0] = 0
    previous_last[1:] = (moved_starts + moved_sizes - 1)[:-1]
    source[np.cumsum(moved_sizes) - moved_sizes] = moved_starts - previous_last
    del moved_starts, moved_sizes, previous_last
    np.cumsum(source, out=source)
    return order[source]


def shared_depths(keys: PrefixKeys | np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """How many leading blocks each request shares with the one planned before it (0 for the first request and at
    every top-level group boundary). `keys` are in planned order, or give the keys as ingested plus `order` (from
    `plan_order`, possibly filtered). Works one key column at a time."""
    keys = _prefix_keys(keys)
    n = len(keys) if order is None else len(order)
    depths = np.zeros(n, dtype=np.uint8)
    if n < 2:
        return depths
    sharing = np.ones(n - 1, dtype=bool)  # shares every block so far with its predecessor
    for d in range(keys.depth):
        column = keys.column(d)
        if order is not None:
            column = column[order]
        sharing &= (column[1:] == column[:-1]) & (column[1:] != 0)
        del column
        if not sharing.any():
            break
        depths[1:] += sharing
    return depths


def group_ids(keys: PrefixKeys | np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """A top-level group number per planned request (arguments as for `shared_depths`). A group is a run of
    requests sharing at least their first block (the first 64 bytes: a system prompt's opening, or the start of a
    shared prompt); the scheduler's warm-up works on the whole prefix tree within it (see `shared_depths`)."""
    depths = shared_depths(keys, order)
    if len(depths) == 0:
        return np.zeros(0, dtype=np.int64)
    groups = np.cumsum(depths == 0, dtype=np.int64)
    groups -= 1
    return groups
