"""`phases`: interactive load that changes (0% → 50% → 10% → 0% of capacity, a minute each) beside a batch through
the runner with defaults. Does the budget hold in every phase after its first 3 s, does the batch yield quickly when
users arrive, and does it take the engine back (≥ 95% utilisation) within 10 s of them leaving?

The same interactive schedule (same seed, so the same arrivals) runs alone for the baseline; only the phases with
users need it.
"""

from __future__ import annotations

import msgspec

from batch_gateway.sim import SimConfig
from benchmarks import report
from benchmarks.harness import LocalStack, SimProcess, mean
from benchmarks.loadgen import measure_capacity
from benchmarks.mixed import Batch, Mixed, run_mixed
from benchmarks.report import times, verdict
from benchmarks.workloads import batch_body

NAME = "phases"
TITLE = "Load that changes: interactive 0% → 50% → 10% → 0% of capacity beside a batch"

TIME_SCALE = 0.5
PHASE = 60.0  # real seconds (two minutes of model time at this scale)
SHARES = (0.0, 0.5, 0.1, 0.0)
INTERACTIVE_TOKENS = 64
SETTLE = 3.0  # each phase's first seconds are left out of its latency figures
SLOWDOWN = 1.3
UTILISATION = 0.95
RECOVERY = 10.0  # seconds after the users leave by which the batch must have the engine again
RATE_WINDOW = 2.0  # the engine's output rate for utilisation is over this many seconds
QUIET = 2.0  # the engine's queue is back to ~0 when it stays at most 1 for this long
BINS = 1.0  # interactive latency after the step is judged per this many seconds of requests...
BINS_IN_BUDGET = 5  # ...and is back within budget when this many bins in a row are


def first_quiet(mixed: Mixed, start: float, end: float) -> float | None:
    """The first time in [start, end) from which the engine's waiting queue stays at most 1 for QUIET seconds."""
    samples = [(t, s["waiting"]) for t, s in mixed.engine.samples if start <= t < end]
    for i, (t, _) in enumerate(samples):
        ahead = [w for u, w in samples[i:] if u < t + QUIET]
        if samples[-1][0] >= t + QUIET and all(w <= 1 for w in ahead):
            return t
    return None


def latency_back(mixed: Mixed, start: float, alone: Mixed, alone_start: float, budget: float) -> float | None:
    """The start of the first BINS-s bin of interactive requests from which BINS_IN_BUDGET bins in a row have a mean
    latency within `budget` times the same bin's alone (the same arrivals: Poisson bursts make some bins slower than
    the phase's mean without any batch)."""
    offset = 0.0
    while offset + BINS * BINS_IN_BUDGET <= PHASE:
        within = []
        for i in range(BINS_IN_BUDGET):
            low, high = offset + i * BINS, offset + (i + 1) * BINS
            beside, without = (
                mixed.latencies(start + low, start + high),
                alone.latencies(alone_start + low, alone_start + high),
            )
            within.append(bool(beside and without) and mean(beside) <= budget * mean(without))
        if all(within):
            return start + offset
        offset += BINS
    return None


def utilisation_back(mixed: Mixed, start: float, end: float, capacity: float) -> float | None:
    """The first time t in [start, end) at which the engine's output rate over [t, t + RATE_WINDOW] is ≥ 95% of
    capacity."""
    for t, _ in mixed.engine.samples:
        if (
            start <= t
            and t + RATE_WINDOW <= end
            and mixed.engine.rate("generation_tokens", t, t + RATE_WINDOW) >= UTILISATION * capacity
        ):
            return t
    return None


