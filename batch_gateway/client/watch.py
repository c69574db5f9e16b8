"""Waiting for a batch: live progress until it ends, partial results on the way, then its files and a summary.

Ctrl-C stops the watching, never the batch, and prints the command that resumes it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from batch_gateway.client.output import CommandError, as_json, err, file_id_or_none, print_json
from batch_gateway.client.partial import PartialResults
from batch_gateway.client.progress import ProgressDisplay, Snapshot, format_duration
from batch_gateway.wire import TERMINAL_STATUSES, BatchStatus

EXIT_OK = 0
EXIT_ERROR = 1  # the command could not do its job (server error, unreachable server, bad file, ...)
EXIT_FAILED = 3
EXIT_EXPIRED = 4
EXIT_CANCELLED = 5
EXIT_INTERRUPTED = 130  # Ctrl-C while waiting; the batch keeps running on the server
STATUS_EXIT_CODES = {
    BatchStatus.COMPLETED: EXIT_OK,
    BatchStatus.FAILED: EXIT_FAILED,
    BatchStatus.EXPIRED: EXIT_EXPIRED,
    BatchStatus.CANCELLED: EXIT_CANCELLED,
}


@dataclass(frozen=True)
class WaitOptions:
    output: Path
    errors: Path
    partial: Path | None
    interval: float
    json: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, default_output: Path, default_errors: Path) -> WaitOptions:
        if args.interval <= 0:
            raise CommandError("--interval must be more than 0 seconds")
        return cls(
            output=Path(args.output) if args.output else default_output,
            errors=Path(args.errors) if args.errors else default_errors,
            partial=Path(args.partial) if args.partial else None,
            interval=args.interval,
            json=args.json,
        )


def resume_command(batch_id: str, options: WaitOptions, base_url_flag: str | None) -> str:
    """The `batches watch` command line that carries on where this wait stopped (never with the API key)."""
    argv = [
        "batch-gateway",
        "batches",
        "watch",
        batch_id,
        "--output",
        str(options.output),
        "--errors",
        str(options.errors),
    ]
    if options.partial:
        argv += ["--partial", str(options.partial)]
    if base_url_flag:
        argv += ["--base-url", base_url_flag]
    return shlex.join(argv)


def snapshot(batch: Any) -> Snapshot:
    counts = batch.request_counts
    if counts is None:
        return Snapshot(batch.status, 0, 0, 0)
    return Snapshot(batch.status, counts.total or 0, counts.completed or 0, counts.failed or 0)


def wait_and_download(client: openai.OpenAI, batch: Any, options: WaitOptions, *, base_url_flag: str | None) -> int:
    """Show progress until the batch ends, then download its files and print a summary; returns the exit code."""
    display = ProgressDisplay()
    partial = PartialResults(options.partial) if options.partial else None
    try:
        while True:
            display.update(snapshot(batch))
            if batch.status in TERMINAL_STATUSES:
                break
            if partial is not None and partial.supported and batch.status == BatchStatus.IN_PROGRESS:
                poll_partial(client, batch.id, partial, display)
            time.sleep(options.interval)
            batch = client.batches.retrieve(batch.id)
    except KeyboardInterrupt:
        display.clear()
        err(
            f"\nStopped watching. Batch {batch.id} keeps running on the server.\n"
            f"  resume watching: {resume_command(batch.id, options, base_url_flag)}\n"
            f"  cancel it:       batch-gateway batches cancel {batch.id}"
        )
        return EXIT_INTERRUPTED
    display.clear()

    try:
        output_lines = download(client, file_id_or_none(batch.output_file_id), options.output)
        error_lines = download(client, file_id_or_none(batch.error_file_id), options.errors)
    except KeyboardInterrupt:
        err(f"\nDownload interrupted; run `{resume_command(batch.id, options, base_url_flag)}` to download again.")
        return EXIT_INTERRUPTED
    if options.json:
        print_json(as_json(batch))
    else:
        print(summary(batch, options, output_lines, error_lines, partial))
    return STATUS_EXIT_CODES.get(batch.status, EXIT_ERROR)


def poll_partial(client: openai.OpenAI, batch_id: str, partial: PartialResults, display: ProgressDisplay) -> None:
    try:
        added = partial.poll(client, batch_id)
    except openai.NotFoundError:
        # 404 also answers a batch that just left in_progress; only a batch still running means "no extension".
        if client.batches.retrieve(batch_id).status == BatchStatus.IN_PROGRESS.value:
            partial.supported = False
            display.line(
                f"The server does not offer partial results (GET /v1/batches/{batch_id}/partial_results answered "
                "404); the results will be downloaded when the batch ends."
            )
        return
    except openai.APIError as exc:
        display.line(f"partial results: {exc}; will retry")
        return
    if added and partial.written == added:  # say it once; the summary gives the total
        display.line(f"partial results: writing finished requests to {partial.path} as they arrive")


def download(client: openai.OpenAI, file_id: str | None, path: Path) -> int | None:
    """Stream a file's content to `path` (through a temporary file, so a broken download leaves no half file);
    returns its line count, or None when there is no such file."""
    if file_id is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_name(path.name + ".part")
    lines, last = 0, b"\n"
    try:
        with client.files.with_streaming_response.content(file_id) as response, partial_path.open("wb") as out:
            for chunk in response.iter_bytes():
                if chunk:
                    out.write(chunk)
                    lines += chunk.count(b"\n")
                    last = chunk[-1:]
        os.replace(partial_path, path)
    except BaseException:
        partial_path.unlink(missing_ok=True)
        raise
    return lines + (last != b"\n")  # a last line without its newline still counts


def summary(
    batch: Any, options: WaitOptions, output_lines: int | None, error_lines: int | None, partial: PartialResults | None
) -> str:
    snap = snapshot(batch)
    ended_at = batch.completed_at or batch.failed_at or batch.expired_at or batch.cancelled_at
    took = f" in {format_duration(ended_at - batch.created_at)}" if ended_at else ""
    counts = f": {snap.total} requests, {snap.completed} completed, {snap.failed} failed" if snap.total else ""
    lines = [f"Batch {batch.id} {batch.status}{took}{counts}."]
    if batch.status == BatchStatus.FAILED:
        lines.append("The input file did not validate:" if batch.errors and batch.errors.data else "The batch failed.")
        lines += ["  " + format_batch_error(e) for e in (batch.errors.data if batch.errors else None) or []]
    elif batch.status in (BatchStatus.EXPIRED, BatchStatus.CANCELLED):
        how = "It expired" if batch.status == BatchStatus.EXPIRED else "It was cancelled"
        lines.append(f"{how} before every request ran; the files below hold the part that finished.")
    usage = getattr(batch, "usage", None)
    if usage is not None and usage.total_tokens:
        cached = usage.input_tokens_details.cached_tokens if usage.input_tokens_details else 0
        lines.append(
            f"  usage:  {usage.input_tokens} input tokens ({cached} cached), {usage.output_tokens} output tokens"
        )
    if output_lines is not None:
        lines.append(f"  output: {options.output} ({output_lines} lines)")
    elif batch.status != BatchStatus.FAILED:
        lines.append("  output: none (no request succeeded)")
    if error_lines is not None:
        lines.append(f"  errors: {options.errors} ({error_lines} lines)")
    if partial is not None and partial.written:
        lines.append(f"  partial results: {partial.path} ({partial.written} lines written while running)")
    return "\n".join(lines)


def format_batch_error(error: Any) -> str:
    """`line 3: invalid_json: Line 3 is not valid JSON. (param body.model)`"""
    where = f"line {error.line}: " if error.line is not None else ""
    param = f" (param {error.param})" if error.param else ""
    return f"{where}{error.code or 'error'}: {error.message}{param}"
