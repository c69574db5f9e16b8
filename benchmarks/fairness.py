"""`fairness`: two batches of two tenants running at once against one engine — how evenly do they share it?

Each batch has its own runner process, as in production, and nothing coordinates them but the engine's feedback. Each
runner's output tokens are read from its own Prometheus counter; its share is its tokens over both, in a window after
both have settled. Two cases: both start together, and the second starts once the first has the engine to itself.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from batch_gateway.sim import SimConfig
from benchmarks import report
from benchmarks.harness import (CpuWatch, LocalStack, RunnerMetrics, SimProcess, StatsSampler, free_port, mean,
                                stop_process)
from benchmarks.loadgen import measure_capacity
from benchmarks.workloads import batch_body, batch_lines, chunked

NAME = "fairness"
TITLE = "Fairness: two tenants' batches at once"

TIME_SCALE = 0.5
SETTLE = 15.0  # real seconds after the later batch starts before the window opens
WINDOW = 30.0
HEAD_START = 20.0  # the staggered case: the first batch runs alone this long
TARGET = 0.2  # each share within ±20% of an equal share
COMPLETION = 'batch_runner_tokens_total{kind="completion"}'


def run_case(sim: SimProcess, stack: LocalStack, head_start: float, requests: int, seed: int) -> dict:
    runners = []
    cpus: list[CpuWatch] = []
    sampler = StatsSampler(sim).start()
    try:
        for n, tenant in enumerate(("tenant-a", "tenant-b")):
            batch_id = asyncio.run(stack.create_batch(chunked(batch_lines(requests, seed=seed * 10 + n)), tenant=tenant))
            port = free_port()
            metrics = RunnerMetrics(port).start()
            runners.append((tenant, stack.start_runner(batch_id, stack.with_settings(runner_metrics_port=port)), metrics))
            cpus.append(CpuWatch({tenant: runners[-1][1].pid}).start())
            if n == 0 and head_start:
                time.sleep(head_start)
        later = time.monotonic()
        window = (later + SETTLE, later + SETTLE + WINDOW)
        while time.monotonic() < window[1] + 1.0:
            for tenant, process, _ in runners:
                if process.poll() is not None:
                    raise RuntimeError(f"{tenant}'s batch ended before the window closed; raise its size")
            time.sleep(0.2)
    finally:
        for _, process, metrics in runners:
            stop_process(process)
            metrics.stop()
        for watch in cpus:
            watch.stop()
        sampler.stop()
    tokens = {tenant: metrics.increase(COMPLETION, *window) for tenant, _, metrics in runners}
    total = sum(tokens.values())
    return {
        "shares": {tenant: t / total for tenant, t in tokens.items()},
        "rates": {tenant: t / WINDOW for tenant, t in tokens.items()},
        "limits": {tenant: mean(m.series("batch_runner_concurrency_limit", *window)) for tenant, _, m in runners},
        "engine_rate": sampler.rate("generation_tokens", *window),
        "cpu": {tenant: watch.share(tenant, *window) for watch, (tenant, _, _) in zip(cpus, runners)},
    }


def run() -> None:
    with SimProcess(SimConfig(time_scale=TIME_SCALE)) as sim, LocalStack([sim.url]) as stack:
        capacity = measure_capacity(sim, lambda i: msgspec.json.encode(batch_body(i, seed=99)), 256, 8.0, 20.0)
        requests = int(capacity["requests_per_s"] * (HEAD_START + SETTLE + WINDOW + 20))
        cases = {}
        for seed, (label, head_start) in enumerate((("started together", 0.0),
                                                    (f"second starts {HEAD_START:.0f} s after the first", HEAD_START)), 1):
            cases[label] = run_case(sim, stack, head_start, requests, seed)
            print(f"  {label}: shares {', '.join(f'{t} {s:.1%}' for t, s in cases[label]['shares'].items())}", flush=True)
    cap = capacity["tokens_per_s"]
    rows = []
    worst = 0.0
    for label, c in cases.items():
        for tenant, share in c["shares"].items():
            deviation = share / 0.5 - 1
            worst = max(worst, abs(deviation))
            rows.append({"case": label, "tenant": tenant, "output tokens/s": c["rates"][tenant] * TIME_SCALE,
                         "share": f"{share:.1%}", "vs equal share": f"{deviation:+.0%}",
                         "runner limit (mean)": c["limits"][tenant], "runner CPU": f"{c['cpu'][tenant]:.0%}",
                         "engine utilisation (both)": f"{c['engine_rate'] / cap:.1%}"})
    body = f"""
`python -m benchmarks fairness`. Two tenants each submit a {requests:,}-request batch of the utilisation mix; each runs in
its own runner process with default settings against one simulator (default cost model, `time_scale` {TIME_SCALE};
rates in model time). Shares are of the output tokens both runners received over a {WINDOW:.0f}-s window that opens
{SETTLE:.0f} s after the later batch started. Engine utilisation is against the capacity measured directly
({cap * TIME_SCALE:,.0f} tokens/s).

{report.table(rows)}
**Target: each batch within ±{TARGET:.0%} of an equal share — worst deviation {worst:.0%}:
{'met' if worst <= TARGET else '**missed**'}.**
"""
    report.write_section(NAME, TITLE, body, [
        ("two tenants' batches at once", f"each within ±{TARGET:.0%} of an equal share",
         f"worst {worst:.0%} off: {'met' if worst <= TARGET else '**missed**'}"),
    ])
