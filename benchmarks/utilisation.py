"""`utilisation`: how much of the engine's capacity a batch alone gets, adaptive versus fixed concurrency.

Capacity is measured first by saturating the simulator directly (closed loop at 2x max_num_seqs, same request mix).
Then the real runner runs a batch against the idle simulator, once per setting; each setting's steady-state output
rate is measured over the same window after its first token, so slow start is excluded from the steady figure (and
included in the whole-run figure of the default setting, which runs its batch to the end).
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from batch_gateway.sim import SimConfig
from benchmarks import report
from benchmarks.harness import (
    CpuWatch,
    LocalStack,
    RunnerMetrics,
    SimProcess,
    StatsSampler,
    free_port,
    mean,
    stop_process,
)
from benchmarks.loadgen import measure_capacity
from benchmarks.workloads import batch_body, batch_lines, chunked

NAME = "utilisation"
TITLE = "Utilisation: batch-only throughput versus capacity"

TIME_SCALE = 0.5
CAPACITY_CONCURRENCY = 256  # 2x max_num_seqs
CAPACITY_WARMUP, CAPACITY_WINDOW = 8.0, 20.0
WARMUP = 12.0  # real seconds after the batch's first token before the steady window opens
WINDOW = 25.0
SETTINGS = (("adaptive (defaults)", 0), ("fixed 8", 8), ("fixed 64", 64), ("fixed 512", 512))
TARGET = 0.95


def wait_first_token(sampler: StatsSampler, baseline: int, process, timeout: float = 120.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sampler.samples and sampler.samples[-1][1]["generation_tokens"] > baseline:
            return sampler.samples[-1][0]
        if process.poll() is not None:
            raise RuntimeError(f"the runner exited ({process.returncode}) before its first token")
        time.sleep(0.05)
    raise TimeoutError("no token from the batch")


def run_setting(sim: SimProcess, stack: LocalStack, fixed: int, requests: int, seed: int, to_the_end: bool) -> dict:
    batch_id = asyncio.run(stack.create_batch(chunked(batch_lines(requests, seed=seed))))
    port = free_port()
    settings = stack.with_settings(fixed_concurrency=fixed, runner_metrics_port=port)
    sampler = StatsSampler(sim).start()
    metrics = RunnerMetrics(port).start()
    baseline = sim.stats()["generation_tokens"]
    started = time.monotonic()
    process = stack.start_runner(batch_id, settings)
    cpu = CpuWatch({"runner": process.pid, "simulator": sim.process.pid}).start()
    try:
        first = wait_first_token(sampler, baseline, process)
        window = (first + WARMUP, first + WARMUP + WINDOW)
        while time.monotonic() < window[1] + 0.5 and process.poll() is None:
            time.sleep(0.2)
        if process.poll() is not None and time.monotonic() < window[1]:
            raise RuntimeError("the batch ended before the measurement window closed; raise its size")
        if to_the_end:
            process.wait(900)
    finally:
        stop_process(process)
        ended = time.monotonic()
        sampler.stop()
        metrics.stop()
        cpu.stop()
    inside = [s for t, s in sampler.samples if window[0] <= t <= window[1]]
    row = {
        "tokens_per_s": sampler.rate("generation_tokens", *window),
        "inflight": mean(metrics.series("batch_runner_requests_in_flight", *window)),
        "limit": mean(metrics.series("batch_runner_concurrency_limit", *window)),
        "running": mean([s["running"] for s in inside]),
        "waiting": mean([s["waiting"] for s in inside]),
        "runner_cpu": cpu.share("runner", *window),
        "sim_cpu": cpu.share("simulator", *window),
    }
    if to_the_end:
        batch = asyncio.run(stack.batch(batch_id))
        row["status"] = batch.status
        row["whole_seconds"] = ended - started
        row["whole_tokens"] = sampler.samples[-1][1]["generation_tokens"] - baseline
    return row


def run() -> None:
    config = SimConfig(time_scale=TIME_SCALE)
    rows = []
    with SimProcess(config) as sim, LocalStack([sim.url]) as stack:
        capacity = measure_capacity(
            sim,
            lambda i: msgspec.json.encode(batch_body(i, seed=99)),
            CAPACITY_CONCURRENCY,
            CAPACITY_WARMUP,
            CAPACITY_WINDOW,
        )
        cap = capacity["tokens_per_s"]
        # Enough requests for the default setting to run well past the window at full speed.
        requests = int(capacity["requests_per_s"] * (WARMUP + WINDOW + 25))
        results = {}
        for seed, (label, fixed) in enumerate(SETTINGS, start=1):
            results[label] = run_setting(sim, stack, fixed, requests, seed, to_the_end=fixed == 0)
            print(
                f"  {label}: {results[label]['tokens_per_s'] * TIME_SCALE:,.0f} tokens/s (model time), "
                f"{results[label]['tokens_per_s'] / cap:.1%} of capacity",
                flush=True,
            )
    rows.append(
        {
            "setting": "capacity (direct closed loop, 256 in flight)",
            "output tokens/s": cap * TIME_SCALE,
            "utilisation": "100%",
            "runner in flight": "",
            "runner limit": "",
            "engine running": capacity["running"],
            "engine waiting": capacity["waiting"],
        }
    )
    for label, r in results.items():
        rows.append(
            {
                "setting": label,
                "output tokens/s": r["tokens_per_s"] * TIME_SCALE,
                "utilisation": f"{r['tokens_per_s'] / cap:.1%}",
                "runner in flight": r["inflight"],
                "runner limit": r["limit"],
                "engine running": r["running"],
                "engine waiting": r["waiting"],
                "runner CPU": f"{r['runner_cpu']:.0%}",
                "simulator CPU": f"{r['sim_cpu']:.0%}",
            }
        )
    default = results[SETTINGS[0][0]]
    steady = default["tokens_per_s"] / cap
    whole = default["whole_tokens"] / default["whole_seconds"] / cap
    best_fixed = max((r["tokens_per_s"] / cap, label) for label, r in results.items() if label != SETTINGS[0][0])
    verdict = "met" if steady >= TARGET else "**missed**"
    body = f"""
