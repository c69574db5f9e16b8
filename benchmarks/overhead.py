"""`overhead`: the runner's own cost per request, against a simulator that answers at once.

With zero engine latency, the runner and the simulator are two Python processes racing each other on the machine's
two cores. So the simulator is also measured alone (a raw closed-loop client, far cheaper than the runner's httpx):
if it cannot serve more than the runner sends, the end-to-end rate is the simulator's limit, and the runner's
capacity is better read from its CPU time per request.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
import psutil

from batch_gateway.sim import SimConfig
from benchmarks import report
from benchmarks.harness import LocalStack, SimProcess, stop_process
from benchmarks.loadgen import closed_loop
from benchmarks.workloads import MODEL, chunked, small_chat_lines

NAME = "overhead"
TITLE = "Overhead: requests/s against a zero-latency upstream, CPU per request"

REQUESTS = 30_000
SETTINGS = (("adaptive (defaults)", 0), ("fixed 32", 32))
ZERO_LATENCY = SimConfig(
    step_base_ms=0, per_seq_ms=0, prefill_ms_per_token=0, context_ms_per_token=0, max_num_seqs=1024
)
TARGET = 3000


def cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run_runner(sim: SimProcess, stack: LocalStack, fixed: int) -> dict:
    batch_id = asyncio.run(stack.create_batch(chunked(small_chat_lines(REQUESTS))))
    before = sim.stats()["completed"]
    sim_ps = psutil.Process(sim.process.pid)
    sim_cpu0 = cpu(sim_ps)
    started = time.monotonic()
    process = stack.start_runner(batch_id, stack.with_settings(fixed_concurrency=fixed))
    runner_ps = psutil.Process(process.pid)
    # Sample the runner's CPU and the simulator's completions, to cut out the dispatch phase (first to last answer).
    samples: list[tuple[float, float, float, int]] = []  # (time, runner cpu, sim cpu, completed)
    peak = 0
    try:
        while process.poll() is None:
            try:
                samples.append((time.monotonic(), cpu(runner_ps), cpu(sim_ps), sim.stats()["completed"] - before))
                peak = max(peak, runner_ps.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            if time.monotonic() - started > 600:
                raise TimeoutError("the overhead run took over 10 minutes")
            time.sleep(0.1)
        process.wait()
    finally:
        stop_process(process)
    wall = time.monotonic() - started
    total_cpu = samples[-1][1] if samples else float("nan")
    dispatching = [s for s in samples if 0 < s[3] < REQUESTS]
    (t0, r0, s0, c0), (t1, r1, s1, c1) = dispatching[0], dispatching[-1]
    batch = asyncio.run(stack.batch(batch_id))
    if batch.status != "completed" or batch.request_counts.completed != REQUESTS:
        raise RuntimeError(f"the batch ended {batch.status} with {batch.request_counts}")
    return {
        "wall": wall,
        "e2e_rate": REQUESTS / wall,
        "dispatch_rate": (c1 - c0) / (t1 - t0),
        "runner_cpu_per_request": (r1 - r0) / (c1 - c0),
        "runner_cpu_share": (r1 - r0) / (t1 - t0),
        "sim_cpu_share": (s1 - s0) / (t1 - t0),
        "runner_cpu_total": total_cpu,
        "sim_cpu_total": cpu(sim_ps) - sim_cpu0,
        "peak_mb": peak / 2**20,
    }


def simulator_alone(sim: SimProcess, concurrency: int = 256, seconds: float = 10.0) -> dict:
    body = msgspec.json.encode({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    sim_ps = psutil.Process(sim.process.pid)
    me = psutil.Process()
    c0, m0, t0 = cpu(sim_ps), cpu(me), time.monotonic()
    result = asyncio.run(closed_loop(sim.url, lambda i: body, concurrency, seconds))
    c1, m1, t1 = cpu(sim_ps), cpu(me), time.monotonic()
    served = sum(1 for s in result.samples if s.status == 200)
    return {
        "rate": served / (t1 - t0),
        "sim_cpu_per_request": (c1 - c0) / served,
        "sim_cpu_share": (c1 - c0) / (t1 - t0),
        "client_cpu_share": (m1 - m0) / (t1 - t0),
    }


async def _client_cost(kind: str, url: str, concurrency: int, requests: int) -> tuple[float, float]:
    """(requests/s, client CPU seconds per request) for `requests` posts through one shared client."""
    body = msgspec.json.encode({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    me = psutil.Process()
    pending = iter(range(requests))
    if kind == "httpx":
        import httpx

        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=256), timeout=60)

        async def post() -> None:
            (
                await client.post(
                    url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
                )
            ).raise_for_status()

        close = client.aclose
    else:
        import aiohttp

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

        async def post() -> None:
            async with session.post(
                url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
            ) as response:
                response.raise_for_status()
                await response.read()

        close = session.close

    async def worker() -> None:
        for _ in pending:
            await post()

    try:
        c0, t0 = cpu(me), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        c1, t1 = cpu(me), time.monotonic()
    finally:
        await close()
    return requests / (t1 - t0), (c1 - c0) / requests


def client_costs(sim: SimProcess, requests: int = 5000) -> list[dict]:
    """The HTTP client library alone, in this process, against the same simulator: httpx and aiohttp (what the runner
    uses) and aiohttp (if installed) for comparison."""
    rows = []
    for kind in ("httpx", "aiohttp"):
        try:
            __import__(kind)
        except ImportError:
            continue
        for concurrency in (32, 256):
            rate, per_request = asyncio.run(_client_cost(kind, sim.url, concurrency, requests))
            rows.append(
                {
                    "client": kind,
                    "in flight": concurrency,
                    "requests/s": rate,
                    "client CPU µs/request": per_request * 1e6,
                }
            )
    return rows


def run() -> None:
    results = {}
    with SimProcess(ZERO_LATENCY) as sim, LocalStack([sim.url]) as stack:
        alone = simulator_alone(sim)
        print(f"  simulator alone: {alone['rate']:,.0f} requests/s", flush=True)
        clients = client_costs(sim)
        for label, fixed in SETTINGS:
            results[label] = run_runner(sim, stack, fixed)
            r = results[label]
            print(
                f"  {label}: {r['dispatch_rate']:,.0f} requests/s dispatching, "
                f"{r['runner_cpu_per_request'] * 1e6:,.0f} µs runner CPU per request",
                flush=True,
            )
    rows = []
    for label, r in results.items():
        rows.append(
            {
                "runner setting": label,
                "requests/s (dispatch)": r["dispatch_rate"],
                "requests/s (whole run)": r["e2e_rate"],
                "runner CPU µs/request": r["runner_cpu_per_request"] * 1e6,
                "runner capacity on one core (req/s)": 1 / r["runner_cpu_per_request"],
                "runner CPU use": f"{r['runner_cpu_share']:.0%}",
                "simulator CPU use": f"{r['sim_cpu_share']:.0%}",
                "runner CPU s (whole run)": r["runner_cpu_total"],
                "runner peak RSS MB": r["peak_mb"],
            }
        )
    runner_client = " (the runner's client is aiohttp: batch_gateway/runner/upstream.py's UpstreamClient)"
    default = results[SETTINGS[0][0]]
    one_core = 1 / default["runner_cpu_per_request"]
    others = report.background_load() or 0.0
    if default["runner_cpu_share"] > 0.9:
        bottleneck = "the runner, which used a full core"
    elif default["sim_cpu_share"] > 0.9:
        bottleneck = "the simulator, which used a full core"
    elif default["runner_cpu_share"] + default["sim_cpu_share"] + others > 1.7:
        bottleneck = (
            f"the machine's two cores, shared with other processes ({others:.1f} cores); the runner got "
            f"{default['runner_cpu_share']:.0%} of a core"
        )
    else:
        bottleneck = "neither process's CPU: latency between them"
    body = f"""
