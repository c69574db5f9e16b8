"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for load generators.

Load generators share two cores with what they measure, so they must cost as little CPU as possible: this client does
a fraction of httpx's work per request (no header objects, no URL parsing, no pool logic). It speaks just enough
HTTP/1.1 for the simulator: POST/GET with Content-Length bodies, responses with Content-Length.
"""

from __future__ import annotations

import asyncio


class RawConnection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """One exchange; reconnects once if the server closed the idle connection."""
        for attempt in (1, 2):
            if self._writer is None:
                await self._connect()
            try:
                return await self._exchange(method, path, body)
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _exchange(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        assert self._reader is not None and self._writer is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        self._writer.write(head + body)
        await self._writer.drain()
        status_line = await self._reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while True:
            line = await self._reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        payload = await self._reader.readexactly(length) if length else b""
        return status, payload

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


class RawPool:
    """Connections handed out one request at a time; grows as needed, reuses idle ones."""

    def __init__(self, url: str) -> None:
        host_port = url.split("://", 1)[1].rstrip("/")
        host, _, port = host_port.partition(":")
        self.host, self.port = host, int(port or 80)
        self._idle: list[RawConnection] = []

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        connection = self._idle.pop() if self._idle else RawConnection(self.host, self.port)
        try:
            result = await connection.request(method, path, body)
        except BaseException:
            connection.close()
            raise
        self._idle.append(connection)
        return result

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
