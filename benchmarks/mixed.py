"""Interactive users and batch work on one engine: what the interactive, phases and fairness benchmarks share.

`run_mixed` starts the batch clients (real runner processes, or the peer's AIMD client as a process of its own) and,
at the same moment, an open-loop Poisson stream of interactive chat turns sent straight to the engine from this
process, whose rate may change in phases. Meanwhile it samples the engine (the simulator's /sim/stats and the
inter-token-latency histogram of its /metrics, 4 times a second) and each runner's Prometheus /metrics (twice a
second). At the end each runner's batch is cancelled, as a user would, so that the runner finalises it and saves its
run_stats (the controller's last snapshot), and the peer is stopped. `Mixed.figures` then gives any window's figures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from benchmarks.harness import (
    CpuWatch,
    LocalStack,
    RunnerMetrics,
    SimProcess,
    StatsSampler,
    free_port,
    mean,
    stop_process,
    wait_idle,
)
from benchmarks.loadgen import LoadResult, percentile, poisson_phases
from benchmarks.peer import PeerReport
from benchmarks.workloads import batch_lines, chunked, interactive_body

COMPLETION = 'batch_runner_tokens_total{kind="completion"}'
SERIES_DIR = Path(tempfile.gettempdir()) / "bg-bench-series"  # time series of the runs, for a closer look


@dataclass(frozen=True)
class Batch:
    """A batch client beside the interactive stream: the real runner with some settings, or the peer's client."""

    label: str
    peer: bool = False
    settings: dict = field(default_factory=dict)  # runner settings, e.g. {"fixed_concurrency": 16}
    tenant: str = "bench"
    start_after: float = 0.0  # seconds after the interactive stream's start


@dataclass
class BatchRun:
    batch: Batch
    process: subprocess.Popen | None = None
    batch_id: str | None = None  # the runner's batch
    metrics: RunnerMetrics | None = None
    input: Path | None = None  # the peer's requests
    out: Path | None = None  # the peer's report file
    run_stats: dict | None = None
    peer: PeerReport | None = None
    status: str | None = None

    def tokens(self, start: float, end: float) -> float:
        """Output tokens of the batch's requests answered in [start, end)."""
        if self.peer is not None:
            return sum(
                tokens
                for sent, latency, status, tokens in self.peer.samples
                if status == 200 and start <= sent + latency < end
            )
        assert self.metrics is not None
        return self.metrics.increase(COMPLETION, start, end)

    def limit(self, start: float, end: float) -> float:
        if self.peer is not None:
            return mean([self.peer_limit_at(start + (end - start) * i / 100) for i in range(100)])
        assert self.metrics is not None
        return mean(self.metrics.series("batch_runner_concurrency_limit", start, end))

    def peer_limit_at(self, when: float) -> float:
        assert self.peer is not None
        limit = self.peer.limits[0][1]
        for t, value in self.peer.limits:
            if t > when:
                break
            limit = value
        return float(limit)

    def failures(self) -> int:
        if self.peer is not None:
            return sum(1 for _, _, status, _ in self.peer.samples if status != 200) + self.peer.errors
        return 0


