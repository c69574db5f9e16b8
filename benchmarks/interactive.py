"""`interactive`: does a batch stay out of the way of interactive users while using the capacity they leave?

An open-loop Poisson stream of short chat requests goes straight to the simulator at about half its capacity (in
output tokens/s). It runs alone first; then again, once per runner setting, with a large batch running through the
real runner. Interactive latency (end to end, as the client sees it) is compared with the alone run, and the batch's
output rate with the capacity the interactive stream leaves over.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from batch_gateway.sim import SimConfig
from benchmarks import report
from benchmarks.harness import (CpuWatch, LocalStack, RunnerMetrics, SimProcess, StatsSampler, free_port, mean,
                                stop_process)
from benchmarks.loadgen import LoadResult, closed_loop, measure_capacity, percentile, poisson
from benchmarks.workloads import batch_body, batch_lines, chunked, interactive_body

NAME = "interactive"
TITLE = "Interactive protection: latency with a batch running, and the spare capacity it used"

TIME_SCALE = 0.5
INTERACTIVE_SHARE = 0.5  # of capacity, in output tokens/s
INTERACTIVE_TOKENS = 64
ALONE_WARMUP = 5.0
BATCH_WARMUP = 15.0  # real seconds for the runner to start and settle before the window opens
WINDOW = 40.0
SETTINGS = (("adaptive (defaults)", 0), ("fixed 8", 8), ("fixed 64", 64), ("fixed 512", 512))
TARGET_P99_RATIO = 1.3
TARGET_SHARE = 0.8


def wait_idle(sim: SimProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = sim.stats()
        if stats["running"] == 0 and stats["waiting"] == 0:
            return
        time.sleep(0.2)
    raise TimeoutError("the simulator did not drain")


async def _with_saturating_load(url: str, rate: float, duration: float) -> LoadResult:
    """The interactive stream plus a direct closed loop of batch requests at 2x max_num_seqs: the most the engine
    can give a batch beside this interactive load (with a queue in front of everyone)."""
    batch = lambda i: msgspec.json.encode(batch_body(i, seed=98))  # noqa: E731
    interactive, _ = await asyncio.gather(poisson(url, _interactive, rate, duration, seed=11),
                                          closed_loop(url, batch, 256, duration))
    return interactive


def _interactive(i: int) -> bytes:
    return msgspec.json.encode(interactive_body(i))


def interactive_phase(sim: SimProcess, rate: float, warmup: float, stack: LocalStack | None = None,
                      fixed: int = 0, requests: int = 0, seed: int = 0, saturate: bool = False) -> dict:
    """Run the interactive stream for warmup + WINDOW seconds: alone, with a batch running through the runner
    (`stack` given), or beside a saturating direct load (`saturate`)."""
    wait_idle(sim)
    sampler = StatsSampler(sim).start()
    process = metrics = None
    if stack is not None:
        batch_id = asyncio.run(stack.create_batch(chunked(batch_lines(requests, seed=seed))))
        port = free_port()
        metrics = RunnerMetrics(port).start()
        process = stack.start_runner(batch_id, stack.with_settings(fixed_concurrency=fixed, runner_metrics_port=port))
    cpu = CpuWatch({"simulator": sim.process.pid, **({"runner": process.pid} if process else {})}).start()
    started = time.monotonic()
    try:
        if saturate:
            load = asyncio.run(_with_saturating_load(sim.url, rate, warmup + WINDOW))
        else:
            load = asyncio.run(poisson(sim.url, _interactive, rate, warmup + WINDOW, seed=11))
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the batch ended (exit {process.returncode}) before the window closed; raise its size")
    finally:
        if process is not None:
            stop_process(process)
        sampler.stop()
        cpu.stop()
        if metrics is not None:
            metrics.stop()
    window = (started + warmup, started + warmup + WINDOW)
    latencies = [s.latency for s in load.between(*window) if s.status == 200]
    failures = sum(1 for s in load.between(*window) if s.status != 200) + load.errors
    total_rate = sampler.rate("generation_tokens", *window)
    interactive_rate = load.tokens_finished_between(*window) / WINDOW
    first, last = sampler.at(window[0]), sampler.at(window[1])
    steps = last["steps"] - first["steps"]
    inside = [s for t, s in sampler.samples if window[0] <= t <= window[1]]
    return {
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "count": len(latencies),
        "failures": failures,
        "interactive_rate": interactive_rate,
        "batch_rate": max(0.0, total_rate - interactive_rate),
        "total_rate": total_rate,
        "step_ms": 1000 * (last["busy_seconds"] - first["busy_seconds"]) / steps if steps else float("nan"),
        "running": mean([s["running"] for s in inside]),
        "waiting": mean([s["waiting"] for s in inside]),
        "limit": mean(metrics.series("batch_runner_concurrency_limit", *window)) if metrics else None,
        "runner_cpu": cpu.share("runner", *window) if process else None,
        "sim_cpu": cpu.share("simulator", *window),
    }


def share_bound(config: SimConfig, alone: dict, leftover: float, p99_ratio: float) -> float:
    """The cost model's own bound: the batch share of the leftover at which the mean step (and so every running
    request's latency) has grown by `p99_ratio` over the alone run. Step = a + b*n for n running sequences, with b
    from the cost model (per sequence, plus the context a ~175-token sequence reads) and a fitted to the alone run."""
    b = config.per_seq_ms + config.context_ms_per_token * 175
    a = alone["step_ms"] - b * alone["running"]
    step = p99_ratio * alone["step_ms"]
    running = (step - a) / b
    tokens = running / (step / 1000) / config.time_scale  # real tokens/s at this time scale
    return (tokens - alone["interactive_rate"]) / leftover


def run() -> None:
    config = SimConfig(time_scale=TIME_SCALE)
    with SimProcess(config) as sim, LocalStack([sim.url]) as stack:
        capacity = measure_capacity(sim, lambda i: msgspec.json.encode(batch_body(i, seed=99)), 256, 8.0, 20.0)
        cap = capacity["tokens_per_s"]
        rate = INTERACTIVE_SHARE * cap / INTERACTIVE_TOKENS
        alone = interactive_phase(sim, rate, ALONE_WARMUP)
        print(f"  alone: p50 {alone['p50']:.3f} s, p99 {alone['p99']:.3f} s", flush=True)
        saturated = interactive_phase(sim, rate, ALONE_WARMUP, saturate=True)
        # The engine's full rate on this mix of traffic, less what the interactive stream asks of it.
        leftover = saturated["total_rate"] - alone["interactive_rate"]
        print(f"  leftover capacity: {leftover * TIME_SCALE:,.0f} tokens/s", flush=True)
        requests = int(capacity["requests_per_s"] * (BATCH_WARMUP + WINDOW + 20))
        results = {}
        for seed, (label, fixed) in enumerate(SETTINGS, start=1):
            results[label] = interactive_phase(sim, rate, BATCH_WARMUP, stack, fixed, requests, seed)
            r = results[label]
            print(f"  {label}: p99 x{r['p99'] / alone['p99']:.2f}, batch share of leftover "
                  f"{r['batch_rate'] / leftover:.1%}", flush=True)

    def row(run: str, r: dict, baseline: bool = False) -> dict:
        return {"run": run, "p50 s": r["p50"], "p99 s": r["p99"],
                "p50 ratio": "1" if baseline else f"{r['p50'] / alone['p50']:.2f}",
                "p99 ratio": "1" if baseline else f"{r['p99'] / alone['p99']:.2f}",
                "batch share of leftover": "" if baseline else f"{r['batch_rate'] / leftover:.1%}",
                "interactive tokens/s": r["interactive_rate"] * TIME_SCALE,
                "batch tokens/s": "" if baseline else r["batch_rate"] * TIME_SCALE, "mean step ms": r["step_ms"],
                "engine running": r["running"], "engine waiting": r["waiting"], "runner limit": r["limit"],
                "runner CPU": "" if r["runner_cpu"] is None else f"{r['runner_cpu']:.0%}",
                "simulator CPU": f"{r['sim_cpu']:.0%}", "failed": r["failures"]}

    rows = [row("interactive alone", alone, baseline=True),
            row("with a saturating direct load (defines the capacity)", saturated)]
    rows[1]["batch share of leftover"] = "(queueing: not a batch)"
    rows += [row(f"with batch, {label}", r) for label, r in results.items()]
    default = results[SETTINGS[0][0]]
    d_ratio, d_share = default["p99"] / alone["p99"], default["batch_rate"] / leftover
    dominating = [label for label, r in results.items() if label != SETTINGS[0][0]
                  and r["p99"] / alone["p99"] < d_ratio and r["batch_rate"] / leftover > d_share]
    bound = share_bound(config, alone, leftover, TARGET_P99_RATIO)
    met = d_ratio <= TARGET_P99_RATIO and d_share >= TARGET_SHARE
    ok = lambda good: "met" if good else "**missed**"  # noqa: E731
    body = f"""
