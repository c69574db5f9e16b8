"""The peer's baseline: a batch client that does what llm-d's Batch Gateway does for concurrency, for the tables.

llm-d's batch gateway limits the requests it has in flight per endpoint with AIMD on hard backpressure only: it starts
at 10, halves on a 429 or a 5xx (down to 5), and adds one per 10 successes (up to 10). It reads nothing from the
engine, so on an engine that never answers 429 it is a fixed concurrency of 10. This is that client, nothing more: a
closed loop over the bodies of a batch input file (the same JSONL the runner reads), cycling through them, with that
limit. It runs as a process of its own (`python -m benchmarks.peer`), as the runner does, and writes every answer
(monotonic send time, latency, status, output tokens) and every change of its limit to a JSON file when it stops
(after `--duration`, or on SIGTERM). Not part of the product: a yardstick.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

import msgspec

from benchmarks.rawhttp import RawPool

START, MINIMUM, MAXIMUM = 10, 5, 10
SUCCESSES_PER_STEP = 10


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Completion(msgspec.Struct):
    usage: _Usage = msgspec.field(default_factory=_Usage)


class _Line(msgspec.Struct):
    body: msgspec.Raw
    url: str = "/v1/chat/completions"


class PeerReport(msgspec.Struct):
    samples: list[tuple[float, float, int, int]]  # (sent at, latency, status, output tokens)
    limits: list[tuple[float, int]]  # (when, new limit)
    errors: int  # no answer at all (connection failures)


class Aimd:
    """The limit: additive increase per SUCCESSES_PER_STEP successes, halved on 429/5xx, within MINIMUM..MAXIMUM."""

    def __init__(self) -> None:
        self.limit = START
        self._successes = 0
        self.changes: list[tuple[float, int]] = [(time.monotonic(), START)]

    def on_answer(self, status: int) -> None:
        if status == 429 or status >= 500:
            self._successes = 0
            self._set(max(MINIMUM, self.limit // 2))
        elif status == 200:
            self._successes += 1
            if self._successes >= SUCCESSES_PER_STEP:
                self._successes = 0
                self._set(min(MAXIMUM, self.limit + 1))

    def _set(self, limit: int) -> None:
        if limit != self.limit:
            self.limit = limit
            self.changes.append((time.monotonic(), limit))


async def run(url: str, lines: list[_Line], duration: float) -> PeerReport:
    pool = RawPool(url)
    aimd = Aimd()
    samples: list[tuple[float, float, int, int]] = []
    errors = 0
    stopped = False
    wake = asyncio.Event()  # an answer came, or it is time to stop

    def stop() -> None:
        nonlocal stopped
        stopped = True
        wake.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.call_later(duration, stop)
    decode = msgspec.json.Decoder(_Completion).decode
    inflight: set[asyncio.Task] = set()
    active = 0  # requests out (the tasks' set only forgets a task a moment after it ended)

    async def send(line: _Line) -> None:
        nonlocal errors, active
        started = time.monotonic()
        try:
            status, payload = await pool.request("POST", line.url, bytes(line.body))
        except (OSError, asyncio.IncompleteReadError):
            errors += 1
        else:
            tokens = decode(payload).usage.completion_tokens if status == 200 else 0
            samples.append((started, time.monotonic() - started, status, tokens))
            aimd.on_answer(status)
        active -= 1
        wake.set()

    i = 0
    while not stopped:
        while active < aimd.limit:
            active += 1
            task = asyncio.create_task(send(lines[i % len(lines)]))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            i += 1
        await wake.wait()
        wake.clear()
    for task in list(inflight):
        task.cancel()
    await asyncio.gather(*inflight, return_exceptions=True)
    pool.close()
    return PeerReport(samples, aimd.changes, errors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the engine's base URL")
    parser.add_argument("--input", required=True, help="a batch input file (JSONL); its bodies are sent in turn")
    parser.add_argument("--duration", type=float, required=True, help="seconds to run (SIGTERM stops it sooner)")
    parser.add_argument("--out", required=True, help="where to write the report (JSON)")
    args = parser.parse_args(argv)
    decoder = msgspec.json.Decoder(_Line)
    with open(args.input, "rb") as f:
        lines = [decoder.decode(line) for line in f if line.strip()]
    report = asyncio.run(run(args.url, lines, args.duration))
    with open(args.out, "wb") as f:
        f.write(msgspec.json.encode(report))


if __name__ == "__main__":
    main()
