"""`sparse`: one person's occasional requests beside a batch. Users who send a request every few seconds leave the
engine looking like the batch's own most of the time; does the runner still keep their latency within the budget?

For each rate, an open-loop Poisson stream of short chat turns goes straight to the simulator, alone and then beside
a batch through the real runner with defaults (the same arrivals in the measured window, bodies of each run's own).
The interactive benchmark's loads (20-60% of capacity, 27-81 requests a second) never leave the engine without
users for long; these do.
"""

from __future__ import annotations

import itertools

from batch_gateway.sim import SimConfig
from benchmarks import report
from benchmarks.harness import LocalStack, SimProcess, mean
from benchmarks.mixed import Batch, Mixed, run_mixed
from benchmarks.report import times, verdict

NAME = "sparse"
TITLE = "Sparse users: a few requests a minute beside a batch"

TIME_SCALE = 0.5
RATES = (0.1, 0.3, 1.0)  # interactive requests per real second (half that in model time)
WINDOW = 120.0  # real seconds measured
WARMUP = {"alone": 4.0, "defaults": 15.0}
BATCH_REQUESTS = 40_000  # more than the runs take: the batch is cancelled after the window
SLOWDOWN = 1.3


def shared_share(mixed: Mixed, start: float, end: float) -> float:
    """The share of the window's seconds in which the runner believed someone else was using the engine."""
    rows = [r for r in mixed.timeline() if start - mixed.started <= r["t"] < end - mixed.started]
    return mean([1.0 if r.get("b0_shared") else 0.0 for r in rows]) if rows else float("nan")


def run() -> None:
    config = SimConfig(time_scale=TIME_SCALE)
    seeds = itertools.count(1)
    results = []
    with SimProcess(config) as sim, LocalStack([sim.url]) as stack:
        for rate in RATES:
            figures = {}
            for label, batch in (("alone", None), ("defaults", Batch("defaults"))):
                warmup = WARMUP[label]
                mixed = run_mixed(
                    sim, stack, [(warmup, rate), (WINDOW, rate)], [batch] if batch else [], BATCH_REQUESTS, next(seeds)
                )
                start = mixed.started + warmup
                f = mixed.figures(start, start + WINDOW)
                latencies = mixed.latencies(start, start + WINDOW)
                f["mean"] = mean(latencies)
                f["max"] = max(latencies, default=float("nan"))
                if batch:
                    f["shared"] = shared_share(mixed, start, start + WINDOW)
                    mixed.save(f"sparse-{rate:g}-defaults")
                figures[label] = f
                print(
                    f"  {rate:g}/s {label}: p50 {f['p50']:.3f} s, p99 {f['p99']:.3f} s, mean {f['mean']:.3f} s, "
                    f"{f['requests']} requests, batch {f['batch_rate'] * TIME_SCALE:,.0f} tokens/s, "
                    f"limit {f['limit']}",
                    flush=True,
                )
            results.append((rate, figures))
    write(results)


def write(results: list[tuple[float, dict]]) -> None:
    rows, summary = [], []
    for rate, f in results:
        alone, beside = f["alone"], f["defaults"]
        p99 = beside["p99"] / alone["p99"]
        rows.append(
            {
                "users' requests/s (model time)": f"{rate:g} ({rate * TIME_SCALE:g})",
                "requests in the window": beside["requests"],
                "p50 s alone": alone["p50"],
                "p99 s alone": alone["p99"],
                "p50 ×": f"{beside['p50'] / alone['p50']:.2f}",
                "p99 ×": times(p99, SLOWDOWN),
                "mean ×": f"{beside['mean'] / alone['mean']:.2f}",
                "slowest ×": f"{beside['max'] / alone['max']:.2f}",
                "per-token ×": f"{beside['itl'] / alone['itl']:.2f}",
                "runner saw them (share of seconds)": f"{beside['shared']:.0%}",
                "batch limit": beside["limit"],
                "batch tokens/s": beside["batch_rate"] * TIME_SCALE,
            }
        )
        summary.append(
            (
                f"sparse users, {rate:g} requests/s: p99 beside a batch (defaults)",
                f"≤ {SLOWDOWN}× alone",
                f"{times(p99, SLOWDOWN)}: {verdict(p99 <= SLOWDOWN)}",
            )
        )
    body = f"""
`python -m benchmarks sparse` (about {len(results) * 5} minutes). Simulator at its default cost model, `time_scale`
{TIME_SCALE} (token rates in model time, latencies wall-clock). Users: open-loop Poisson arrivals of the interactive
benchmark's chat turns (~35-token prompt, 64 output tokens) at {", ".join(f"{r:g}" for r, _ in results)} requests a
second, straight to the simulator, alone and then beside a batch through the real runner with defaults; each run
measures a {WINDOW:.0f}-s window (the same arrivals in both) after a warm-up (alone {WARMUP["alone"]:.0f} s, defaults
{WARMUP["defaults"]:.0f} s). With a dozen requests in a window, p99 is about the slowest; the mean is shown beside it.
"Runner saw them": the share of the window's seconds in which the runner's regime was `shared`.

{report.table(rows)}
"""
    report.write_section(NAME, TITLE, body, summary)
