"""`resume`: SIGKILL the runner half way through a batch, start another, count the requests sent twice.

Every request the simulator received beyond the batch's line count was re-sent. Two things are unavoidably re-sent
after a SIGKILL: the requests in flight at that moment (no answer arrived) and the answers that arrived after the
last durable checkpoint. Both are measured at the moment of the kill (the simulator's counters and the checkpoint
parts in storage), so the total can be checked against its parts. The final output must hold every custom_id once.
"""

from __future__ import annotations

import asyncio
import signal
import time

import msgspec

from batch_gateway.runner.checkpoint import Checkpoints
from batch_gateway.services import Services
from batch_gateway.sim import SimConfig
from batch_gateway.store.objects import batch_prefix
from benchmarks import report
from benchmarks.harness import LocalStack, SimProcess, stop_process
from benchmarks.workloads import MODEL, batch_line, chunked, words

NAME = "resume"
TITLE = "Resume: requests re-sent after a SIGKILL half way"

REQUESTS = 50_000  # OpenAI's default maximum per batch
SMALL_BATCH = 20_000  # the same re-sends, as a share of a smaller batch
MAX_TOKENS = 16
LEASE_SECONDS = 3
TARGET = 0.01


def lines() -> bytes:
    return b"".join(
        chunked(
            batch_line(
                f"req-{i}",
                {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"{i}: {words(16, i)}"}],
                    "max_tokens": MAX_TOKENS,
                },
            )
            for i in range(REQUESTS)
        )
    )


async def durable_lines(stack: LocalStack, batch_id: str) -> int:
    services = await Services.open(stack.settings)
    try:
        done, _ = await Checkpoints(services.objects, batch_prefix("bench", batch_id), "bench").load(REQUESTS)
        return int(done.sum())
    finally:
        await services.close()


class _Line(msgspec.Struct):
    custom_id: str


def custom_ids(data: bytes) -> list[str]:
    decoder = msgspec.json.Decoder(_Line)
    return [decoder.decode(line).custom_id for line in data.splitlines() if line.strip()]


def run() -> None:
    with SimProcess(SimConfig()) as sim, LocalStack([sim.url], runner_lease_seconds=LEASE_SECONDS) as stack:
        batch_id = asyncio.run(stack.create_batch(lines()))
        base = sim.stats()
        started = time.monotonic()
        first = stack.start_runner(batch_id)
        try:
            while sim.stats()["completed"] - base["completed"] < REQUESTS // 2:
                if first.poll() is not None:
                    raise RuntimeError(f"the first runner exited ({first.returncode}) before half way")
                if time.monotonic() - started > 600:
                    raise TimeoutError("half way not reached in 10 minutes")
                time.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            first.wait()
        finally:
            stop_process(first)
        killed_at = time.monotonic()
        at_kill = sim.stats()
        durable = asyncio.run(durable_lines(stack, batch_id))
        sent = at_kill["requests"] - base["requests"]
        answered = at_kill["completed"] - base["completed"]
        second = stack.start_runner(batch_id)
        try:
            second.wait(900)
        finally:
            stop_process(second)
        resumed_seconds = time.monotonic() - killed_at
        final = sim.stats()
        batch = asyncio.run(stack.batch(batch_id))
        output = custom_ids(asyncio.run(stack.read_file(batch.output_file_id)))
        errors = custom_ids(asyncio.run(stack.read_file(batch.error_file_id)))
    every = output + errors
    exactly_once = len(every) == len(set(every)) == REQUESTS and set(every) == {f"req-{i}" for i in range(REQUESTS)}
    received = final["requests"] - base["requests"]
    resent = received - REQUESTS
    share = resent / batch.request_counts.completed if batch.request_counts.completed else float("nan")
    rows = [
        {"figure": "lines in the batch", "value": f"{REQUESTS:,}"},
        {"figure": "answers the first runner had received when killed", "value": f"{answered:,}"},
        {"figure": "… of which durable (in checkpoint parts)", "value": f"{durable:,}"},
        {"figure": "requests in flight at the kill (sent, not answered)", "value": f"{sent - answered:,}"},
        {
            "figure": "expected re-sends (in flight + answered but not durable)",
            "value": f"{sent - answered + answered - durable:,}",
        },
        {"figure": "requests the simulator received in all", "value": f"{received:,}"},
        {"figure": "**re-sent** (received − lines)", "value": f"**{resent:,}**"},
        {"figure": "re-sent as a share of completed", "value": f"**{share:.2%}**"},
        {
            "figure": f"the same re-sends as a share of a {SMALL_BATCH:,}-line batch",
            "value": f"{resent / SMALL_BATCH:.2%}",
        },
        {
            "figure": "kill → batch completed by the second runner",
            "value": f"{resumed_seconds:.1f} s (lease {LEASE_SECONDS} s)",
        },
        {
            "figure": "final status, completed / failed",
            "value": f"{batch.status}, {batch.request_counts.completed:,} / {batch.request_counts.failed:,}",
        },
        {
            "figure": "every custom_id exactly once in output + error files",
            "value": "yes" if exactly_once else "**NO**",
        },
    ]
    body = f"""
`python -m benchmarks resume`. {REQUESTS:,} short chat requests ({MAX_TOKENS} output tokens) through the real runner
with default settings (checkpoint every {stack.settings.checkpoint_interval:g} s) against the simulator's default cost
model in real time. When the simulator has answered half the lines, the runner gets SIGKILL; a new runner is started at
once, waits out the {LEASE_SECONDS}-s lease and resumes from the checkpoint parts.

{report.table(rows)}
**Target: < {TARGET:.0%} of completed requests re-sent — measured {share:.2%}:
{"met" if share < TARGET else "**missed**"};
every line exactly once: {"yes" if exactly_once else "**no**"}.** What is re-sent is what was in flight plus what was
answered since the last checkpoint, so it does not grow with the batch: about (in flight + rate × checkpoint
interval / 2) requests per crash, here ≈ {sent - answered + answered - durable:,}; as a share it shrinks as batches
grow. The requests in flight are bounded by the engine's capacity (the runner settles at its knee), and cannot be saved:
the engine drops their work when the connection closes.
"""
    report.write_section(
        NAME,
        TITLE,
        body,
        [
            (
                "requests re-sent after a SIGKILL half way",
                f"< {TARGET:.0%} of completed",
                f"{share:.2%}: {'met' if share < TARGET else '**missed**'}",
            ),
            ("every line exactly once after the crash", "yes", "yes" if exactly_once else "**no**"),
        ],
    )
