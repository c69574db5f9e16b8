"""`prefix`: prefix-cache hit rate on shuffled input with shared prompts, against the ideal, when the cache holds every
prompt and when it holds only a tenth of them (issue #13).

The ideal computes each distinct prompt block exactly once (an unbounded cache where a block is reusable as soon as it
is computed), with the simulator's own tokenisation and block hashing, so the figures are comparable. Each run gets a
fresh simulator (a cold cache) and the real runner with default settings.

A small cache is the simulator's `--cache-blocks`: the prefix cache keeps at most that many blocks (those running
sequences hold included), while running sequences still get the whole KV cache, so the engine's concurrency is that
of the unbounded runs and throughputs compare. "Holds 20% of the distinct prompts" means a cap of a fifth of the
blocks that two or more requests share. The runner reads the cap from `/metrics` (`vllm:cache_config_info`'s
`num_gpu_blocks`), or, with `--hide-cache-info`, learns its window from the answers' `cached_tokens`.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from dataclasses import dataclass

import httpx

from batch_gateway.runner.prefix_window import MARGIN
from batch_gateway.sim import SimConfig
from benchmarks import report
from benchmarks.harness import LocalStack, SimProcess
from benchmarks.workloads import batch_line, chat_body, chunked, shared_prefix_bodies, words

NAME = "prefix"
TITLE = "Prefix cache: hit rate on shuffled shared prompts, with the whole cache and with a small one"

# Issue #13's main case: groups of 10 sharing a prompt of a few hundred tokens.
GROUPS, PER_GROUP = 200, 10
PROMPT_WORDS = 250  # ~400 tokens
USER_WORDS = 15
MAX_TOKENS = 16
SHARES = (0.4, 0.2, 0.1)  # of the distinct prompts the small caches hold
TARGETS = {0.4: 0.95, 0.2: 0.90, 0.1: 0.85}  # share of the ideal hit rate
THROUGHPUT_TARGET = 0.95  # of the unbounded cache's
SHAPE_SHARE = 0.2  # cache of the other shapes
# The whole-cache case kept from before: 50 system prompts of ~1,000 tokens, 40 requests each.
LONG_PROMPTS, LONG_PER_PROMPT, LONG_WORDS = 50, 40, 700
DEFAULT_TARGET = 0.95
# The main case's runs vary by several percent (a few evictions more or less, on a shared CPU): its table shows the
# median run of RUNS, by throughput, for the unbounded cache and each small one, and the range.
RUNS = 3
CEILING_SEQS = (110, 90, 70)  # the engine's max_num_seqs, to show what fewer running requests cost
SAMPLE_SECONDS = 0.1  # how often the engines' running sequences are read during a run


def _prompt(body: dict, block_size: int):
    from batch_gateway.sim.requests import _chat_text  # the simulator's own chat template, so tokens match
    from batch_gateway.sim.tokens import prompt_from_text

    return prompt_from_text(_chat_text(body["messages"]), block_size)


def ideal_hit_rate(bodies: list[dict], block_size: int) -> float:
    """Each distinct block computed once; at least one token of every prompt is computed, as the simulator (and vLLM)
    do."""
    seen: set[bytes] = set()
    hits = queries = 0
    for body in bodies:
        prompt = _prompt(body, block_size)
        found = 0
        for block in prompt.block_hashes[: (prompt.tokens - 1) // block_size]:
            if block not in seen:
                break
            found += 1
        seen.update(prompt.block_hashes)
        hits += found * block_size
        queries += prompt.tokens
    return hits / queries


def shared_blocks(bodies: list[dict], block_size: int) -> int:
    """Distinct blocks that two or more requests share: the prompts a cache is sized against."""
    counts = Counter(h for body in bodies for h in _prompt(body, block_size).block_hashes)
    return sum(1 for count in counts.values() if count > 1)


def tree_bodies(systems: int, shots: int, questions: int, seed: int = 5) -> list[dict]:
    """A three-level few-shot prompt tree: `systems` system prompts (~200 tokens) × `shots` few-shot blocks
    (~200 tokens, in the user turn) × `questions` questions; shuffled."""
    bodies = []
    for s in range(systems):
        system = f"You are grader {s}. " + words(120, seed * 7919 + s)
        for f in range(shots):
            examples = f"Examples {s}-{f}: " + words(120, seed * 104729 + s * shots + f)
            for q in range(questions):
                question = f"Question {s}-{f}-{q}: " + words(USER_WORDS, seed * 1_299_709 + (s * shots + f) * 97 + q)
                bodies.append(chat_body(examples + "\n" + question, MAX_TOKENS, system=system))
    random.Random(seed).shuffle(bodies)
    return bodies


def blocks_per_sequence(bodies: list[dict], block_size: int, per_group: int) -> tuple[float, float]:
    """What a running request holds in the prefix cache, in blocks: its own full prompt blocks beyond the shared ones
    (the simulator caches prompt blocks; its output stays outside the cache's cap), and its part of its group's shared
    prefix."""
    prompts = [_prompt(body, block_size) for body in bodies]
    counts = Counter(h for prompt in prompts for h in prompt.block_hashes)
    shared = [sum(1 for h in prompt.block_hashes if counts[h] > 1) for prompt in prompts]
    own = [len(prompt.block_hashes) - n for prompt, n in zip(prompts, shared, strict=True)]
    return sum(own) / len(own), sum(shared) / len(shared) / per_group


class RunningSampler:
    """The engines' running sequences, sampled every SAMPLE_SECONDS from /sim/stats while they have work: what the
    window and the controller let run."""

    def __init__(self, sims: list[SimProcess]) -> None:
        self._urls = [sim.url + "/sim/stats" for sim in sims]
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RunningSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self._stop.wait(SAMPLE_SECONDS):
                stats = [client.get(url).json() for url in self._urls]
                if any(s["running"] or s["waiting"] for s in stats):
                    self._samples.append(sum(s["running"] for s in stats))

    @property
    def mean(self) -> float:
        return sum(self._samples) / len(self._samples) if self._samples else 0.0


@dataclass
class Case:
    label: str
    bodies: list[dict]
    data: bytes
    ideal: float
    shared: int  # blocks two or more requests share


def case(label: str, bodies: list[dict]) -> Case:
    block = SimConfig().block_size
    data = b"".join(chunked(batch_line(f"req-{i}", body) for i, body in enumerate(bodies)))
    return Case(label, bodies, data, ideal_hit_rate(bodies, block), shared_blocks(bodies, block))


def run_once(config: SimConfig, data: bytes, ordering: bool = True, endpoints: int = 1) -> dict:
    sims = [SimProcess(config) for _ in range(endpoints)]
    try:
        for sim in sims:
            sim.start()
        with LocalStack([sim.url for sim in sims], prefix_ordering=ordering) as stack:
            batch_id = asyncio.run(stack.create_batch(data))
            with RunningSampler(sims) as running:
                result = stack.run_runner(batch_id, timeout=900)
            stats = [sim.stats() for sim in sims]
            run_stats = asyncio.run(stack.run_stats(batch_id))
    finally:
        for sim in sims:
            sim.stop()
    if result.batch.status != "completed":
        raise RuntimeError(f"the batch ended {result.batch.status}")
    usage = result.batch.usage
    assert usage is not None
    # The lines' prompt tokens the engine did not compute: the warm-ups' prompts count as computed for the batch.
    computed = sum(s["prefill_tokens"] for s in stats)
    windows = [ep.get("prefix_window") or {} for ep in run_stats["endpoints"].values()]
    controllers = [
        {key: ep.get(key) for key in ("limit", "regime", "capacity", "decreases", "interactive_load")}
        for ep in run_stats["endpoints"].values()
    ]
    return {
        "hit_rate": 1 - computed / usage.input_tokens,
        "warm_ups": run_stats["prefix_warm_ups"],
        "joins": run_stats["prefix_joins"],
        "cached_share": usage.input_tokens_details.cached_tokens / usage.input_tokens if usage else None,
        "prefill_tokens": computed,
        "dispatch_seconds": run_stats["dispatch_seconds"],
        "requests": result.batch.request_counts.total,
        "preemptions": sum(s["preemptions"] for s in stats),
        "windows": windows,
        "controllers": controllers,
        "per_endpoint": [s["completed"] for s in stats],
        "running": running.mean,
    }


def _window(r: dict) -> str:
    """What the windows ended at: the mode, and the learnt number of groups or the groups held back."""
    parts = []
    for w in r["windows"]:
        mode = w.get("mode", "")
        if mode == "learnt":
            parts.append(
                f"learnt {w['learnt_groups']:.1f} groups, {w['cuts']} cuts, "
                f"{w.get('evicting_readings', 0)} readings of evictions"
            )
        elif mode == "cache_size":
            parts.append(f"cache size, held back {w['held_back']:,}×")
        else:
            parts.append(mode)
    joins = f" ({r['joins']:,} to join another endpoint's group)" if r["joins"] else ""
    return "; ".join(parts) + (f"; {r['warm_ups']:,} warm-ups{joins}" if r["warm_ups"] else "")


def _throughput(r: dict) -> float:
    return r["requests"] / r["dispatch_seconds"]


def _row(label: str, cache: str, info: str, r: dict, ideal: float, base: dict | None, target: float | None) -> dict:
    of_ideal = r["hit_rate"] / ideal
    rate = _throughput(r)
    row = {
        "workload": label,
        "prefix cache": cache,
        "cache size": info,
        "hit rate": f"{r['hit_rate']:.1%}",
        "of ideal": f"{of_ideal:.1%}",
        "target": f"≥ {target:.0%}: {'met' if of_ideal >= target else '**missed**'}" if target else "",
        "requests/s": f"{rate:.1f}",
        "vs unbounded": "",
        "engine's running sequences (mean)": f"{r['running']:.0f}",
        "prompt tokens computed": f"{r['prefill_tokens']:,}",
        "window at the end": _window(r),
        "controller at the end": "; ".join(f"limit {c['limit']}, {c['regime']}" for c in r["controllers"]),
    }
    if base is not None:
        share = rate / _throughput(base)
        row["vs unbounded"] = f"{share:.0%}" + (
            f" ({'met' if share >= THROUGHPUT_TARGET else '**missed**'})" if target else ""
        )
    return row


def run() -> None:
    main = case(
        f"{GROUPS} groups × {PER_GROUP}",
        shared_prefix_bodies(GROUPS, PER_GROUP, PROMPT_WORDS, USER_WORDS, MAX_TOKENS, seed=13),
    )
    rows: list[dict] = []
    summary: list[tuple[str, str, str]] = []

    def measure(c: Case, cache: str, config: SimConfig, info: str, **kwargs) -> dict:
        r = run_once(config, c.data, **kwargs)
        print(
            f"  {c.label}, {cache}, {info}: {r['hit_rate']:.1%} ({r['hit_rate'] / c.ideal:.1%} of ideal), "
            f"{_throughput(r):.1f} requests/s, window {_window(r)}",
            flush=True,
        )
        return r

    def median(runs: list[dict]) -> dict:
        return sorted(runs, key=_throughput)[len(runs) // 2]

    unbounded_runs = [measure(main, "unbounded", SimConfig(), "read") for _ in range(RUNS)]
    unbounded = median(unbounded_runs)
    row = _row(main.label, "unbounded (free KV, ~400k tokens)", "read", unbounded, main.ideal, None, None)
    row["requests/s"] += " (" + ", ".join(f"{_throughput(r):.1f}" for r in unbounded_runs) + ")"
    rows.append(row)
    for share in SHARES:
        blocks = int(main.shared * share)
        cache = f"{share:.0%} of the prompts ({blocks:,} blocks)"
        for hidden in (False, True):
            info = "hidden (learnt)" if hidden else "read"
            config = SimConfig(cache_blocks=blocks, hide_cache_info=hidden)
            runs = sorted((measure(main, cache, config, info) for _ in range(RUNS)), key=_throughput)
            r = median(runs)
            if share == SHARES[-1] and not hidden:
                smallest_read = r
            row = _row(main.label, cache, info, r, main.ideal, unbounded, TARGETS[share])
            if len(runs) > 1:
                row["vs unbounded"] += (
                    f"; {len(runs)} runs: {_throughput(runs[0]) / _throughput(unbounded):.0%}-"
                    f"{_throughput(runs[-1]) / _throughput(unbounded):.0%}"
                )
            rows.append(row)
            of_ideal = r["hit_rate"] / main.ideal
            rate = _throughput(r) / _throughput(unbounded)
            summary.append(
                (
                    f"prefix cache at {share:.0%} of the prompts, size {info}: hit rate; throughput vs unbounded",
                    f"≥ {TARGETS[share]:.0%} of ideal; ≥ {THROUGHPUT_TARGET:.0%}",
                    f"{of_ideal:.1%}: {'met' if of_ideal >= TARGETS[share] else '**missed**'}; "
                    f"{rate:.0%}: {'met' if rate >= THROUGHPUT_TARGET else '**missed**'}",
                )
            )
    # What the smallest cache allows at best: the engine's throughput with fewer running sequences (unbounded cache).
    own, part = blocks_per_sequence(main.bodies, SimConfig().block_size, PER_GROUP)
    smallest = int(main.shared * SHARES[-1])
    full_seqs = SimConfig().max_num_seqs
    base_rate = _throughput(unbounded)
    ceiling_rows = []
    for seqs in CEILING_SEQS:
        r = run_once(SimConfig(max_num_seqs=seqs), main.data)
        rate = _throughput(r)
        print(f"  max_num_seqs {seqs}: {rate:.1f} requests/s", flush=True)
        ceiling_rows.append(
            {
                "engine's max running sequences": seqs,
                "requests/s": f"{rate:.1f}",
                f"vs {full_seqs}": f"{rate / base_rate:.0%}",
            }
        )
    # Today's order without grouping, at the smallest cache: what ordering is worth.
    r = measure(main, f"{SHARES[-1]:.0%}", SimConfig(cache_blocks=smallest), "read", ordering=False)
    rows.append(
        _row(main.label + ", input order", f"{SHARES[-1]:.0%} of the prompts", "read", r, main.ideal, None, None)
    )

    shape_rows: list[dict] = []
    shapes = (
        (case("groups of 3 (600 × 3)", shared_prefix_bodies(600, 3, PROMPT_WORDS, USER_WORDS, MAX_TOKENS, 17)), 1),
        (case("three-level tree (20 × 5 × 6)", tree_bodies(20, 5, 6)), 1),
        (main, 2),
    )
    for c, endpoints in shapes:
        label = c.label if endpoints == 1 else f"{c.label}, two endpoints"
        base = measure(c, "unbounded", SimConfig(), "read", endpoints=endpoints)
        shape_rows.append(_row(label, "unbounded", "read", base, c.ideal, None, None))
        blocks = int(c.shared * SHAPE_SHARE)
        cache = f"{SHAPE_SHARE:.0%} of the prompts ({blocks:,} blocks{' each' if endpoints > 1 else ''})"
        for hidden in (False, True):
            info = "hidden (learnt)" if hidden else "read"
            r = measure(c, cache, SimConfig(cache_blocks=blocks, hide_cache_info=hidden), info, endpoints=endpoints)
            row = _row(label, cache, info, r, c.ideal, base, None)
            if endpoints > 1:
                row["window at the end"] += f" (requests per endpoint {r['per_endpoint']})"
            shape_rows.append(row)

    long_bodies = shared_prefix_bodies(LONG_PROMPTS, LONG_PER_PROMPT, LONG_WORDS, USER_WORDS, MAX_TOKENS)
    long = case(f"{LONG_PROMPTS} groups × {LONG_PER_PROMPT}, ~1,000-token prompts", long_bodies)
    default_rows = []
    for order_label, ordering in (("input order (prefix ordering off)", False), ("runner order (default)", True)):
        r = measure(long, "unbounded", SimConfig(), order_label, ordering=ordering)
        row = _row(long.label, "unbounded (free KV, ~400k tokens)", "read", r, long.ideal, None, None)
        row["workload"] = f"{long.label}, {order_label}"
        default_rows.append(row)
        if ordering:
            measured = r["hit_rate"] / long.ideal
            summary.insert(
                0,
                (
                    "prefix-cache hit rate, runner order (default cache)",
                    f"≥ {DEFAULT_TARGET:.0%} of ideal",
                    f"{measured:.1%} of ideal: {'met' if measured >= DEFAULT_TARGET else '**missed**'}",
                ),
            )

    body = f"""
`python -m benchmarks prefix`. Shuffled input, run by the real runner with default settings against a fresh simulator
(default cost model, real time, {MAX_TOKENS} output tokens a request). Hit rate = the share of the lines' prompt
tokens the simulator did not compute (`1 - prefill_tokens / the batch's input_tokens`: what the prefix warm-ups
compute counts against it); the ideal computes each distinct block once (hit rate {main.ideal:.1%} for the main
case). Throughput is requests over the runner's dispatch time, against the same batch
with an unbounded cache. A small cache is `--cache-blocks` (the prefix cache keeps at most that many blocks, while
running sequences get the whole KV cache), sized as a share of the {main.shared:,} blocks that two or more requests
share; the runner reads it from `/metrics` ("read") or the simulator hides it and the runner learns its window from
`cached_tokens` ("hidden"). The main case runs {RUNS} times with each cache: its table shows the median run by
throughput, and the range (the unbounded cache's runs in brackets). "Window at the end": per endpoint, how the
window was set and how often a group had to wait (cache size read), or the number of open groups it had learnt,
how often a miss or a reading of the prefix cache's counters cut it, and the readings that said prefixes were being
evicted, and the prefix warm-ups sent (one-token copies of group heads, `--prefix-warm-up`); "controller at the end":
the endpoint's concurrency limit and regime ("shared" means it believed others were using the engine).

**Groups of {PER_GROUP} sharing a ~400-token prompt** ({GROUPS * PER_GROUP:,} requests; issue #13's targets: ≥ 95%,
90% and 85% of the ideal with caches holding 40%, 20% and 10% of the prompts, at ≥ {THROUGHPUT_TARGET:.0%} of the
unbounded cache's throughput):

{report.table(rows)}
**What a cache holding {SHARES[-1]:.0%} of the prompts allows.** Each running request caches {own:.1f} blocks of its
own (the rest of its prompt; the simulator keeps output blocks outside the cap) and shares its group's prefix
({part * PER_GROUP:.1f} blocks) with {PER_GROUP - 1} others: were every block one a running request holds, the
{smallest:,} blocks would hold about {smallest / (own + part):.0f} running requests. They cannot all be: the cache
evicts the least recently freed block first, so a prefix that its warm-up has just computed and that waits for its
followers goes before the blocks that requests finishing after it free, and every request admitted caches blocks of
its own, which evict. The window keeps what the runner estimates its groups need to {MARGIN:.0%} of the cache (a higher
fill lost hits when it was tried: `prefix_window.MARGIN`), and the engine ran
{smallest_read["running"]:.0f} sequences on average with the size read, against {unbounded["running"]:.0f} with
the unbounded cache (up to {full_seqs}, with a queue). With fewer running sequences the engine is slower (unbounded
cache, the engine's `max_num_seqs` lowered):

{report.table(ceiling_rows)}
**Other shapes** with a cache holding {SHAPE_SHARE:.0%} of their prompts: groups of 3; a few-shot prompt tree three
levels deep (20 system prompts of ~200 tokens, each with 5 few-shot blocks of ~200 tokens, each with 6 questions: the
system prompt is computed once, each few-shot block once); the main case over two endpoints (two simulators, each
with its own cache of that size; groups stick to the endpoint whose cache holds their prompt):

{report.table(shape_rows)}
**The whole cache** (the default: every prompt stays cached), {LONG_PROMPTS} system prompts of ~1,000 tokens shared by
{LONG_PER_PROMPT} requests each:

{report.table(default_rows)}
On the real engine (llama.cpp, a prefix cache per slot) the runner keeps sending a group's followers one at a time,
the window stays off, and the batch never has more requests there than the engine's slots; the real-engine section
reports its cached prompt tokens in the runner's order against input order, with llama.cpp's host-memory prompt
cache and without it.
"""
    report.write_section(NAME, TITLE, body, summary)
