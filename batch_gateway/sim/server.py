"""Run the simulator: in a background thread with its own event loop (tests, `serve --simulate`), or in the
foreground."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from batch_gateway.sim.app import SimApp
from batch_gateway.sim.config import SimConfig


def create_sim_app(config: SimConfig | None = None) -> SimApp:
    """The simulator as an ASGI app (with lifespan), for any ASGI server."""
    return SimApp(config or SimConfig())


def uvicorn_config(app: SimApp, **options: Any) -> uvicorn.Config:
    # Hung requests (injected timeouts) must not hold a shutdown for long.
    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=1,
        **options,
    )


class SimServer:
    """The simulator on 127.0.0.1 (a free port unless given), served by uvicorn in a thread with its own loop.

    `with SimServer(SimConfig(time_scale=0.1)) as sim: ... sim.url ...`, or `.start()` and `.stop()`.
    """

    def __init__(self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SimConfig()
        self.app = create_sim_app(self.config)
        # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets of that protocol, and
        # without it a response's head and body (two writes) meet delayed ACKs: +40 ms per request.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))  # bound now, so `.url` is known before start and the port cannot be taken
        self.host, self.port = self._socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._server = uvicorn.Server(uvicorn_config(self.app))
        self._thread: threading.Thread | None = None

    def start(self) -> SimServer:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name=f"sim-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"the simulator did not start on {self.url}")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        self._socket.close()

    def stats(self) -> dict[str, Any]:
        """The same counters as GET /sim/stats, read in-process (taken on the server's loop, so consistent)."""
        loop = next((e.loop for e in self.app.engines.values() if e.loop is not None), None)
        if loop is None or not loop.is_running():
            return self.app.stats()

        async def take() -> dict[str, Any]:
            return self.app.stats()

        return asyncio.run_coroutine_threadsafe(take(), loop).result(10)

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
