"""`fairness`: two batches of two tenants running at once against one engine — how evenly do they share it, alone and
beside interactive users?

Each batch has its own runner process, as in production; they see each other through the load board (the metadata
store) and the engine's gauges. Each runner's output tokens are read from its own Prometheus counter; its share is its
tokens over both, in a window after both have settled. Three cases: both start together, the second starts once the
first has the engine to itself, and both start together beside an interactive stream at 30% of capacity (whose
latency is compared with the same stream alone).
"""

from __future__ import annotations

import msgspec

from batch_gateway.sim import SimConfig
from benchmarks import report
from benchmarks.harness import LocalStack, SimProcess
from benchmarks.loadgen import measure_capacity
from benchmarks.mixed import Batch, Mixed, run_mixed
from benchmarks.report import times, verdict
from benchmarks.workloads import batch_body

NAME = "fairness"
TITLE = "Fairness: two tenants' batches at once"

TIME_SCALE = 0.5
SETTLE = 15.0  # real seconds after the later batch starts before the window opens
WINDOW = 30.0
HEAD_START = 20.0  # the staggered case: the first batch runs alone this long
TARGET = 0.2  # each share within ±20% of an equal share
UTILISATION = 0.95  # alone, the two batches together fill the engine
INTERACTIVE_SHARE = 0.3  # of capacity, in output tokens/s
INTERACTIVE_TOKENS = 64
INTERACTIVE_SETTLE = 20.0  # real seconds after both runners start before the window opens
SLOWDOWN = 1.3
COMPLETION = 'batch_runner_tokens_total{kind="completion"}'


def run_case(
    sim: SimProcess, stack: LocalStack, head_start: float, rate: float, settle: float, requests: int, seed: int
) -> tuple[Mixed, dict]:
    """Two tenants' batches, the second `head_start` s after the first, beside interactive users at `rate`
    requests/s (0: none); figures over the WINDOW that opens `settle` s after the later batch started."""
    batches = [Batch("tenant-a", tenant="tenant-a"), Batch("tenant-b", tenant="tenant-b", start_after=head_start)]
    mixed = run_mixed(sim, stack, [(head_start + settle, rate), (WINDOW, rate)], batches, requests, seed)
    start = mixed.started + head_start + settle
    figures = mixed.figures(start, start + WINDOW)
    figures["limits"] = [b.limit(start, start + WINDOW) for b in mixed.batches]
    figures["cpu"] = [mixed.cpu.share(f"batch{i}", start, start + WINDOW) for i in range(2)]
    return mixed, figures


