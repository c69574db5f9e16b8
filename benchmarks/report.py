"""Print benchmark figures and keep docs/benchmarks.md up to date: one section per benchmark, replaced in place."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import time
from pathlib import Path

import psutil

# BENCH_DOC: the document to update, for a run from another checkout (a worktree kept still while the main one
# changes): the section is merged into that file as it is when the run ends, so no other section goes back in time.
DOC = Path(os.environ.get("BENCH_DOC") or Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md")
ORDER = (
    "utilisation",
    "interactive",
    "phases",
    "sparse",
    "prefix",
    "overhead",
    "memory",
    "resume",
    "faults",
    "fairness",
    "deadlines",
    "real_engine",
    "api",
)

INTRO = """# Benchmarks

How well batch-gateway's runner uses an engine, protects interactive users, reuses the prefix cache, and how little
it costs: measured against the built-in vLLM simulator (`batch-gateway sim`) and a real engine (llama.cpp's
llama-server on the CPU) on this machine, plus the HTTP API under load. `make bench` runs them all;
`python -m benchmarks NAME [NAME ...]` runs some (utilisation, interactive, phases, sparse, prefix, overhead, memory,
resume, faults, fairness, deadlines, real_engine, api). Each benchmark is one command, prints its
figures and rewrites its own section below; the summary table is rebuilt from the sections. The figures are what was
measured, next to the target, including where the target is missed.

Every benchmark runs the simulator, the runner (`python -m batch_gateway.runner`, as in production) and the API as
separate processes, on embedded storage in a temporary directory, and stops everything it started. The machine has
two cores, shared by the engine simulator, the runner and the load generators; each section says how much CPU other
processes on the machine used while it ran.
"""


def cost_model() -> str:
    """The simulator's default cost model, from SimConfig itself (so the table cannot drift from the code)."""
    from batch_gateway.sim.config import HELP, SimConfig

    defaults = SimConfig()
    rows = [
        {"knob": f"`--{name.replace('_', '-')}`", "default": f"{getattr(defaults, name):g}", "meaning": HELP[name]}
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "step_base_ms",
            "per_seq_ms",
            "context_ms_per_token",
            "prefill_ms_per_token",
            "block_size",
            "kv_blocks",
            "cache_blocks",
        )
    ]
    d = defaults
    step1 = d.step_base_ms + d.per_seq_ms
    step_full = d.step_base_ms + d.per_seq_ms * d.max_num_seqs + d.context_ms_per_token * d.max_num_seqs * 200
    return f"""## The simulator's cost model

The simulator (batch_gateway/sim/engine.py) runs vLLM's V1 scheduling in scaled real time. Each **step** schedules
the running sequences (one decode token each, or the next chunk of a prompt still in prefill, within
`max_num_batched_tokens`), then admits waiting sequences in FIFO order while fewer than `max_num_seqs` run and the KV
cache has room. A step costs `step_base_ms + per_seq_ms × sequences + context_ms_per_token × context tokens read +
prefill_ms_per_token × prompt tokens computed`, times `time_scale`. Past `max_num_seqs`, more requests only queue:
that is the knee. The **prefix cache** lives in the KV cache as 16-token blocks hashed chained (as vLLM's): a prompt's
leading cached blocks are not computed and are reported as `cached_tokens`; blocks become reusable only after the
step that computed them, so two requests with the same prefix admitted in the same step both compute it. A full KV
cache preempts the most recently admitted sequence. Tokens are 4 bytes of UTF-8 text each.

The defaults resemble an 8B model in bf16 on one 80 GB H100-class GPU: a lone sequence gets a {step1:.1f}-ms step
({1000 / step1:.0f} tokens/s); at a full batch of {d.max_num_seqs} with ~200-token contexts a step takes about
{step_full:.0f} ms ({d.max_num_seqs / step_full * 1000:,.0f} output tokens/s before prefill); prefill runs at
{1 / d.prefill_ms_per_token * 1000:,.0f} tokens/s. Note what this means for sharing: a full batch makes every step
{step_full / step1:.1f}× as long as a lone sequence's, so whoever fills the engine slows every other user's tokens.
`time_scale` < 1 runs the same model faster (the benchmarks say which they use, and convert rates back to model time).

{table(rows)}"""


_started: tuple[float, float, float] | None = None


def _own_cpu() -> float:
    """CPU seconds of this process and of every child it has waited for (simulators, runners, servers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _busy_cpu() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def begin() -> None:
    """Start counting the CPU that other processes on the machine use while a benchmark runs."""
    global _started
    _started = (time.monotonic(), _busy_cpu(), _own_cpu())


def background_load() -> float | None:
    """Cores used on average by processes outside this benchmark since `begin()` (None if not begun)."""
    if _started is None:
        return None
    elapsed = time.monotonic() - _started[0]
    other = (_busy_cpu() - _started[1]) - (_own_cpu() - _started[2])
    return max(0.0, other / elapsed) if elapsed > 0 else None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{psutil.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
        f"{platform.python_version()}"
    )


def verdict(good: bool) -> str:
    """How a report states whether a target was met."""
    return "met" if good else "**missed**"


def times(ratio: float, bound: float) -> str:
    """A ratio as `1.29×`, with the decimals it takes to tell it from the `bound` it is judged against: 1.3003 over a
    bound of 1.3 is `1.3003×`, not a `1.30×` that reads as met while the verdict beside it says missed."""
    for digits in (2, 3, 4):
        if round(ratio, digits) != round(bound, digits):
            return f"{ratio:.{digits}f}×"
    return f"{ratio:.4f}×"


def table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(dict.fromkeys(column for row in rows for column in row))  # every column, first seen first
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return "" if value is None else str(value)


_SECTION = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n.*?<!-- /bench:(?P=name) -->\n", re.S)
_SUMMARY = re.compile(r"<!-- summary: (?P<json>.*?) -->")
_NOTES = re.compile(r"<!-- notes -->\n.*?<!-- /notes -->\n", re.S)


def write_section(name: str, title: str, body: str, summary: list[tuple[str, str, str]] | None = None) -> None:
    """Replace (or add) the section `name` of docs/benchmarks.md, print it, and rebuild the summary table.

    `summary`: (what, target, measured) rows for the table at the top of the document.
    """
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = background_load()
    other = f"; other processes on the machine used {load:.2f} cores on average meanwhile" if load is not None else ""
    hidden = f"<!-- summary: {json.dumps(summary or [])} -->\n"
    section = (
        f"<!-- bench:{name} -->\n## {title}\n{hidden}\n_Measured {stamp} on {machine()}{other}._\n\n"
        f"{body.strip()}\n<!-- /bench:{name} -->\n"
    )
    print(section)
    existing = DOC.read_text() if DOC.exists() else ""
    sections = {m.group("name"): m.group(0) for m in _SECTION.finditer(existing)}
    notes = _NOTES.search(existing)  # hand-written findings, kept as they are
    sections[name] = section
    ordered = [sections[n] for n in ORDER if n in sections] + [v for n, v in sections.items() if n not in ORDER]
    rows = []
    for text in ordered:
        found = _SUMMARY.search(text)
        for what, target, measured in json.loads(found.group("json")) if found else []:
            rows.append({"benchmark": what, "target": target, "measured": measured})
    summary_md = "## Summary\n\n" + table(rows) if rows else ""
    DOC.parent.mkdir(exist_ok=True)
    parts = [INTRO, summary_md, notes.group(0) if notes else "", cost_model(), *ordered]
    DOC.write_text(re.sub(r"\n{3,}", "\n\n", "\n".join(parts)))
