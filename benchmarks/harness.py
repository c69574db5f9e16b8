"""A local stack for benchmarks: embedded storage in a temp dir, batches created directly, runners as processes,
and the simulator as a process of its own.

The runner is measured as it runs in production: a separate process (`python -m batch_gateway.runner`), so its peak
RSS and CPU time are its own. The simulator runs in another process (`python -m batch_gateway sim`), so the two
share the machine's cores as an engine and a runner would share a node, and neither slows the other's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import psutil

from batch_gateway import ids
from batch_gateway.services import Services
from batch_gateway.settings import Settings
from batch_gateway.sim.engine import SimConfig
from batch_gateway.store.metadata import BatchRecord, FileRecord
from batch_gateway.store.objects import file_key, run_stats_key


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
        self.log = open(self.dir / "runner.log", "ab")  # noqa: SIM115 - every runner's stderr until close()
        self.input_bytes: dict[str, int] = {}  # batch id -> size of its input file

    def with_settings(self, **changes: object) -> Settings:
        return dataclasses.replace(self.settings, **changes)

    async def create_batch(
        self, data: bytes | Iterator[bytes], endpoint: str = "/v1/chat/completions", tenant: str = "bench"
    ) -> str:
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
                FileRecord(
                    id=file_id,
                    tenant=tenant,
                    bytes=size,
                    created_at=now,
                    filename="bench.jsonl",
                    purpose="batch",
                    object_key=file_key(tenant, file_id),
                    expires_at=now + 86400,
                )
            )
            batch_id = ids.new_batch_id()
            self.input_bytes[batch_id] = size
            await services.metadata.insert_batch(
                BatchRecord(
                    id=batch_id,
                    tenant=tenant,
                    endpoint=endpoint,
                    input_file_id=file_id,
                    completion_window="24h",
                    status="validating",
                    created_at=now,
                    expires_at=now + self.settings.completion_window_seconds,
                )
            )
            return batch_id
        finally:
            await services.close()

    def start_runner(self, batch_id: str, settings: Settings | None = None) -> subprocess.Popen:
        env = {**os.environ, **(settings or self.settings).to_env()}
        return subprocess.Popen(
            [sys.executable, "-m", "batch_gateway.runner", "--batch-id", batch_id],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

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

    async def cancel(self, batch_id: str) -> None:
        """Cancel a running batch as the API would (its runner notices within a fraction of a second, finalises the
        batch as cancelled and saves its run_stats)."""
        services = await Services.open(self.settings)
        try:
            await services.metadata.transition(batch_id, ("validating", "in_progress"), "cancelling", ids.now())
        finally:
            await services.close()

    async def run_stats(self, batch_id: str, tenant: str = "bench") -> dict:
        """The runner's own summary of its last run (dispatch seconds, controller limits, retries)."""
        services = await Services.open(self.settings)
        try:
            return msgspec.json.decode(await services.objects.get_bytes(run_stats_key(tenant, batch_id)))
        finally:
            await services.close()

    def close(self) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM (a runner checkpoints and exits), then SIGKILL if it lingers; then wait for the processes it started
    (`serve`'s runners checkpoint once it has gone: a caller removing their data directory must not race them)."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        children = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _, lingering = psutil.wait_procs(children, timeout=grace)
    for child in lingering:
        with contextlib.suppress(psutil.Error):
            child.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimProcess:
    """`python -m batch_gateway sim` on a free loopback port, with every SimConfig field passed as a flag."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self._client = httpx.Client(timeout=10.0)

    def start(self) -> SimProcess:
        flags = ["--port", str(self.port)]
        for name in SimConfig.__struct_fields__:
            value = getattr(self.config, name)
            if name == "models":
                for model in value:
                    flags += ["--model", model]
            elif isinstance(value, bool):
                flags.append(("--" if value else "--no-") + name.replace("_", "-"))
            else:
                flags += ["--" + name.replace("_", "-"), str(value)]
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - the simulator's stderr, read on failure, closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "batch_gateway", "sim", *flags], stdout=subprocess.DEVNULL, stderr=self._log
        )
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                self._log.seek(0)
                raise RuntimeError("the simulator exited: " + self._log.read().decode(errors="replace"))
            with contextlib.suppress(httpx.HTTPError):
                if self._client.get(self.url + "/health").status_code == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the simulator did not start")
            time.sleep(0.1)

    def stats(self) -> dict:
        return self._client.get(self.url + "/sim/stats").json()

    def read_stats(self, client: httpx.Client, itl: bool = False) -> dict:
        """/sim/stats, with the inter-token-latency histogram's totals of /metrics (`itl_sum`, `itl_count`) if asked."""
        stats = client.get(self.url + "/sim/stats").json()
        if itl:
            stats["itl_sum"], stats["itl_count"] = token_latency_totals(client.get(self.url + "/metrics").content)
        return stats

    def set_synthetic_load(self, sequences: int) -> None:
        self._client.post(self.url + "/sim/load", json={"sequences": sequences})

    @property
    def cpu_seconds(self) -> float:
        assert self.process is not None
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self._client.close()
        if self.process is not None:
            stop_process(self.process, 5.0)
            self._log.close()

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_ITL = re.compile(rb"^vllm:inter_token_latency_seconds_(sum|count)\{[^}]*\} (\S+)$", re.M)


def token_latency_totals(text: bytes) -> tuple[float, float]:
    """(sum, count) of the engine's inter-token-latency histogram in a /metrics page, over every label set."""
    totals = {b"sum": 0.0, b"count": 0.0}
    for kind, value in _ITL.findall(text):
        totals[kind] += float(value)
    return totals[b"sum"], totals[b"count"]


class StatsSampler:
    """Samples the simulator's /sim/stats in a thread (independent of any event loop): (monotonic time, stats).
    (Any engine with the simulator's `read_stats` and its keys will do: benchmarks/real_engine.py's llama-server.)

    With `itl`, each sample also holds the engine's inter-token-latency histogram totals from its /metrics
    (`itl_sum`, `itl_count`, as vLLM publishes them), so that `mean_token_latency` can tell the mean time between two
    tokens of a sequence over any window."""

    def __init__(self, sim, interval: float = 0.25, itl: bool = False) -> None:
        self.sim = sim
        self.interval = interval
        self.itl = itl
        self.samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10.0) as client:
            while not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    self.samples.append((time.monotonic(), self.sim.read_stats(client, itl=self.itl)))
                self._stop.wait(self.interval)

    def start(self) -> StatsSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def at(self, when: float) -> dict:
        """The last sample taken at or before `when` (the first sample if none)."""
        best = self.samples[0][1]
        for t, stats in self.samples:
            if t > when:
                break
            best = stats
        return best

    def rate(self, field: str, start: float, end: float) -> float:
        """Per-second increase of a counter between the samples nearest `start` and `end`."""
        inside = [(t, s) for t, s in self.samples if start <= t <= end]
        if len(inside) < 2:
            raise ValueError(f"too few samples between {start:.1f} and {end:.1f}")
        (t0, s0), (t1, s1) = inside[0], inside[-1]
        return (s1[field] - s0[field]) / (t1 - t0)

    def mean_token_latency(self, start: float, end: float) -> float:
        """The engine's mean inter-token latency (seconds) over the samples inside [start, end]: every sequence's
        time between two of its tokens, averaged over the tokens (vLLM's histogram sum over its count)."""
        inside = [s for t, s in self.samples if start <= t <= end]
        if len(inside) < 2 or "itl_sum" not in inside[0]:
            return float("nan")
        tokens = inside[-1]["itl_count"] - inside[0]["itl_count"]
        return (inside[-1]["itl_sum"] - inside[0]["itl_sum"]) / tokens if tokens else float("nan")

    def series(self, field: str, start: float, end: float) -> list[float]:
        return [s[field] for t, s in self.samples if start <= t <= end]


