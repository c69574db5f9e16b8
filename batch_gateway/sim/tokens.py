"""A deterministic stand-in for a tokenizer, the prefix cache's block hashes, and generated text.

Tokens are approximated as 4 bytes of UTF-8 each (about right for English with a Llama-3-style tokenizer), so the same
text always costs the same and a shared text prefix is a shared token prefix. Token-id prompts count exactly.
Blocks are hashed chained, as vLLM does: a block's hash covers every block before it, so equal hashes mean equal
prefixes, never just an equal block in another context.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import NamedTuple

BYTES_PER_TOKEN = 4
_WORDS = [
    "the", "model", "answers", "each", "question", "with", "care", "and", "a", "short", "example", "while", "the",
    "batch", "keeps", "every", "engine", "busy", "through", "the", "night", "so", "that", "morning", "reports",
    "arrive", "on", "time", "for", "the", "team",
]  # fmt: skip


class Prompt(NamedTuple):
    tokens: int
    block_hashes: list[bytes]  # chained hashes of the prompt's full blocks, first block first
    key: int  # a 64-bit fingerprint of the whole prompt: seeds its output text, length and embedding


def prompt_from_text(text: str, block_size: int) -> Prompt:
    data = text.encode()
    return _prompt(data, max(1, math.ceil(len(data) / BYTES_PER_TOKEN)), block_size * BYTES_PER_TOKEN)


def prompt_from_token_ids(token_ids: list[int], block_size: int) -> Prompt:
    data = struct.pack(f"<{len(token_ids)}q", *token_ids)
    return _prompt(data, max(1, len(token_ids)), block_size * 8)


def _prompt(data: bytes, tokens: int, block_bytes: int) -> Prompt:
    chain = hashlib.blake2b(digest_size=16)
    hashes = []
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        chain.update(data[start : start + block_bytes])
        hashes.append(chain.copy().digest())
    key = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return Prompt(tokens, hashes, key)


def output_text(key: int, tokens: int) -> str:
    """`tokens` words picked by the prompt's fingerprint: the same prompt always gets the same answer."""
    start = key % len(_WORDS)
    return " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(tokens))


def unbounded_output_length(key: int, seed: int, mean: int) -> int:
    """Output length of a request without max_tokens: uniform in [mean/2, 3*mean/2], fixed by prompt and seed."""
    low = max(1, mean // 2)
    high = max(low, mean + mean // 2)
    spread = int.from_bytes(hashlib.blake2b(f"{key}/{seed}".encode(), digest_size=8).digest(), "little")
    return low + spread % (high - low + 1)
