"""The API app over the real SQLite store and a file:// object store, driven with the sync `openai` SDK (or httpx for
raw HTTP).

By default the app is served in-process: Litestar's test client runs it on an event loop in a thread of its own, and
the SDK's requests reach it through an in-memory transport, with no socket and no server. `server_factory(
real_http=True)` serves it with a real uvicorn on a loopback port instead, for what only real HTTP shows: client
timeouts and the SDK's retries after them, chunked request bodies, streaming a large upload. Those tests are marked
`e2e`.

Tests reach the stores through `ApiServer.run`, which runs a coroutine on the app's loop. The only test double is the
executor (tests/fakes/executor.py): it records what the API hands it instead of starting runner processes.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from litestar.testing import TestClient
from litestar.testing.transport import TestClientTransport

from batch_gateway.api.app import create_app
from batch_gateway.api.state import authenticator_in
from batch_gateway.services import Services
from batch_gateway.settings import Settings
from batch_gateway.store.objects import ObjectStore
from batch_gateway.store.signals import NullSignals, Signals
from batch_gateway.store.sqlite import SqliteStore
from tests.fakes.executor import RecordingExecutor
from tests.helpers import eventually, free_port

IN_PROCESS_ROOT = "http://gateway.test"


class ApiServer:
    def __init__(
        self,
        data_dir: Path,
        settings: Settings,
        signals: Signals | None = None,
        object_store_url: str | None = None,
        *,
        real_http: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.real_http = real_http
        self.objects_dir = data_dir / "objects"
        self.executor = RecordingExecutor()
        self.services = Services(
            settings=settings,
            metadata=SqliteStore(str(data_dir / "metadata.sqlite3")),
            objects=ObjectStore(object_store_url or self.objects_dir.resolve().as_uri()),
            signals=signals or NullSignals(),
            executor=self.executor,
        )
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        # (method, path) -> delays (seconds) for the next responses to that route (real HTTP only)
        self.delayed_responses: dict[tuple[str, str], list[float]] = {}
        app = create_app(self.services)
        self.authenticator = authenticator_in(app)
        self.app = self._counting(app)
        self.root_url = f"http://127.0.0.1:{free_port()}" if real_http else IN_PROCESS_ROOT
        self.base_url = self.root_url + "/v1"
        self._test_client: TestClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._clients: list[openai.OpenAI | httpx.Client] = []

    # --- lifecycle ---
    def start(self) -> ApiServer:
        if self.real_http:
            self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="api-server", daemon=True)
            self._thread.start()
            eventually(lambda: self._server is not None and self._server.started, timeout=15, what="uvicorn")
        else:
            self._test_client = TestClient(self.app, base_url=IN_PROCESS_ROOT).__enter__()
            self.run(self._open_stores())
        return self

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        if self._test_client is not None:
            self.run(self._close_stores())
            self._test_client.__exit__(None, None, None)

    async def _open_stores(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.services.metadata.open()
        await self.services.signals.open()

    async def _close_stores(self) -> None:
        await self.services.signals.close()
        await self.services.metadata.close()

    async def _serve(self) -> None:
        await self._open_stores()
        port = int(self.root_url.rsplit(":", 1)[1])
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        try:
            await self._server.serve()
        finally:
            await self._close_stores()

    def _counting(self, app):
        """The app, counting requests (to prove what the SDK did (not) retry); it can also hold a response back, to
        make the client time out."""

        async def counting_app(scope, receive, send):
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

        return counting_app

    # --- helpers for tests ---
    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the app's loop (where the stores live) and return its result."""
        if self._test_client is not None:
            return self._test_client.blocking_portal.call(_awaited, coro)
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def _transport(self) -> httpx.BaseTransport | None:
        return InProcess(self._test_client) if self._test_client is not None else None

    def client(self, api_key: str = "anything", **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 2)
        if self._test_client is not None:
            kwargs.setdefault("http_client", httpx.Client(transport=self._transport()))
        client = openai.OpenAI(base_url=self.base_url, api_key=api_key, **kwargs)
        self._clients.append(client)
        return client

    def http(self, api_key: str | None = "anything") -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        http = httpx.Client(base_url=self.root_url, headers=headers, timeout=30, transport=self._transport())
        self._clients.append(http)
        return http

    def stored_objects(self) -> list[Path]:
        """Every file in the object store directory (temporary files included)."""
        if not self.objects_dir.exists():
            return []
        return sorted(p for p in self.objects_dir.rglob("*") if p.is_file())

    def count(self, method: str, path: str) -> int:
        return self.requests[(method, path)]


class InProcess(httpx.BaseTransport):
    """httpx's requests, handed to the app on the test client's loop (Litestar's test transport, which httpx cannot
    close)."""

    def __init__(self, test_client: TestClient) -> None:
        self._transport = TestClientTransport(test_client)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._transport.handle_request(request)


async def _awaited(coro: Coroutine[Any, Any, Any]) -> Any:
    return await coro


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator:
    started: list[ApiServer] = []

    def start(
        signals: Signals | None = None, object_store_url: str | None = None, real_http: bool = False, **overrides: Any
    ) -> ApiServer:
        """A server with these settings; `auth` is `open` unless a test asks for keys (`auth="keys"`)."""
        data_dir = tmp_path / f"gw{len(started)}"
        data_dir.mkdir()
        settings = Settings(data_dir=str(data_dir), **{"auth": "open", **overrides})
        server = ApiServer(data_dir, settings, signals, object_store_url, real_http=real_http).start()
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
