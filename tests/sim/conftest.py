"""Simulators on loopback for the tests, and small request helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from batch_gateway.sim import SimConfig, SimServer

SYSTEM = "You are a careful assistant who answers in full sentences. " * 20  # ~300 tokens: many full cache blocks


def chat(
    user: str = "hi", *, system: str = SYSTEM, max_tokens: int | None = 4, model: str = "sim-model"
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def stats(server: SimServer) -> dict[str, Any]:
    return httpx.get(server.url + "/sim/stats").json()


async def post_all(url: str, bodies: list[dict], path: str = "/v1/chat/completions") -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        responses = await asyncio.gather(*(http.post(path, json=body) for body in bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


def send_while_paused(server: SimServer, bodies: list[dict], path: str = "/v1/chat/completions") -> list[dict]:
    """Hold the scheduler, let every request arrive, then release: they are all admitted in the same step."""
    httpx.post(server.url + "/sim/pause")

    async def run() -> list[dict]:
        sending = asyncio.ensure_future(post_all(server.url, bodies, path))
        async with httpx.AsyncClient(base_url=server.url) as http:
            while (await http.get("/sim/stats")).json()["waiting"] < len(bodies):
                await asyncio.sleep(0.005)
            await http.post("/sim/resume")
        return await sending

    return asyncio.run(run())


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