`python -m benchmarks interactive`. Simulator at its default cost model, `time_scale` {TIME_SCALE} (token rates and step
times below are in model time; latencies are wall-clock at this scale, so twice as long in model time). Capacity
{cap * TIME_SCALE:,.0f} output tokens/s (closed loop, 256 in flight, batch mix). Interactive stream: open-loop
Poisson arrivals at {rate:.1f} requests/s of short chat turns (~35-token prompt, {INTERACTIVE_TOKENS} output tokens),
i.e. {INTERACTIVE_SHARE:.0%} of capacity, straight to the simulator; latencies are of the requests that started in a
{WINDOW:.0f}-s window ({ALONE_WARMUP:.0f} s after the start alone; {BATCH_WARMUP:.0f} s after the runner started
otherwise). The batch ({requests:,} requests of the utilisation mix) runs through the real runner; its rate is the
engine's output rate minus the interactive stream's. The leftover capacity is the engine's full output rate on this mix of
traffic (measured with a direct closed loop of 256 batch requests beside the interactive stream: the engine is full
and queueing) less the interactive stream's rate alone: {leftover * TIME_SCALE:,.0f} tokens/s.

{report.table(rows)}
**Targets with defaults: p99 ≤ {TARGET_P99_RATIO}× alone — measured {d_ratio:.2f}× ({ok(d_ratio <= TARGET_P99_RATIO)});
batch ≥ {TARGET_SHARE:.0%} of the leftover — measured {d_share:.1%} ({ok(d_share >= TARGET_SHARE)}); both at once:
{ok(met)}. Fixed settings better on both counts: {', '.join(dominating) if dominating else 'none'}.**

What the cost model allows: every running sequence adds {config.per_seq_ms} ms (+ its context) to every step, so the
batch cannot fill the leftover without slowing every interactive token. Fitting step = a + b·running to the alone run,
the mean step reaches {TARGET_P99_RATIO}× its alone value when the batch has taken about **{bound:.0%}** of the
leftover. An interactive answer takes {INTERACTIVE_TOKENS} steps, so its latency grows with the mean step (and more
once a queue forms): when that bound is below {TARGET_SHARE:.0%}, no controller can meet both targets at once on this
cost model, and the fixed settings above show the trade-off it has to make.
"""
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    report.write_section(NAME, TITLE, body, [
        ("interactive p99 with a batch running (defaults)", f"≤ {TARGET_P99_RATIO}× alone",
         f"{d_ratio:.2f}×: {verdict(d_ratio <= TARGET_P99_RATIO)}"),
        ("batch share of the leftover capacity (defaults)", f"≥ {TARGET_SHARE:.0%}",
         f"{d_share:.1%}: {verdict(d_share >= TARGET_SHARE)}"),
        ("fixed concurrency better on both counts", "none", f"{', '.join(dominating) or 'none'}: {verdict(not dominating)}"),
    ])