@dataclass
class Mixed:
    started: float  # monotonic: the interactive stream's first phase and the batch clients began here
    interactive: LoadResult
    engine: StatsSampler
    batches: list[BatchRun]
    cpu: CpuWatch

    def latencies(self, start: float, end: float) -> list[float]:
        """Interactive latencies (end to end, as the client saw them) of the requests sent in [start, end)."""
        return [s.latency for s in self.interactive.between(start, end) if s.status == 200]

    def figures(self, start: float, end: float) -> dict:
        """The window's figures, for requests sent in it (latencies) and answers received in it (rates)."""
        latencies = self.latencies(start, end)
        seconds = end - start
        inside = [s for t, s in self.engine.samples if start <= t <= end]
        times = [t for t, _ in self.engine.samples if start <= t <= end]
        return {
            "requests": len(latencies),
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "itl": self.engine.mean_token_latency(start, end),
            "failures": sum(1 for s in self.interactive.between(start, end) if s.status != 200),
            "interactive_rate": self.interactive.tokens_finished_between(start, end) / seconds,
            "batch_rates": [b.tokens(start, end) / seconds for b in self.batches],
            "batch_rate": sum(b.tokens(start, end) for b in self.batches) / seconds,
            "engine_rate": self.engine.rate("generation_tokens", start, end),
            "running": mean([s["running"] for s in inside]),
            "waiting": mean([s["waiting"] for s in inside]),
            "limit": sum(b.limit(start, end) for b in self.batches) if self.batches else None,
            "batch_failures": sum(b.failures() for b in self.batches),
            # The engine is sampled 4 times a second from a thread of this process: a longer gap means the machine
            # stalled us all (other processes on the shared cores), and the latencies around it are the machine's.
            "stall": max((b - a for a, b in itertools.pairwise(times)), default=float("nan")),
            "sim_cpu": self.cpu.share("simulator", start, end),
            "runner_cpu": sum(self.cpu.share(f"batch{i}", start, end) for i in range(len(self.batches)))
            if self.batches
            else None,
        }

    def timeline(self, step: float = 1.0) -> list[dict]:
        """Per `step` seconds since the start: the engine's gauges, the interactive requests sent, and each batch
        client's limit and in-flight requests (with the runner's view: shared or not, interactive load, slowdown)."""
        end = max(t for t, _ in self.engine.samples)
        rows = []
        t = self.started
        while t < end:
            stats = self.engine.at(t)
            row: dict = {
                "t": round(t - self.started, 1),
                "running": stats["running"],
                "waiting": stats["waiting"],
                "interactive_sent": len(self.interactive.between(t - step, t)),
            }
            sent = self.latencies(t - step, t)
            row["interactive_mean_latency"] = round(mean(sent), 3) if sent else None
            for i, b in enumerate(self.batches):
                if b.peer is not None:
                    row[f"b{i}_limit"] = b.peer_limit_at(t)
                    continue
                assert b.metrics is not None
                values = b.metrics.at(t)
                for key, name in (
                    ("limit", "batch_runner_concurrency_limit"),
                    ("inflight", "batch_runner_requests_in_flight"),
                    ("shared", "batch_runner_engine_shared"),
                    ("interactive", "batch_runner_interactive_load"),
                    ("slowdown", "batch_runner_interactive_slowdown"),
                    ("step_ms", "batch_runner_engine_step_seconds"),
                ):
                    value = sum(v for k, v in values.items() if k.startswith(name))
                    row[f"b{i}_{key}"] = round(value * 1000, 2) if key == "step_ms" else round(value, 3)
            rows.append(row)
            t += step
        return rows

    def save(self, name: str) -> Path:
        """The timeline and each runner's run_stats as JSON under SERIES_DIR (not part of the report)."""
        SERIES_DIR.mkdir(exist_ok=True)
        path = SERIES_DIR / f"{name}.json"
        path.write_text(
            json.dumps({"timeline": self.timeline(), "run_stats": [b.run_stats for b in self.batches]}, indent=1)
        )
        return path


def _interactive(i: int) -> bytes:
    return msgspec.json.encode(interactive_body(i))


