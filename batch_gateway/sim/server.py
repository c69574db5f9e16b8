"""Run the simulator: in a background thread (tests, `serve --simulate`) or in the foreground (`batch-gateway sim`)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from batch_gateway.sim.app import SimApp
from batch_gateway.sim.engine import SimConfig


def create_sim_app(config: SimConfig) -> SimApp:
    return SimApp(config)


class SimServer:
    """The simulator on 127.0.0.1 (a free port unless given), served by uvicorn in a thread with its own loop."""

    def __init__(self, config: SimConfig | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SimConfig()
        self.app = create_sim_app(self.config)
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on", timeout_keep_alive=30)
        )
        self._thread: threading.Thread | None = None

    def start(self) -> SimServer:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the simulator did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread:
            self._thread.join(10)
        self._socket.close()

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
