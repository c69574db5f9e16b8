"""`deadlines`: three tenants' batches of mixed sizes and windows arriving over a few minutes, more work than the engine
can do meanwhile: how many deadlines are missed, how the tenants share the engine, how long batches wait to start —
deadline-aware admission and urgency shares against FIFO admission with equal shares, in the same run.

`batch-gateway serve` runs as in production (local executor, `--max-concurrent-runners 3`, API keys whose tenants
have weights 2, 1 and 1), against the simulator time-scaled; batches are uploaded and created through the `openai`
SDK on their arrival schedule and watched through the API. Sizes are in engine-seconds: the seconds the whole engine
takes for them, from its capacity measured first. Each policy runs two scenarios on a fresh data directory:

* **mixed**: 12 batches over three minutes, windows of 1 to 6 minutes or 24 h; tenant A submits four batches early
  (a flood) and tenant C one batch while they wait. Whether an earliest-deadline-first schedule of the same arrivals
  on the same engine (preemptive, the whole engine to the earliest deadline) would miss any deadline is computed too.
* **loose**: every batch has a 24 h window; each tenant submits three, all at once (A, B, C, A, B, C, ...). The share
  of completed requests per tenant is measured while all three have work, against their weights' shares.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import msgspec
import openai

from batch_gateway.sim import SimConfig
from benchmarks import report
from benchmarks.api import start_server
from benchmarks.harness import SimProcess, free_port, stop_process
from benchmarks.loadgen import measure_capacity
from benchmarks.workloads import batch_body, batch_lines

NAME = "deadlines"
TITLE = "Deadlines: admission and engine shares between three tenants"

TIME_SCALE = 0.5
SLOTS = 3
WEIGHTS = {"A": 2.0, "B": 1.0, "C": 1.0}
WINDOWS = "1m,2m,3m,4m,6m,24h"
LOOSE_WINDOW = (15.0, 75.0)  # real seconds after the batches are created: the loose scenario's measured window
POLL = 1.0
TIMEOUT = 900.0
FLOOD_TENANT, SINGLE_TENANT = "A", "C"


@dataclass(frozen=True)
class Spec:
    tenant: str
    arrive: float  # real seconds after the scenario starts
    engine_seconds: float
    window: str


# The mixed scenario, in arrival order: A floods early (1, 2, 4, 6); C's single batch (5) arrives while A's wait.
MIXED = [
    Spec("A", 0, 40, "24h"),
    Spec("A", 5, 25, "24h"),
    Spec("B", 10, 30, "6m"),
    Spec("A", 15, 20, "24h"),
    Spec("C", 20, 15, "24h"),
    Spec("A", 30, 25, "24h"),
    Spec("B", 60, 10, "2m"),
    Spec("A", 90, 15, "3m"),
    Spec("C", 100, 10, "1m"),
    Spec("B", 120, 20, "24h"),
    Spec("C", 150, 15, "3m"),
    Spec("B", 180, 10, "2m"),
]
LOOSE = [Spec(t, 0, 20, "24h") for t in ("A", "B", "C") * 3]

POLICIES = {
    "deadline-aware": {"BATCH_GATEWAY_ADMISSION_ORDER": "deadline", "BATCH_GATEWAY_DEADLINE_SHARES": "true"},
    "FIFO, equal shares": {"BATCH_GATEWAY_ADMISSION_ORDER": "fifo", "BATCH_GATEWAY_DEADLINE_SHARES": "false"},
}


def seconds_of(window: str) -> float:
    return float(window[:-1]) * {"m": 60, "h": 3600}[window[-1]]


@dataclass
class Outcome:
    spec: Spec
    batch_id: str = ""
    created: float = 0.0  # real seconds after the scenario started
    started: float | None = None  # when it left `validating` (its runner had ingested it)
    ended: float | None = None
    status: str = ""
    completed: int = 0
    progress: list[tuple[float, int]] = field(default_factory=list)

    @property
    def deadline(self) -> float:
        return self.created + seconds_of(self.spec.window)

    @property
    def missed(self) -> bool:
        return self.status != "completed" or (self.ended is not None and self.ended > self.deadline + 1)


def run_scenario(sim_url: str, specs: list[Spec], rps: float, policy: dict[str, str], stop_after: float | None):
    data_dir = tempfile.mkdtemp(prefix="bg-bench-deadlines-")
    env = {
        **os.environ,
        "BATCH_GATEWAY_DATA_DIR": data_dir,
        "BATCH_GATEWAY_UPSTREAM": sim_url,
        "BATCH_GATEWAY_AUTH": "keys",
        "BATCH_GATEWAY_MAX_CONCURRENT_RUNNERS": str(SLOTS),
        "BATCH_GATEWAY_COMPLETION_WINDOWS": WINDOWS,
        "BATCH_GATEWAY_FAIR_SHARE_WINDOW": "120",
        "BATCH_GATEWAY_LOG_FORMAT": "json",
        "BATCH_GATEWAY_LOG_LEVEL": "warning",
        **policy,
    }
    keys = {}
    for tenant, weight in WEIGHTS.items():
        created = subprocess.run(
            [sys.executable, "-m", "batch_gateway", "keys", "create", "--tenant", tenant, "--weight", str(weight)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        keys[tenant] = created.stdout.strip().splitlines()[-1]
    port = free_port()
    outcomes = [Outcome(spec) for spec in specs]
    with open(os.path.join(data_dir, "serve.log"), "ab") as log:
        server = start_server(env, port, log)
        try:
            clients = {t: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=k) for t, k in keys.items()}
            files = []
            for i, spec in enumerate(specs):  # uploaded before the clock starts
                lines = b"".join(batch_lines(max(1, round(spec.engine_seconds * rps)), seed=100 + i))
                files.append(clients[spec.tenant].files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch"))
            began = time.monotonic()
            pending = sorted(range(len(specs)), key=lambda i: specs[i].arrive)
            while True:
                now = time.monotonic() - began
                while pending and specs[pending[0]].arrive <= now:
                    i = pending.pop(0)
                    batch = clients[specs[i].tenant].batches.create(
                        input_file_id=files[i].id, endpoint="/v1/chat/completions", completion_window=specs[i].window
                    )
                    outcomes[i].batch_id, outcomes[i].created = batch.id, time.monotonic() - began
                for outcome in outcomes:
                    if outcome.batch_id and not outcome.ended:
                        watch(outcome, clients[outcome.spec.tenant], time.monotonic() - began)
                done = not pending and all(o.ended for o in outcomes)
                if done or (stop_after is not None and now > stop_after) or now > TIMEOUT:
                    break
                time.sleep(POLL)
        finally:
            stop_process(server)
    shutil.rmtree(data_dir, ignore_errors=True)
    return outcomes


def watch(outcome: Outcome, client: openai.OpenAI, now: float) -> None:
    batch = client.batches.retrieve(outcome.batch_id)
    outcome.completed = batch.request_counts.completed
    outcome.progress.append((now, outcome.completed))
    if outcome.started is None and batch.status != "validating":
        outcome.started = now
    if batch.status in ("completed", "failed", "expired", "cancelled"):
        outcome.ended, outcome.status = now, batch.status


def completed_between(outcome: Outcome, start: float, end: float) -> float:
    def at(when: float) -> float:
        before = [c for t, c in outcome.progress if t <= when]
        return float(before[-1]) if before else 0.0

    return at(end) - at(start)


def tenant_shares(outcomes: list[Outcome], start: float, end: float) -> dict[str, float]:
    work = {t: sum(completed_between(o, start, end) for o in outcomes if o.spec.tenant == t) for t in WEIGHTS}
    total = sum(work.values())
    return {t: w / total if total else 0.0 for t, w in work.items()}


def slot_taken(single: Outcome, outcomes: list[Outcome]) -> Outcome | None:
    """The batch whose runner slot `single` took: the last to end before it started."""
    if single.started is None:
        return None
    before = [o for o in outcomes if o is not single and o.ended is not None and o.ended <= single.started]
    return max(before, key=lambda o: o.ended or 0.0, default=None)


def edf_misses(specs: list[Spec], deadlines: list[float]) -> int:
    """Deadlines an earliest-deadline-first schedule misses on one engine of capacity 1 engine-second per second:
    preemptive, the whole engine to the released batch with the earliest deadline (optimal on one resource)."""
    left = [s.engine_seconds for s in specs]
    now, misses, step = 0.0, 0, 0.1
    finished = [False] * len(specs)
    while not all(finished):
        ready = [i for i, s in enumerate(specs) if s.arrive <= now and not finished[i]]
        if ready:
            i = min(ready, key=lambda j: deadlines[j])
            left[i] -= step
            if left[i] <= 0:
                finished[i] = True
                misses += now + step > deadlines[i]
        now += step
    return misses


def run() -> None:
    with SimProcess(SimConfig(time_scale=TIME_SCALE)) as sim:
        capacity = measure_capacity(sim, lambda i: msgspec.json.encode(batch_body(i, seed=99)), 256, 8.0, 20.0)
        rps = capacity["requests_per_s"]
        print(f"  capacity: {rps:,.1f} requests/s real time ({rps / TIME_SCALE:,.1f} in model time)", flush=True)
        results: dict[str, dict[str, list[Outcome]]] = {}
        for label, policy in POLICIES.items():
            mixed = run_scenario(sim.url, MIXED, rps, policy, None)
            loose = run_scenario(sim.url, LOOSE, rps, policy, LOOSE_WINDOW[1] + 2)
            results[label] = {"mixed": mixed, "loose": loose}
            print(f"  {label}: " + summary_line(mixed, loose), flush=True)
    write(results, rps)


def summary_line(mixed: list[Outcome], loose: list[Outcome]) -> str:
    shares = tenant_shares(loose, *LOOSE_WINDOW)
    waits = [o.started - o.created for o in mixed if o.started is not None]
    return (
        f"{sum(o.missed for o in mixed if o.spec.window != '24h')} of {sum(o.spec.window != '24h' for o in mixed)} "
        f"deadlines missed, mean wait "
        f"{statistics.mean(waits) if waits else float('nan'):.1f} s, loose shares "
        + ", ".join(f"{t} {s:.0%}" for t, s in shares.items())
    )


def write(results: dict[str, dict[str, list[Outcome]]], rps: float) -> None:
    labels = list(results)
    first = results[labels[0]]["mixed"]
    edf = edf_misses(MIXED, [o.deadline for o in first])
    weight_total = sum(WEIGHTS.values())
    rows, figures = [], {}
    for n, spec in enumerate(MIXED):
        row = {
            "#": n + 1,
            "tenant": spec.tenant,
            "arrives s": spec.arrive,
            "size (engine-s)": spec.engine_seconds,
            "window": spec.window,
        }
        for label in labels:
            o = results[label]["mixed"][n]
            short = "deadline" if label == labels[0] else "FIFO"
            row[f"{short}: wait s"] = round(o.started - o.created, 1) if o.started is not None else None
            row[f"{short}: ended s"] = round(o.ended, 1) if o.ended is not None else None
            row[f"{short}: in time"] = "-" if spec.window == "24h" else ("no" if o.missed else "yes")
        rows.append(row)
    policy_rows = []
    for label in labels:
        mixed, loose = results[label]["mixed"], results[label]["loose"]
        waits = [o.started - o.created for o in mixed if o.started is not None]
        runs = [o.ended - o.started for o in mixed if o.started is not None and o.ended is not None]
        single = mixed[4]  # C's single batch, arriving while A's flood waits
        taken = slot_taken(single, mixed)
        ahead = sum(
            1
            for o in mixed
            if o.spec.tenant == FLOOD_TENANT
            and single.started is not None
            and o.started is not None
            and single.created < o.started < single.started
        )
        mixed_window = (0.0, max(s.arrive for s in MIXED))
        mixed_shares = tenant_shares(mixed, *mixed_window)
        loose_shares = tenant_shares(loose, *LOOSE_WINDOW)
        worst = max(abs(loose_shares[t] / (WEIGHTS[t] / weight_total) - 1) for t in WEIGHTS)
        figures[label] = {
            "missed": sum(o.missed for o in mixed if o.spec.window != "24h"),
            "mean_wait": statistics.mean(waits) if waits else float("nan"),
            "single_wait": (single.started - single.created) if single.started is not None else float("nan"),
            "mean_run": statistics.mean(runs) if runs else float("nan"),
            "slot_run": (taken.ended - taken.started)
            if taken and taken.started is not None and taken.ended
            else math.nan,
            "ahead": ahead,
            "worst_share": worst,
        }
        policy_rows.append(
            {
                "policy": label,
                "deadlines missed (mixed)": f"{figures[label]['missed']} of {sum(s.window != '24h' for s in MIXED)}",
                "mean queue wait s (mixed)": round(figures[label]["mean_wait"], 1),
                "C's single batch waited s": round(figures[label]["single_wait"], 1),
                "mean run s": round(figures[label]["mean_run"], 1),
                "run of the batch whose slot C's took s": round(figures[label]["slot_run"], 1),
                "A's batches started ahead of C's": figures[label]["ahead"],
                "shares A/B/C, mixed, first 3 min": " / ".join(f"{mixed_shares[t]:.0%}" for t in WEIGHTS),
                "shares A/B/C, loose": " / ".join(f"{loose_shares[t]:.0%}" for t in WEIGHTS),
                "worst loose share vs weight": f"{worst:+.0%}" if worst else "0%",
            }
        )
    ours, fifo = figures[labels[0]], figures[labels[1]]
    no_miss = ours["missed"] == 0 if edf == 0 else None
    shares_ok = ours["worst_share"] <= 0.2
    flood_ok = ours["single_wait"] <= ours["slot_run"] and ours["ahead"] == 0
    load = report.background_load()
    body = f"""