`python -m benchmarks utilisation`. Simulator at its default cost model with `time_scale` {TIME_SCALE} (every engine
duration halved; figures below are converted back to model time). Batch requests: distinct ~110-token prompts (no
shared prefix) and 64-192 output tokens (mean 128). Capacity: a direct closed-loop load of {CAPACITY_CONCURRENCY}
concurrent requests of the same mix, measured over {CAPACITY_WINDOW:.0f} s after {CAPACITY_WARMUP:.0f} s warm-up
(mean step {capacity["step_ms"]:.1f} ms). Each setting then runs a {requests:,}-request batch through the real runner
process; its steady rate is the output-token rate over {WINDOW:.0f} s starting {WARMUP:.0f} s after its first token.
In-flight and limit are the runner's own gauges, running and waiting the engine's, averaged over the window.

{report.table(rows)}
Whole run with defaults (runner start to exit: process start, ingest, slow start, the tail, finalising):
{default["whole_tokens"]:,} output tokens in {default["whole_seconds"]:.1f} s = **{whole:.1%}** of capacity
(batch status `{default["status"]}`).

**Target: ≥ {TARGET:.0%} of capacity with defaults (steady state) — measured {steady:.1%}: {verdict}.** Best fixed
setting: {best_fixed[1]} at {best_fixed[0]:.1%}.
"""
    report.write_section(
        NAME,
        TITLE,
        body,
        [
            (
                "utilisation, batch alone, defaults (steady state)",
                f"≥ {TARGET:.0%} of capacity",
                f"{steady:.1%}: {verdict}",
            ),
            ("utilisation, whole run with defaults", "(no target)", f"{whole:.1%}"),
        ],
    )
