"""`prefix`: prefix-cache hit rate on a shuffled input with many shared system prompts — input order, the runner's
order, and the ideal.

The ideal computes each distinct prefix block exactly once (an unbounded cache where a block is reusable as soon as it
is computed), with the simulator's own tokenisation and block hashing, so the three figures are comparable. Each run
gets a fresh simulator (a cold cache). The default cost model's cache (whatever of the KV cache is free, ~400k tokens)
holds every system prompt at once; a second pair of runs caps the prefix cache at a quarter of the prompts' blocks,
where order matters more.
"""

from __future__ import annotations

import asyncio

from batch_gateway.sim import SimConfig
from benchmarks import report
from benchmarks.harness import LocalStack, SimProcess
from benchmarks.workloads import batch_line, chunked, shared_prefix_bodies

NAME = "prefix"
TITLE = "Prefix cache: hit rate on shuffled shared system prompts"

PROMPTS, PER_PROMPT = 50, 40
SYSTEM_WORDS = 700  # ~1,000 tokens
USER_WORDS = 15
MAX_TOKENS = 16
TARGET = 0.95


def ideal_hit_rate(bodies: list[dict], block_size: int) -> float:
    """Each distinct block computed once, with the simulator's tokenisation; at least one token of every prompt is
    computed, as the simulator (and vLLM) do."""
    from batch_gateway.sim.requests import _chat_text  # the simulator's own chat template, so tokens match
    from batch_gateway.sim.tokens import prompt_from_text

    seen: set[bytes] = set()
    hits = queries = 0
    for body in bodies:
        prompt = prompt_from_text(_chat_text(body["messages"]), block_size)
        found = 0
        for block in prompt.block_hashes[: (prompt.tokens - 1) // block_size]:
            if block not in seen:
                break
            found += 1
        seen.update(prompt.block_hashes)
        hits += found * block_size
        queries += prompt.tokens
    return hits / queries


def distinct_blocks(bodies: list[dict], block_size: int) -> int:
    from batch_gateway.sim.requests import _chat_text
    from batch_gateway.sim.tokens import prompt_from_text

    return len({h for body in bodies for h in prompt_from_text(_chat_text(body["messages"]), block_size).block_hashes})


def run_once(config: SimConfig, data: bytes, ordering: bool) -> dict:
    with SimProcess(config) as sim, LocalStack([sim.url], prefix_ordering=ordering) as stack:
        batch_id = asyncio.run(stack.create_batch(data))
        result = stack.run_runner(batch_id, timeout=600)
        stats = sim.stats()
    if result.batch.status != "completed":
        raise RuntimeError(f"the batch ended {result.batch.status}")
    usage = result.batch.usage
    cached = usage.input_tokens_details.cached_tokens / usage.input_tokens if usage and usage.input_tokens else None
    return {
        "hit_rate": stats["prefix_cache_hits"] / stats["prefix_cache_queries"],
        "cached_share": cached,
        "prefill_tokens": stats["prefill_tokens"],
        "seconds": result.seconds,
        "preemptions": stats["preemptions"],
    }


def run() -> None:
    bodies = shared_prefix_bodies(PROMPTS, PER_PROMPT, SYSTEM_WORDS, USER_WORDS, MAX_TOKENS)
    data = b"".join(chunked(batch_line(f"req-{i}", body) for i, body in enumerate(bodies)))
    default = SimConfig()
    ideal = ideal_hit_rate(bodies, default.block_size)
    small_cache = distinct_blocks(bodies, default.block_size) // 4
    rows = []
    figures = {}
    for cache_label, config in (
        ("default (free KV, ~400k tokens)", default),
        (f"capped at {small_cache:,} blocks (¼ of the prompts)", SimConfig(cache_blocks=small_cache)),
    ):
        for order_label, ordering in (
            ("input order (prefix ordering off)", False),
            ("runner order (prefix ordering on)", True),
        ):
            r = run_once(config, data, ordering)
            figures[(cache_label, ordering)] = r
            rows.append(
                {
                    "prefix cache": cache_label,
                    "order": order_label,
                    "hit rate": f"{r['hit_rate']:.1%}",
                    "of ideal": f"{r['hit_rate'] / ideal:.1%}",
                    "cached_tokens share (runner usage)": f"{r['cached_share']:.1%}"
                    if r["cached_share"] is not None
                    else "",
                    "prompt tokens computed": f"{r['prefill_tokens']:,}",
                    "run seconds": r["seconds"],
                }
            )
            print(
                f"  {cache_label}, {order_label}: {r['hit_rate']:.1%} ({r['hit_rate'] / ideal:.1%} of ideal)",
                flush=True,
            )
        rows.append(
            {
                "prefix cache": cache_label,
                "order": "ideal (each distinct block computed once)",
                "hit rate": f"{ideal:.1%}",
                "of ideal": "100%",
                "cached_tokens share (runner usage)": "",
                "prompt tokens computed": "",
                "run seconds": "",
            }
        )
    default_label, small_label = list(dict.fromkeys(label for label, _ in figures))
    measured = figures[(default_label, True)]["hit_rate"] / ideal
    input_default = figures[(default_label, False)]["hit_rate"] / ideal
    input_small = figures[(small_label, False)]["hit_rate"] / ideal
    runner_small = figures[(small_label, True)]["hit_rate"] / ideal
    computed_ratio = figures[(small_label, False)]["prefill_tokens"] / figures[(small_label, True)]["prefill_tokens"]
    body = f"""
`python -m benchmarks prefix`. {PROMPTS} system prompts of ~1,000 tokens, each shared by {PER_PROMPT} requests with
their own short user turn ({PROMPTS * PER_PROMPT:,} requests, shuffled), {MAX_TOKENS} output tokens each, run by the
real runner with default settings against a fresh simulator (default cost model, real time). Hit rate = the simulator's
`prefix_cache_hits / prefix_cache_queries` (prompt tokens); the runner-side share of `cached_tokens` in the batch's
usage is shown beside it.

{report.table(rows)}
**Target: ≥ {TARGET:.0%} of ideal with the default cache — measured {measured:.1%}:
{"met" if measured >= TARGET else "**missed**"}.**
With the default cache every system prompt stays cached, so after each prompt's first use even input order hits
({input_default:.1%} of ideal); ordering shows when the cache holds only part of the prompts: {input_small:.1%} of
ideal in input order against {runner_small:.1%} in the runner's order, with
{computed_ratio:.1f}× fewer prompt tokens computed.
"""
    report.write_section(
        NAME,
        TITLE,
        body,
        [
            (
                "prefix-cache hit rate, runner order (default cache)",
                f"≥ {TARGET:.0%} of ideal",
                f"{measured:.1%} of ideal: {'met' if measured >= TARGET else '**missed**'}",
            ),
        ],
    )