`python -m benchmarks deadlines`. `batch-gateway serve` (local executor, {SLOTS} runner slots, SQLite) and the
simulator at time scale {TIME_SCALE} (capacity measured first: {rps:,.1f} requests/s of `batch_body` requests, real
time); tenants A, B and C have weights {", ".join(f"{t} {w:g}" for t, w in WEIGHTS.items())}; `--fair-share-window
120` (the runs take a minute or two). Sizes are engine-seconds
(seconds of the whole engine, real time); times are real seconds after the scenario's start (×{1 / TIME_SCALE:g} for
model time). Each policy gets the same arrivals, on a fresh data directory. An earliest-deadline-first schedule of the
mixed arrivals (preemptive, one engine) misses **{edf}** deadlines. Other processes on the machine used
{f"{load:.2f}" if load is not None else "?"} cores on average while this ran.

{report.table(policy_rows)}
The mixed scenario, batch by batch (a batch waits from its creation until its runner has ingested it; "in time" is
completed by its `expires_at`; a missed one ended `expired` with its partial results):

{report.table(rows)}
Targets (deadline-aware policy): no misses where the EDF schedule has none — {_verdict(no_miss, ours["missed"])};
each tenant's share within ±20% of its weight's with loose deadlines — worst {ours["worst_share"]:+.0%}
({"met" if shares_ok else "**missed**"}); C's single batch behind A's flood waits at most one batch's run time —
{ours["single_wait"]:.1f} s, against {ours["slot_run"]:.1f} s for the run of the batch whose slot it took, with
{ours["ahead"]} of A's waiting batches started ahead of it ({"met" if flood_ok else "**missed**"}). Admission never
stops a running batch: the best it can do is give C's batch the first slot that frees, so that it waits for no more than
the rest of one batch's run, whatever A has queued.
FIFO with equal shares, same arrivals: {fifo["missed"]} missed, mean wait {fifo["mean_wait"]:.1f} s, C's single
batch waited {fifo["single_wait"]:.1f} s, worst loose share {fifo["worst_share"]:+.0%}.
"""
    report.write_section(
        NAME,
        TITLE,
        body,
        [
            (
                "Deadlines missed, 12 mixed batches",
                f"0 where EDF misses none (EDF: {edf})",
                f"{ours['missed']} (FIFO: {fifo['missed']}): {_verdict(no_miss, ours['missed'])}",
            ),
            (
                "Tenant shares with loose deadlines",
                "within ±20% of weights",
                f"worst {ours['worst_share']:+.0%} (FIFO {fifo['worst_share']:+.0%}): "
                f"{'met' if shares_ok else '**missed**'}",
            ),
            (
                "A tenant's single batch behind another's flood",
                "waits ≤ one batch's run time",
                f"{ours['single_wait']:.0f} s vs that slot's run {ours['slot_run']:.0f} s, "
                f"{ours['ahead']} of A's ahead "
                f"(FIFO {fifo['single_wait']:.0f} s, {fifo['ahead']} ahead): "
                f"{'met' if flood_ok else '**missed**'}",
            ),
            (
                "Mean queue wait, mixed (no target)",
                "",
                f"{ours['mean_wait']:.1f} s (FIFO {fifo['mean_wait']:.1f} s)",
            ),
        ],
    )


def _verdict(ok: bool | None, missed: int) -> str:
    if ok is None:
        return f"not applicable (EDF misses too), {missed} missed"
    return "met" if ok else "**missed**"
