"""`memory`: the runner's peak RSS as the input grows from 10k to 1M lines.

The input is generated and streamed into storage chunk by chunk, never held whole. The runner's RSS is sampled every
50 ms from outside the process, and split by phase: before its first answer (start-up, ingest and planning) and after
(dispatch and finalising). A size that would take longer than its time budget is stopped with SIGTERM, and its
partial figures are reported with the rate it reached.
"""

from __future__ import annotations

import asyncio
import time

import psutil

from benchmarks import report
from benchmarks.harness import LocalStack, SimProcess, stop_process
from benchmarks.overhead import ZERO_LATENCY
from benchmarks.workloads import chunked, small_chat_lines

NAME = "memory"
TITLE = "Memory: runner peak RSS by input size"

SIZES = ((10_000, 120.0), (100_000, 300.0), (1_000_000, 480.0))  # (lines, time budget in seconds)
TARGET_MB = 200


def measure(sim: SimProcess, stack: LocalStack, lines: int, budget: float) -> dict:
    batch_id = asyncio.run(stack.create_batch(chunked(small_chat_lines(lines))))
    input_mb = stack.input_bytes[batch_id] / 2**20
    before = sim.stats()["completed"]
    started = time.monotonic()
    process = stack.start_runner(batch_id)
    ps = psutil.Process(process.pid)
    peak_ingest = peak_dispatch = 0
    first_answer = last_check = None
    answered = 0
    finished = True
    try:
        while process.poll() is None:
            try:
                rss = ps.memory_info().rss
            except psutil.NoSuchProcess:
                break
            now = time.monotonic()
            if last_check is None or now - last_check >= 0.5:  # the simulator's counter, twice a second
                last_check = now
                answered = sim.stats()["completed"] - before
                if answered and first_answer is None:
                    first_answer = now
            if first_answer is None:
                peak_ingest = max(peak_ingest, rss)
            else:
                peak_dispatch = max(peak_dispatch, rss)
            if now - started > budget:
                finished = False
                break
            time.sleep(0.05)
    finally:
        stop_process(process, grace=30.0)
    seconds = time.monotonic() - started
    answered = sim.stats()["completed"] - before
    status = asyncio.run(stack.batch(batch_id)).status
    dispatch_seconds = (time.monotonic() if not finished else started + seconds) - (first_answer or started)
    return {
        "lines": lines,
        "input_mb": input_mb,
        "finished": finished and status == "completed",
        "status": status,
        "answered": answered,
        "seconds": seconds,
        "rate": answered / dispatch_seconds if dispatch_seconds > 0 else float("nan"),
        "ingest_seconds": (first_answer - started) if first_answer else float("nan"),
        "peak_ingest_mb": peak_ingest / 2**20,
        "peak_dispatch_mb": peak_dispatch / 2**20,
    }


def run() -> None:
    results = []
    with SimProcess(ZERO_LATENCY) as sim, LocalStack([sim.url], max_requests_per_batch=2_000_000) as stack:
        for lines, budget in SIZES:
            r = measure(sim, stack, lines, budget)
            results.append(r)
            print(
                f"  {lines:,} lines: peak {max(r['peak_ingest_mb'], r['peak_dispatch_mb']):.0f} MB, "
                f"{'finished' if r['finished'] else 'stopped'} after {r['seconds']:.0f} s",
                flush=True,
            )
    rows = [
        {
            "lines": f"{r['lines']:,}",
            "input MB": r["input_mb"],
            "peak RSS MB (start, ingest, plan)": r["peak_ingest_mb"],
            "peak RSS MB (dispatch, finalise)": r["peak_dispatch_mb"],
            "ingest+plan s": r["ingest_seconds"],
            "answered": f"{r['answered']:,}",
            "requests/s": r["rate"],
            "run s": r["seconds"],
            "outcome": "completed" if r["finished"] else f"stopped at the {r['seconds']:.0f}-s budget ({r['status']})",
        }
        for r in results
    ]
    largest = results[-1]
    peak = max(largest["peak_ingest_mb"], largest["peak_dispatch_mb"])
    partial = (
        ""
        if largest["finished"]
        else (
            f" (partial: the run was stopped after {largest['answered']:,} of {largest['lines']:,} lines; ingest and "
            "planning, which hold the whole per-line index, were complete, so the figure covers the index at full size)"
        )
    )
    body = f"""
`python -m benchmarks memory`. Tiny chat requests (~130 bytes a line) streamed into storage in 1 MiB chunks, run by the
real runner with default settings (and `max_requests_per_batch` raised to 2,000,000) against the zero-latency
simulator. RSS is the runner process's resident set, sampled every 50 ms.

{report.table(rows)}
**Target: < {TARGET_MB} MB at 1M lines — measured {peak:.0f} MB{partial}:
{"met" if peak < TARGET_MB else "**missed**"}.**
"""
    report.write_section(
        NAME,
        TITLE,
        body,
        [
            (
                "runner peak RSS at 1M lines",
                f"< {TARGET_MB} MB",
                f"{peak:.0f} MB{'' if largest['finished'] else ' (partial run)'}: "
                f"{'met' if peak < TARGET_MB else '**missed**'}",
            ),
        ],
    )
