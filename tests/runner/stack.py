"""Run the real runner process on embedded storage, without the API: create a batch, run it, read its files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import msgspec

from batch_gateway import ids
from batch_gateway.services import Services
from batch_gateway.settings import Settings
from batch_gateway.store.metadata import BatchRecord, FileRecord
from batch_gateway.store.objects import file_key, run_stats_key
from tests.fixtures.processes import spawn
from tests.helpers import free_port, jsonl


async def create_batch(settings: Settings, data: bytes, *, expires_in: int = 86400) -> str:
    services = await Services.open(settings)
    try:
        file_id, batch_id, now = ids.new_file_id(), ids.new_batch_id(), ids.now()
        await services.objects.put_bytes(file_key("t", file_id), data)
        await services.metadata.insert_file(
            FileRecord(
                id=file_id,
                tenant="t",
                bytes=len(data),
                created_at=now,
                filename="in.jsonl",
                purpose="batch",
                object_key=file_key("t", file_id),
            )
        )
        await services.metadata.insert_batch(
            BatchRecord(
                id=batch_id,
                tenant="t",
                endpoint="/v1/chat/completions",
                input_file_id=file_id,
                completion_window="24h",
                status="validating",
                created_at=now,
                expires_at=now + expires_in,
            )
        )
        return batch_id
    finally:
        await services.close()


async def results(settings: Settings, batch_id: str) -> tuple[BatchRecord, list[dict], list[dict]]:
    services = await Services.open(settings)
    try:
        batch = await services.metadata.get_batch(batch_id, None)
        out = (
            jsonl(await services.objects.get_bytes(file_key("t", batch.output_file_id))) if batch.output_file_id else []
        )
        err = jsonl(await services.objects.get_bytes(file_key("t", batch.error_file_id))) if batch.error_file_id else []
        return batch, out, err
    finally:
        await services.close()


async def run_stats(settings: Settings, batch_id: str) -> dict:
    services = await Services.open(settings)
    try:
        return msgspec.json.decode(await services.objects.get_bytes(run_stats_key("t", batch_id)))
    finally:
        await services.close()


def start_runner(settings: Settings, batch_id: str, log, *args: str) -> subprocess.Popen:
    """The runner process for the batch, with further command-line `args` (`--give-up REASON`)."""
    env = {**os.environ, **settings.to_env()}
    return spawn(
        [sys.executable, "-m", "batch_gateway.runner", "--batch-id", batch_id, *args], env=env, stdout=log, stderr=log
    )


@contextlib.contextmanager
def upstream_server(handler) -> Iterator[str]:
    """An HTTP server on a loopback port whose `POST /v1/chat/completions` is `handler(request)` (an aiohttp
    coroutine), in a thread of its own: a stand-in for an upstream that answers in ways the simulator does not (a
    proxy's HTML error page, a recorder of headers). Yields its base URL."""
    from aiohttp import web

    port = free_port()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