`python -m benchmarks overhead`. {REQUESTS:,} tiny chat requests (`max_tokens` 1) through the real runner against the
simulator in zero-latency mode (`--step-base-ms 0 --per-seq-ms 0 --prefill-ms-per-token 0 --context-ms-per-token 0`,
`--max-num-seqs` {ZERO_LATENCY.max_num_seqs}), both as separate processes on the machine's 2 cores. "Dispatch" is from
the simulator's first to its last answer; "whole run" adds process start, ingest, planning, finalising the output
file and the status change. CPU per request is the runner process's CPU time over the dispatch phase divided by the
requests answered in it; its inverse is what one core could sustain if the runner were alone on it.

The simulator alone (a raw keep-alive client at 256 in flight, {alone["client_cpu_share"]:.0%} of a core for the
client): **{alone["rate"]:,.0f} requests/s** at {alone["sim_cpu_per_request"] * 1e6:,.0f} µs of simulator CPU per
request ({alone["sim_cpu_share"]:.0%} of a core).

{report.table(rows)}
HTTP client libraries alone, for comparison with the runner's CPU per request above: one shared client in the
benchmark process posting the same request to the same simulator{runner_client}:

{report.table(clients)}
**Target: ≥ {TARGET:,} requests/s on one core — runner CPU per request with defaults implies {one_core:,.0f}/s;
measured end to end {default["dispatch_rate"]:,.0f}/s while dispatching, limited by {bottleneck}:
{"met" if one_core >= TARGET else "**missed**"}.**
"""
    report.write_section(
        NAME,
        TITLE,
        body,
        [
            (
                "runner overhead (zero-latency upstream)",
                f"≥ {TARGET:,} requests/s on one core",
                f"{one_core:,.0f}/s from CPU per request ({default['dispatch_rate']:,.0f}/s end to end): "
                f"{'met' if one_core >= TARGET else '**missed**'}",
            ),
        ],
    )
