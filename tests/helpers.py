"""Shared test helpers: free ports, batch input files, waiting for batches."""

from __future__ import annotations

import json
import socket
import time

TERMINAL = {"completed", "failed", "expired", "cancelled"}


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
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s: {batch}")
        time.sleep(interval)


def jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]
