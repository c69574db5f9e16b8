"""Batch inputs and request bodies for the benchmarks: deterministic, streamed, sized on purpose."""

from __future__ import annotations

import random
from collections.abc import Iterator

import msgspec

MODEL = "sim-model"
_WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
    "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray",
    "yankee", "zulu",
]  # fmt: skip
_encode = msgspec.json.Encoder().encode


def words(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def chat_body(user: str, max_tokens: int, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens}


def batch_line(custom_id: str, body: dict) -> bytes:
    return _encode({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}) + b"\n"


def chunked(lines: Iterator[bytes], chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """Group lines into ~1 MiB chunks, so that a million-line input never exists in memory as a whole."""
    buffer = bytearray()
    for line in lines:
        buffer += line
        if len(buffer) >= chunk_bytes:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def small_chat_lines(count: int) -> Iterator[bytes]:
    """Tiny requests (about 130 bytes a line) for the overhead and memory benchmarks."""
    for i in range(count):
        yield batch_line(
            f"r{i}", {"model": MODEL, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 1}
        )


def shared_prefix_bodies(
    prompts: int, per_prompt: int, system_words: int, user_words: int, max_tokens: int, seed: int = 3
) -> list[dict]:
    """`prompts` long system prompts, each shared by `per_prompt` requests with their own user turn; shuffled."""
    systems = [f"You are assistant number {p}. " + words(system_words, seed * 7919 + p) for p in range(prompts)]
    bodies = [
        chat_body(
            f"question {p}-{j}: " + words(user_words, seed * 104729 + p * per_prompt + j), max_tokens, system=systems[p]
        )
        for p in range(prompts)
        for j in range(per_prompt)
    ]
    random.Random(seed).shuffle(bodies)
    return bodies


def batch_body(i: int, seed: int = 1) -> dict:
    """The batch request of the utilisation, interactive and fairness benchmarks: a distinct prompt of about 110
    tokens (no shared prefix) and an output of 64-192 tokens (mean 128), uniformly spread so completions do not come
    in waves."""
    rng = random.Random(seed * 1_000_003 + i)
    return chat_body(f"{seed}-{i}: {words(70, rng.getrandbits(32))}", rng.randint(64, 192))


def batch_lines(count: int, seed: int = 1) -> Iterator[bytes]:
    for i in range(count):
        yield batch_line(f"req-{i}", batch_body(i, seed))


def interactive_body(i: int) -> dict:
    """A short chat turn: a prompt of about 35 tokens and a 64-token answer."""
    return chat_body(f"user {i}: {words(20, 77_777 + i)}", 64)