def limit_cut(mixed: Mixed, start: float, end: float) -> float | None:
    """When the runner's limit first came within 10% of its median over the rest of the phase (after SETTLE)."""
    metrics = mixed.batches[0].metrics
    assert metrics is not None
    settled = sorted(metrics.series("batch_runner_concurrency_limit", start + SETTLE, end))
    target = 1.1 * settled[len(settled) // 2]
    for t, values in metrics.samples:
        if t >= start and sum(v for k, v in values.items() if k.startswith("batch_runner_concurrency_limit")) <= target:
            return t
    return None


def run() -> None:
    config = SimConfig(time_scale=TIME_SCALE)
    with SimProcess(config) as sim, LocalStack([sim.url]) as stack:
        capacity = measure_capacity(sim, lambda i: msgspec.json.encode(batch_body(i, seed=99)), 256, 8.0, 20.0)
        cap = capacity["tokens_per_s"]
        service = capacity["running"] / capacity["requests_per_s"]  # Little's law: a batch request's time at the knee
        rates = [share * cap / INTERACTIVE_TOKENS for share in SHARES]
        print(f"  capacity {cap * TIME_SCALE:,.0f} output tokens/s (model time); interactive alone", flush=True)
        # Alone: only the phases with users (the others last 0 s there, so each phase keeps its place and arrivals).
        users = [i for i, share in enumerate(SHARES) if share > 0]
        alone_phases = [(PHASE if share > 0 else 0.0, rate) for share, rate in zip(SHARES, rates, strict=True)]
        alone = run_mixed(sim, None, alone_phases, [], seed=2)  # users' bodies of their own (see run_mixed)
        print("  with a batch through the runner (defaults)", flush=True)
        requests = int(capacity["requests_per_s"] * (PHASE * len(SHARES) + 30))
        mixed = run_mixed(sim, stack, [(PHASE, rate) for rate in rates], [Batch("defaults")], requests, seed=1)
        series = mixed.save("phases-defaults")

    rows = []
    ratios = {}
    for i, share in enumerate(SHARES):
        start, end = mixed.started + i * PHASE, mixed.started + (i + 1) * PHASE
        f = mixed.figures(start + SETTLE, end)
        row = {
            "phase": f"{i + 1}: {share:.0%}",
            "seconds": f"{i * PHASE:.0f}-{(i + 1) * PHASE:.0f}",
            "interactive requests": f["requests"],
        }
        if share > 0:
            j = users.index(i)
            a = alone.figures(alone.started + j * PHASE + SETTLE, alone.started + (j + 1) * PHASE)
            ratios[i] = (f["p99"] / a["p99"], f["p50"] / a["p50"], f["itl"] / a["itl"])
            row.update(
                {
                    "p50 s (alone)": f"{f['p50']:.3f} ({a['p50']:.3f})",
                    "p99 s (alone)": f"{f['p99']:.3f} ({a['p99']:.3f})",
                    "p50 ×": f"{ratios[i][1]:.2f}",
                    "p99 ×": f"{ratios[i][0]:.2f}",
                    "per-token ×": f"{ratios[i][2]:.2f}",
                }
            )
        row.update(
            {
                "batch tokens/s": f["batch_rate"] * TIME_SCALE,
                "engine utilisation": f"{f['engine_rate'] / cap:.1%}",
                "engine running": f["running"],
                "engine waiting": f["waiting"],
                "runner limit": f["limit"],
                "failed": f["failures"],
                "longest stall s": f["stall"],
            }
        )
        rows.append(row)
        print(f"  phase {i + 1} ({share:.0%}): {row}", flush=True)

    step = mixed.started + PHASE  # users arrive
    quiet = first_quiet(mixed, step, step + PHASE)
    back = latency_back(mixed, step, alone, alone.started + users.index(1) * PHASE, SLOWDOWN)
    cut = limit_cut(mixed, step, step + PHASE)
    yielded = max(quiet, back) - step if quiet is not None and back is not None else None
    leave = mixed.started + 3 * PHASE  # users leave
    recovered = utilisation_back(mixed, leave, leave + PHASE, cap)
    recovery = recovered - leave if recovered is not None else None
    held = mixed.engine.rate("generation_tokens", leave + RECOVERY, leave + PHASE) / cap
    worst = max(r[0] for r in ratios.values())

    def fmt(seconds: float | None) -> str:
        return "never" if seconds is None else f"{seconds:.1f} s"

    d = (mixed.batches[0].run_stats or {}).get("endpoints", {})
    snapshot = next(iter(d.values()), {})
    body = f"""
`python -m benchmarks phases` (about 8 minutes). Simulator at its default cost model, `time_scale` {TIME_SCALE}: each
phase is {PHASE:.0f} real seconds, {PHASE / TIME_SCALE:.0f} s of model time; token rates are in model time, latencies
wall-clock. Capacity {cap * TIME_SCALE:,.0f} output tokens/s (direct closed loop of 256, batch mix, as `utilisation`
measures it); a batch request lasts about {service:.1f} s at the knee (Little's law on that run). Interactive users:
open-loop Poisson chat turns ({INTERACTIVE_TOKENS} output tokens) at {", ".join(f"{s:.0%}" for s in SHARES)} of
capacity, straight to the simulator; the batch ({requests:,} requests of the utilisation mix) starts with the first
phase through the real runner with defaults and is cancelled at the end. The alone baseline runs the same arrivals of
the phases with users, without the batch. Latency figures are of the requests sent after the first {SETTLE:.0f} s of
each phase; utilisation is the engine's output rate (`generation_tokens` of /sim/stats) over capacity. The longest stall
is the longest gap between two samples of the engine (4 a second): above ~0.5 s the shared machine stalled every
process, and the latencies of that phase carry it.

{report.table(rows)}
- **Yield at 0% → 50%**: the engine's waiting queue stayed at most 1 (for {QUIET:.0f} s) from
  {fmt(quiet - step if quiet else None)} after the users arrived; interactive latency (mean per {BINS:.0f}-s bin of
  requests, {BINS_IN_BUDGET} bins in a row, against the same bin's requests alone: the same arrivals) was within 1.3×
  from {fmt(back - step if back else None)}; both: **{fmt(yielded)}**. The runner's limit came within 10% of its
  level for the phase {fmt(cut - step if cut else None)} after the step.
- **Back to the engine at 10% → 0%**: the engine's output rate (over {RATE_WINDOW:.0f} s) reached
  {UTILISATION:.0%} of capacity **{fmt(recovery)}** after the users left; from {RECOVERY:.0f} s after to the end of the
  phase it was {held:.1%} of capacity.
- The runner's last snapshot (at the end, after a minute alone): regime `{snapshot.get("regime")}`, limit
  {snapshot.get("limit")}, capacity {snapshot.get("capacity")}, step fit {snapshot.get("step_fit")}.

**Targets: p99 ≤ {SLOWDOWN}× alone in each phase with users after {SETTLE:.0f} s — worst {times(worst, SLOWDOWN)}
({verdict(worst <= SLOWDOWN)}); ≥ {UTILISATION:.0%} utilisation within {RECOVERY:.0f} s of the users leaving —
{fmt(recovery)} ({verdict(recovery is not None and recovery <= RECOVERY)}).**
"""
    print(f"  time series: {series}", flush=True)
    report.write_section(
        NAME,
        TITLE,
        body,
        [
            *[
                (
                    f"phases: p99 in phase {i + 1} ({SHARES[i]:.0%}) after {SETTLE:.0f} s",
                    f"≤ {SLOWDOWN}× alone",
                    f"{times(r[0], SLOWDOWN)}: {verdict(r[0] <= SLOWDOWN)}",
                )
                for i, r in ratios.items()
            ],
            (
                "phases: utilisation back after the users leave",
                f"≥ {UTILISATION:.0%} within {RECOVERY:.0f} s",
                f"{fmt(recovery)}: {verdict(recovery is not None and recovery <= RECOVERY)}",
            ),
            (
                "phases: batch yields at 0% → 50% (queue ~0 and latency within budget)",
                "(no target; ~one service time)",
                fmt(yielded),
            ),
        ],
    )
