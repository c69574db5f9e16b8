"""Shared test helpers: free ports, batch input files, and waiting for something to happen (`eventually`)."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def eventually(
    check: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str | Callable[[], str] = "the condition",
) -> T:
    """Call `check` until it returns something true, and return that; after `timeout` seconds, fail saying `what`
    (a string, or a function that describes the state things are in). Polling, for what a test can only observe
    from outside (another process, a server); an exception `check` raises ends the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout, value))
        time.sleep(interval)


async def eventually_async(
    check: Callable[[], Awaitable[T] | T],
    *,
    timeout: float = 30.0,
    interval: float = 0.01,
    what: str | Callable[[], str] = "the condition",
) -> T:
    """`eventually` inside an event loop: `check` may be a coroutine function, and the loop runs while waiting."""
    deadline = time.monotonic() + timeout
    while True:
        value: Any = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout, value))
        await asyncio.sleep(interval)


def _timed_out(what: str | Callable[[], str], timeout: float, last: object) -> str:
    described = what() if callable(what) else what
    return f"timed out after {timeout} s waiting for {described} (last check: {last!r})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_lines(
    n: int, *, model: str = "sim-model", systems: int = 4, max_tokens: int = 8, prefix: str = "req"
) -> bytes:
    """A JSONL batch input of n chat requests sharing `systems` different system prompts."""
    out = []
    for i in range(n):
        body = {
            "model": model,
            "messages": [
                {"role": "system", "content": f"You are assistant number {i % systems}. " + "Be brief. " * 20},
                {"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
            ],
            "max_tokens": max_tokens,
        }
        out.append(
            json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    return ("\n".join(out) + "\n").encode()


def wait_for(client, batch_id: str, statuses=TERMINAL, timeout: float = 60.0, interval: float = 0.2):
    """The batch, once its status is one of `statuses` (by default: once it has ended)."""
    seen: list = [None]

    def reached():
        seen[0] = client.batches.retrieve(batch_id)
        return seen[0] if seen[0].status in statuses else None

    return eventually(
        reached, timeout=timeout, interval=interval, what=lambda: f"batch {batch_id} to reach {statuses}: {seen[0]}"
    )


def jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]