def run_mixed(
    sim: SimProcess,
    stack: LocalStack | None,
    phases: list[tuple[float, float]],
    batches: list[Batch],
    requests: int = 0,
    seed: int = 1,
    interactive: Callable[[int], bytes] = _interactive,
    lines: Callable[[int, int], Iterator[bytes]] = batch_lines,
    interactive_seed: int = 11,
) -> Mixed:
    """Run the interactive `phases` ([(seconds, requests/s)]) with `batches` beside them, each of `requests` lines
    (`lines(requests, seed)`; every batch its own seed), each started `start_after` seconds after the first phase
    began. The same `interactive_seed` gives the same arrivals in each phase (`poisson_phases`); the users' bodies are
    `seed`'s own, so that a run does not find the prompts of an earlier one in the engine's prompt cache."""
    wait_idle(sim)
    runs: list[BatchRun] = []
    duration = sum(seconds for seconds, _ in phases)
    scratch = Path(tempfile.mkdtemp(prefix="bg-bench-peer-"))
    cpu = CpuWatch({"simulator": sim.process.pid}).start()
    engine = StatsSampler(sim, itl=True)
    try:
        for n, batch in enumerate(batches):
            if batch.peer:
                data = scratch / f"input-{n}.jsonl"
                with open(data, "wb") as f:
                    for chunk in chunked(lines(requests, seed * 10 + n)):
                        f.write(chunk)
                runs.append(BatchRun(batch, input=data, out=scratch / f"report-{n}.json"))
            else:
                assert stack is not None
                batch_id = asyncio.run(stack.create_batch(chunked(lines(requests, seed * 10 + n)), tenant=batch.tenant))
                runs.append(BatchRun(batch, batch_id=batch_id))
        engine.start()

        def launch(n: int, run: BatchRun) -> None:
            if run.batch.peer:
                run.process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "benchmarks.peer",
                        "--url",
                        sim.url,
                        "--input",
                        str(run.input),
                        "--duration",
                        str(duration + 60),
                        "--out",
                        str(run.out),
                    ],
                    env={
                        **os.environ,
                        "PYTHONPATH": os.pathsep.join(
                            filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])
                        ),
                    },
                    stdout=subprocess.DEVNULL,
                )
            else:
                assert stack is not None and run.batch_id is not None
                port = free_port()
                run.metrics = RunnerMetrics(port).start()
                settings = stack.with_settings(runner_metrics_port=port, cancel_grace=0.0, **run.batch.settings)
                run.process = stack.start_runner(run.batch_id, settings)
            cpu.add(f"batch{n}", run.process.pid)

        async def drive(started: float) -> LoadResult:
            async def later(n: int, run: BatchRun) -> None:
                await asyncio.sleep(max(0.0, started + run.batch.start_after - time.monotonic()))
                launch(n, run)

            delayed = [asyncio.create_task(later(n, run)) for n, run in enumerate(runs) if run.batch.start_after > 0]
            load = await poisson_phases(sim.url, interactive, phases, seed=interactive_seed, started=started, draw=seed)
            await asyncio.gather(*delayed)
            return load

        for n, run in enumerate(runs):
            if run.batch.start_after <= 0:
                launch(n, run)
        started = time.monotonic()
        try:
            load = asyncio.run(drive(started))
            for run in runs:
                if run.process is None or run.process.poll() is not None:
                    raise RuntimeError(
                        f"{run.batch.label}: the batch client ended before the interactive stream did; "
                        "give it more requests"
                    )
        finally:
            _finish(stack, runs)
        return Mixed(started, load, engine, runs, cpu)
    finally:
        engine.stop()
        cpu.stop()
        for run in runs:
            if run.process is not None and run.process.poll() is None:
                run.process.kill()
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()


def _finish(stack: LocalStack | None, runs: list[BatchRun]) -> None:
    """Cancel every runner's batch (it finalises and saves its run_stats) and stop every peer, all at once."""
    for run in runs:
        if run.process is None:
            continue
        if run.batch.peer:
            if run.process.poll() is None:
                run.process.send_signal(signal.SIGTERM)  # it writes its report and exits
        elif run.process.poll() is None:
            assert stack is not None and run.batch_id is not None
            asyncio.run(stack.cancel(run.batch_id))
    for run in runs:
        if run.process is None:
            continue
        try:
            run.process.wait(60)
        except subprocess.TimeoutExpired:
            stop_process(run.process)
        if run.metrics is not None:
            run.metrics.stop()
        if run.batch.peer:
            assert run.out is not None
            if run.out.exists():
                run.peer = msgspec.json.decode(run.out.read_bytes(), type=PeerReport)
        else:
            assert stack is not None and run.batch_id is not None
            run.status = asyncio.run(stack.batch(run.batch_id)).status
            try:
                run.run_stats = asyncio.run(stack.run_stats(run.batch_id, run.batch.tenant))
            except Exception:
                run.run_stats = None
