"""The API served by a real uvicorn on a loopback port, over the real SQLite store and a file:// object store.

The server runs its own event loop in a thread; tests drive it with the sync `openai` SDK (or httpx for raw HTTP) and
reach the stores through `ApiServer.run`, which runs a coroutine on the server's loop. The only test double is the
executor: it records what the API hands it instead of starting runner processes.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from batch_gateway.api.app import create_app
from batch_gateway.executor.base import Executor, RunState
from batch_gateway.services import Services
from batch_gateway.settings import Settings
from batch_gateway.store.objects import ObjectStore
from batch_gateway.store.signals import NullSignals, Signals
from tests.helpers import free_port


class RecordingExecutor(Executor):
    def __init__(self) -> None:
        self.submitted: list[tuple[str, str]] = []
        self.cancelled: list[str] = []
        self.fail_submit = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def submit(self, batch_id: str, *, tenant: str, model: str | None = None, deadline: float = 0) -> None:
        self.submitted.append((batch_id, tenant))
        if self.fail_submit:
            raise RuntimeError("executor is down (test)")

    async def cancel(self, batch_id: str) -> None:
        self.cancelled.append(batch_id)

    async def state(self, batch_id: str) -> RunState:
        return RunState.RUNNING if any(b == batch_id for b, _ in self.submitted) else RunState.UNKNOWN


class ApiServer:
    def __init__(
        self, data_dir: Path, settings: Settings, signals: Signals | None = None, object_store_url: str | None = None
    ) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.objects_dir = data_dir / "objects"
        self.object_store_url = object_store_url or self.objects_dir.resolve().as_uri()
        self.executor = RecordingExecutor()
        self._signals = signals or NullSignals()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        # (method, path) -> delays (seconds) for the next responses to that route
        self.delayed_responses: dict[tuple[str, str], list[float]] = {}
        self.services: Services | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._clients: list[openai.OpenAI] = []
        self._started = threading.Event()
        self._error: BaseException | None = None

    # --- lifecycle ---
    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self._run_thread, name="api-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._started.is_set():
            if self._error is not None:
                raise RuntimeError("API server failed to start") from self._error
            if time.monotonic() > deadline:
                raise RuntimeError("API server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)

    def _run_thread(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    async def _serve(self) -> None:
        from batch_gateway.store.sqlite import SqliteStore

        self._loop = asyncio.get_running_loop()
        metadata = SqliteStore(str(self.data_dir / "metadata.sqlite3"))
        await metadata.open()
        await self._signals.open()
        self.services = Services(
            settings=self.settings,
            metadata=metadata,
            objects=ObjectStore(self.object_store_url),
            signals=self._signals,
            executor=self.executor,
        )
        app = create_app(self.services)

        async def counting_app(scope, receive, send):
            # Counts requests, to prove what the SDK did (not) retry; can hold a response back, to make it time out.
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            route = (scope["method"], scope["path"])
            self.requests[route] += 1
            delays = self.delayed_responses.get(route)
            if not delays:
                await app(scope, receive, send)
                return
            delay = delays.pop(0)
            held: list[dict] = []

            async def hold(message: dict) -> None:
                held.append(message)

            await app(scope, receive, hold)  # the request is fully handled (and persisted) ...
            await asyncio.sleep(delay)  # ... but the client hears nothing until it gave up
            for message in held:
                await send(message)

        config = uvicorn.Config(
            counting_app, host="127.0.0.1", port=self.port, log_config=None, access_log=False, lifespan="on"
        )
        self._server = uvicorn.Server(config)
        watcher = asyncio.create_task(self._flag_started())
        try:
            await self._server.serve()
        finally:
            watcher.cancel()
            await self._signals.close()
            await metadata.close()

    async def _flag_started(self) -> None:
        while self._server is None or not self._server.started:
            await asyncio.sleep(0.01)
        self._started.set()

    # --- helpers for tests ---
    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the server's loop (where the stores live) and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def client(self, api_key: str = "anything", **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 2)
        client = openai.OpenAI(base_url=self.base_url, api_key=api_key, **kwargs)
        self._clients.append(client)
        return client

    def http(self, api_key: str | None = "anything") -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.root_url, headers=headers, timeout=30)

    def stored_objects(self) -> list[Path]:
        """Every file in the object store directory (temporary files included)."""
        if not self.objects_dir.exists():
            return []
        return sorted(p for p in self.objects_dir.rglob("*") if p.is_file())

    def count(self, method: str, path: str) -> int:
        return self.requests[(method, path)]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    started: list[ApiServer] = []

    def start(signals: Signals | None = None, object_store_url: str | None = None, **overrides: Any) -> ApiServer:
        """A server with these settings; `auth` is `open` unless a test asks for keys (`auth="keys"`)."""
        data_dir = tmp_path / f"gw{len(started)}"
        data_dir.mkdir()
        settings = Settings(data_dir=str(data_dir), **{"auth": "open", **overrides})
        server = ApiServer(data_dir, settings, signals, object_store_url).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory) -> ApiServer:
    return server_factory()


@pytest.fixture
def client(server: ApiServer) -> openai.OpenAI:
    return server.client()
