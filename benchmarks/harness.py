"""A local stack for benchmarks: embedded storage in a temp dir, batches created directly, runners as processes.

The runner is measured as it runs in production: a separate process (`python -m batch_gateway.runner`), so its peak
RSS and CPU time are its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from batch_gateway import ids
from batch_gateway.services import Services
from batch_gateway.settings import Settings
from batch_gateway.store.metadata import BatchRecord, FileRecord
from batch_gateway.store.objects import file_key


@dataclass
class RunResult:
    seconds: float
    peak_rss_mb: float
    cpu_seconds: float
    exit_code: int
    batch: BatchRecord


class LocalStack:
    def __init__(self, upstream: list[str], **settings: object) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bg-bench-"))
        options = {"log_format": "json", "log_level": "warning", **settings}
        self.settings = Settings(data_dir=str(self.dir), upstream=upstream, **options)
        self.log = open(self.dir / "runner.log", "ab")

    def with_settings(self, **changes: object) -> Settings:
        return dataclasses.replace(self.settings, **changes)

    async def create_batch(self, data: bytes | Iterator[bytes], endpoint: str = "/v1/chat/completions", tenant: str = "bench") -> str:
        services = await Services.open(self.settings)
        try:
            file_id = ids.new_file_id()
            chunks = [data] if isinstance(data, bytes) else data
            size = 0

            async def stream():
                nonlocal size
                for chunk in chunks:
                    size += len(chunk)
                    yield chunk

            await services.objects.put_stream(file_key(tenant, file_id), stream())
            now = ids.now()
            await services.metadata.insert_file(
                FileRecord(id=file_id, tenant=tenant, bytes=size, created_at=now, filename="bench.jsonl", purpose="batch",
                           object_key=file_key(tenant, file_id), expires_at=now + 86400)
            )
            batch_id = ids.new_batch_id()
            await services.metadata.insert_batch(
                BatchRecord(id=batch_id, tenant=tenant, endpoint=endpoint, input_file_id=file_id, completion_window="24h",
                            status="validating", created_at=now, expires_at=now + self.settings.completion_window_seconds)
            )
            return batch_id
        finally:
            await services.close()

    def start_runner(self, batch_id: str, settings: Settings | None = None) -> subprocess.Popen:
        env = {**os.environ, **(settings or self.settings).to_env()}
        return subprocess.Popen([sys.executable, "-m", "batch_gateway.runner", "--batch-id", batch_id], env=env,
                                stdout=subprocess.DEVNULL, stderr=self.log)

    def run_runner(self, batch_id: str, settings: Settings | None = None, timeout: float = 3600) -> RunResult:
        started = time.monotonic()
        process = self.start_runner(batch_id, settings)
        peak, cpu = watch(process, timeout)
        seconds = time.monotonic() - started
        return RunResult(seconds, peak / 2**20, cpu, process.returncode, asyncio.run(self.batch(batch_id)))

    async def batch(self, batch_id: str) -> BatchRecord:
        services = await Services.open(self.settings)
        try:
            batch = await services.metadata.get_batch(batch_id, None)
            assert batch is not None
            return batch
        finally:
            await services.close()

    async def read_file(self, file_id: str | None, tenant: str = "bench") -> bytes:
        if file_id is None:
            return b""
        services = await Services.open(self.settings)
        try:
            return await services.objects.get_bytes(file_key(tenant, file_id))
        finally:
            await services.close()


def watch(process: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Wait for a process; return its peak RSS (bytes, sampled every 50 ms) and CPU seconds."""
    ps = psutil.Process(process.pid)
    peak = 0
    cpu = 0.0
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
            times = ps.cpu_times()
            cpu = times.user + times.system
        except psutil.NoSuchProcess:
            break
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError("runner did not finish in time")
        time.sleep(0.05)
    process.wait()
    return peak, cpu