def wait_idle(sim, timeout: float = 60.0) -> None:
    """Wait until the simulator runs and queues nothing (the previous run's requests are gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = sim.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return
        time.sleep(0.2)
    raise TimeoutError("the simulator did not drain")


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


class RunnerMetrics:
    """Samples a runner's Prometheus /metrics (`runner_metrics_port`) in a thread: (monotonic time, {series: value}).

    Series are keyed by name plus labels, e.g. `batch_runner_tokens_total{kind="completion"}`; a runner that has not
    started serving yet (or has exited) is simply not sampled.
    """

    def __init__(self, port: int, interval: float = 0.5) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        with httpx.Client(timeout=5.0) as client:
            while not self._stop.is_set():
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    text = client.get(self.url).text
                    values = {}
                    for family in text_string_to_metric_families(text):
                        for sample in family.samples:
                            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
                    self.samples.append((time.monotonic(), values))
                self._stop.wait(self.interval)

    def start(self) -> RunnerMetrics:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def at(self, when: float) -> dict[str, float]:
        """The last sample taken at or before `when` (empty before the first)."""
        best: dict[str, float] = {}
        for t, values in self.samples:
            if t > when:
                break
            best = values
        return best

    def series(self, prefix: str, start: float, end: float) -> list[float]:
        """Values of every series starting with `prefix`, summed per sample, for samples inside [start, end]."""
        return [
            sum(v for k, v in values.items() if k.startswith(prefix)) for t, values in self.samples if start <= t <= end
        ]

    def increase(self, prefix: str, start: float, end: float) -> float:
        """How much a counter grew between the samples nearest `start` and `end` (0 if never sampled)."""
        before = [sum(v for k, v in s.items() if k.startswith(prefix)) for t, s in self.samples if t <= start]
        after = [sum(v for k, v in s.items() if k.startswith(prefix)) for t, s in self.samples if t <= end]
        return (after[-1] if after else 0.0) - (before[-1] if before else 0.0)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class CpuWatch:
    """Samples the CPU time of some processes (by pid) in a thread, to tell how busy each was in a window."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.interval = interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, name: str, pid: int) -> None:
        """Watch one more process from now on."""
        self.processes = {**self.processes, name: psutil.Process(pid)}

    def _run(self) -> None:
        while not self._stop.is_set():
            values = {}
            for name, process in list(self.processes.items()):
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    values[name] = times.user + times.system
            self.samples.append((time.monotonic(), values))
            self._stop.wait(self.interval)

    def start(self) -> CpuWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def share(self, name: str, start: float, end: float) -> float:
        """Cores used on average by `name` between the samples nearest `start` and `end`."""
        inside = [(t, v[name]) for t, v in self.samples if start <= t <= end and name in v]
        if len(inside) < 2:
            return float("nan")
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0)
