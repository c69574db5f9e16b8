"""Simulators on loopback for the tests, and small request helpers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from batch_gateway.sim import SimConfig, SimServer

SYSTEM = "You are a careful assistant who answers in full sentences. " * 20  # ~300 tokens: many full cache blocks


def chat(user: str = "hi", *, system: str = SYSTEM, max_tokens: int | None = 4, model: str = "sim-model") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def stats(server: SimServer) -> dict[str, Any]:
    return httpx.get(server.url + "/sim/stats").json()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


@pytest.fixture
def start_sim() -> Iterator[Callable[..., SimServer]]:
    """start_sim(**SimConfig fields) -> a started simulator, stopped after the test."""
    started: list[SimServer] = []

    def start(**overrides: Any) -> SimServer:
        server = SimServer(SimConfig(**overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def sim(start_sim) -> SimServer:
    return start_sim(time_scale=0.02, seed=1)