def run() -> None:
    with SimProcess(SimConfig(time_scale=TIME_SCALE)) as sim, LocalStack([sim.url]) as stack:
        capacity = measure_capacity(sim, lambda i: msgspec.json.encode(batch_body(i, seed=99)), 256, 8.0, 20.0)
        requests = int(capacity["requests_per_s"] * (HEAD_START + SETTLE + WINDOW + 20))
        cases = {}
        for seed, (label, head_start) in enumerate(
            (("started together", 0.0), (f"second starts {HEAD_START:.0f} s after the first", HEAD_START)), 1
        ):
            mixed, cases[label] = run_case(sim, stack, head_start, 0.0, SETTLE, requests, seed)
            mixed.save(f"fairness-{'together' if not head_start else 'staggered'}")
            print(
                f"  {label}: {', '.join(f'{r * TIME_SCALE:,.0f}' for r in cases[label]['batch_rates'])} tokens/s, "
                f"limits {cases[label]['limits']}",
                flush=True,
            )
        rate = INTERACTIVE_SHARE * capacity["tokens_per_s"] / INTERACTIVE_TOKENS
        alone = run_mixed(sim, None, [(INTERACTIVE_SETTLE, rate), (WINDOW, rate)], [])
        alone_figures = alone.figures(alone.started + INTERACTIVE_SETTLE, alone.started + INTERACTIVE_SETTLE + WINDOW)
        both, beside = run_case(sim, stack, 0.0, rate, INTERACTIVE_SETTLE, requests, 3)
        both.save("fairness-beside-interactive")
        print(
            f"  beside interactive: p99 x{beside['p99'] / alone_figures['p99']:.2f}, batches "
            f"{', '.join(f'{r * TIME_SCALE:,.0f}' for r in beside['batch_rates'])} tokens/s",
            flush=True,
        )
    cap = capacity["tokens_per_s"]
    rows = []
    worst = 0.0
    tenants = ("tenant-a", "tenant-b")
    for label, c in [*cases.items(), (f"together, beside interactive users at {INTERACTIVE_SHARE:.0%}", beside)]:
        total = sum(c["batch_rates"])
        for tenant, rate, limit, cpu in zip(tenants, c["batch_rates"], c["limits"], c["cpu"], strict=True):
            deviation = rate / (total / 2) - 1
            if c is not beside:
                worst = max(worst, abs(deviation))
            rows.append(
                {
                    "case": label,
                    "tenant": tenant,
                    "output tokens/s": rate * TIME_SCALE,
                    "share": f"{rate / total:.1%}",
                    "vs equal share": f"{deviation:+.0%}",
                    "runner limit (mean)": limit,
                    "runner CPU": f"{cpu:.0%}",
                    "engine utilisation (both)": f"{c['engine_rate'] / cap:.1%}"
                    + (" (interactive included)" if c is beside else ""),
                }
            )
    filled = min(c["engine_rate"] / cap for c in cases.values())
    a_rate, b_rate = beside["batch_rates"]
    apart = abs(a_rate - b_rate) / ((a_rate + b_rate) / 2)
    p99_ratio = beside["p99"] / alone_figures["p99"]
    interactive_rows = [
        {
            "interactive at 30%": "alone",
            "p50 s": alone_figures["p50"],
            "p99 s": alone_figures["p99"],
            "p50 ×": "1",
            "p99 ×": "1",
            "per-token ×": "1",
            "requests": alone_figures["requests"],
            "longest stall s": alone_figures["stall"],
        },
        {
            "interactive at 30%": "beside both batches",
            "p50 s": beside["p50"],
            "p99 s": beside["p99"],
            "p50 ×": f"{beside['p50'] / alone_figures['p50']:.2f}",
            "p99 ×": f"{p99_ratio:.2f}",
            "per-token ×": f"{beside['itl'] / alone_figures['itl']:.2f}",
            "requests": beside["requests"],
            "engine running": beside["running"],
            "engine waiting": beside["waiting"],
            "longest stall s": beside["stall"],
        },
    ]
    body = f"""
`python -m benchmarks fairness` (about 5 minutes). Two tenants each submit a {requests:,}-request batch of the
utilisation mix; each runs in its own runner process with default settings against one simulator (default cost model,
`time_scale` {TIME_SCALE}; rates in model time). Shares are of the output tokens both runners received over a
{WINDOW:.0f}-s window that opens {SETTLE:.0f} s after the later batch started. Engine utilisation is against the
capacity measured directly ({cap * TIME_SCALE:,.0f} tokens/s).

The third case adds an open-loop Poisson stream of interactive chat turns ({INTERACTIVE_TOKENS} output tokens) at
{INTERACTIVE_SHARE:.0%} of capacity straight to the simulator; both batches start with it, and the window opens
{INTERACTIVE_SETTLE:.0f} s later. The same stream (same arrivals) ran alone first, over the same window. The longest
stall is the longest gap between two samples of the engine (4 a second): above ~0.5 s the shared machine stalled
every process, and the latencies of that run carry it.

{report.table(rows)}
{report.table(interactive_rows)}
**Targets. Alone: each batch within ±{TARGET:.0%} of an equal share — worst deviation {worst:.0%}
({verdict(worst <= TARGET)}), and together they fill the engine (≥ {UTILISATION:.0%}) — {filled:.1%}
({verdict(filled >= UTILISATION)}). Beside interactive users at {INTERACTIVE_SHARE:.0%}: their p99 ≤ {SLOWDOWN}× alone
— {p99_ratio:.2f}× ({verdict(p99_ratio <= SLOWDOWN)}); the two batches within ±{TARGET:.0%} of each other —
{apart:.0%} apart ({verdict(apart <= TARGET)}).**
"""
    report.write_section(
        NAME,
        TITLE,
        body,
        [
            (
                "two tenants' batches at once",
                f"each within ±{TARGET:.0%} of an equal share",
                f"worst {worst:.0%} off: {verdict(worst <= TARGET)}",
            ),
            (
                "two tenants' batches at once: engine utilisation",
                f"≥ {UTILISATION:.0%}",
                f"{filled:.1%}: {verdict(filled >= UTILISATION)}",
            ),
            (
                f"two tenants beside interactive at {INTERACTIVE_SHARE:.0%}: interactive p99",
                f"≤ {SLOWDOWN}× alone",
                f"{times(p99_ratio, SLOWDOWN)}: {verdict(p99_ratio <= SLOWDOWN)}",
            ),
            (
                f"two tenants beside interactive at {INTERACTIVE_SHARE:.0%}: their throughputs",
                f"within ±{TARGET:.0%} of each other",
                f"{apart:.0%} apart: {verdict(apart <= TARGET)}",
            ),
        ],
    )
