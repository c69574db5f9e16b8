"""The client commands: `submit`, `batches list|get|cancel|watch`, `files list|download|delete`.

They use the `openai` SDK and nothing else from the server, so they work against OpenAI itself as well as against
batch-gateway. Human text by default; `--json` prints the API's objects for scripts. Progress, status changes and
hints go to stderr; ids, tables, summaries and JSON go to stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai

from batch_gateway.client.output import (
    DEFAULT_BASE_URL,
    CommandError,
    as_json,
    err,
    file_id_or_none,
    format_bytes,
    format_time,
    print_json,
    render_table,
)
from batch_gateway.client.watch import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    WaitOptions,
    download,
    format_batch_error,
    snapshot,
    wait_and_download,
)

# The SDK refuses to start without a key; a gateway started with `--auth open` accepts any token.
PLACEHOLDER_API_KEY = "no-key"


# --- plumbing ------------------------------------------------------------------------------------


def resolve_base_url(args: argparse.Namespace) -> str:
    return args.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL


def make_client(args: argparse.Namespace) -> openai.OpenAI:
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_API_KEY
    return openai.OpenAI(base_url=resolve_base_url(args), api_key=api_key)


def command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the errors a user can meet into a one-line message on stderr and exit code 1."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CommandError as exc:
            err(f"error: {exc}")
        except openai.AuthenticationError as exc:
            err(
                f"error: the server refused the API key (401): {api_message(exc)}. Pass --api-key or set "
                "OPENAI_API_KEY."
            )
        except openai.APIStatusError as exc:
            err(f"error: {exc.status_code} {api_message(exc)}")
        except openai.APIConnectionError as exc:
            base_url = resolve_base_url(args)
            hint = (
                " Is the gateway running (`batch-gateway serve`)? Or pass --base-url."
                if base_url == DEFAULT_BASE_URL
                else ""
            )
            err(f"error: cannot reach {base_url}: {exc.message}{hint}")
        except OSError as exc:
            err(f"error: {exc}")
        except KeyboardInterrupt:
            err("\ninterrupted")
            return EXIT_INTERRUPTED
        return EXIT_ERROR

    return run


def api_message(exc: openai.APIStatusError) -> str:
    """The `message` of OpenAI's error envelope (the SDK has already unwrapped `{"error": ...}`)."""
    if isinstance(exc.body, dict) and exc.body.get("message"):
        return str(exc.body["message"])
    return exc.message


# --- submit --------------------------------------------------------------------------------------


def parse_metadata(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    metadata: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandError(f"--metadata {item!r}: expected KEY=VALUE")
        metadata[key] = value
    return metadata


def guess_endpoint(path: Path) -> str | None:
    """The `url` of the input's first request line, so `--endpoint` can be left out when it is obvious."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    return None
                return url if isinstance(url, str) and url.startswith("/v1/") else None
    return None


def count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as f:
        for raw in f:
            count += bool(raw.strip())
    return count


def default_result_paths(input_path: Path) -> tuple[Path, Path]:
    """`data/in.jsonl` -> `data/in.output.jsonl`, `data/in.errors.jsonl`."""
    stem = input_path.name.removesuffix(".jsonl") if input_path.name.endswith(".jsonl") else input_path.stem
    return input_path.with_name(f"{stem}.output.jsonl"), input_path.with_name(f"{stem}.errors.jsonl")


@command
def submit(args: argparse.Namespace) -> int:
    path = Path(args.input)
    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    requests = count_lines(path)
    if requests == 0:
        raise CommandError(f"{path}: the file has no request lines")
    endpoint = args.endpoint or guess_endpoint(path) or "/v1/chat/completions"
    metadata = parse_metadata(args.metadata)
    output, errors = default_result_paths(path)
    options = WaitOptions.from_args(args, default_output=output, default_errors=errors)
    client = make_client(args)

    err(f"Uploading {path} ({requests} requests, {format_bytes(path.stat().st_size)}) to {resolve_base_url(args)}")
    with path.open("rb") as f:
        uploaded = client.files.create(file=(path.name, f), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=endpoint,  # type: ignore[arg-type]  # a Literal in the SDK; the server judges it
        completion_window=args.completion_window,
        metadata=metadata,
    )
    if not args.wait:
        if args.json:
            print_json(as_json(batch))
        else:
            print(batch.id)
            err(f"Created batch {batch.id} ({endpoint}). Watch it with: batch-gateway batches watch {batch.id}")
        return EXIT_OK
    if not args.json:
        print(batch.id, flush=True)
    return wait_and_download(client, batch, options, base_url_flag=args.base_url)


# --- batches -------------------------------------------------------------------------------------


@command
def batches_list(args: argparse.Namespace) -> int:
    client = make_client(args)
    query: dict[str, Any] = {"limit": args.limit}
    if args.after:
        query["after"] = args.after
    page = client.batches.list(**query)
    if args.json:
        print_json(as_json(page))
        return EXIT_OK
    rows = [
        (b.id, b.status, format_time(b.created_at), *_counts(b), b.endpoint, _metadata_text(b.metadata))
        for b in page.data
    ]
    print(render_table(("ID", "STATUS", "CREATED", "DONE", "FAILED", "TOTAL", "ENDPOINT", "METADATA"), rows))
    if page.has_more and page.data:
        err(f"more: batch-gateway batches list --after {page.data[-1].id}")
    return EXIT_OK


def _counts(batch: Any) -> tuple[int, int, int]:
    snap = snapshot(batch)
    return snap.done, snap.failed, snap.total


def _metadata_text(metadata: dict[str, str] | None) -> str | None:
    return ",".join(f"{k}={v}" for k, v in metadata.items()) if metadata else None


@command
def batches_get(args: argparse.Namespace) -> int:
    batch = make_client(args).batches.retrieve(args.batch_id)
    if args.json:
        print_json(as_json(batch))
    else:
        print(describe_batch(batch))
    return EXIT_OK


def describe_batch(batch: Any) -> str:
    snap = snapshot(batch)
    rows: list[tuple[str, object]] = [
        ("id", batch.id),
        ("status", batch.status),
        ("endpoint", batch.endpoint),
        ("model", getattr(batch, "model", None)),
        ("requests", f"{snap.total} total, {snap.completed} completed, {snap.failed} failed"),
        ("input_file_id", batch.input_file_id),
        ("output_file_id", file_id_or_none(batch.output_file_id)),
        ("error_file_id", file_id_or_none(batch.error_file_id)),
    ]
    for stamp in (
        "created_at",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
        "expires_at",
    ):
        value = getattr(batch, stamp, None)
        if value is not None:
            rows.append((stamp, format_time(value)))
    usage = getattr(batch, "usage", None)
    if usage is not None:
        rows.append(
            ("usage", f"{usage.input_tokens} input, {usage.output_tokens} output, {usage.total_tokens} total tokens")
        )
    rows.append(("metadata", _metadata_text(batch.metadata)))
    width = max(len(name) for name, _ in rows)
    text = "\n".join(f"{name:<{width}}  {'-' if value is None else value}" for name, value in rows)
    if batch.errors and batch.errors.data:
        text += "\nerrors:\n" + "\n".join("  " + format_batch_error(e) for e in batch.errors.data)
    return text


@command
def batches_cancel(args: argparse.Namespace) -> int:
    batch = make_client(args).batches.cancel(args.batch_id)
    if args.json:
        print_json(as_json(batch))
    else:
        print(f"{batch.id}  {batch.status}")
    return EXIT_OK


@command
def batches_watch(args: argparse.Namespace) -> int:
    client = make_client(args)
    batch = client.batches.retrieve(args.batch_id)
    options = WaitOptions.from_args(
        args, default_output=Path(f"{batch.id}.output.jsonl"), default_errors=Path(f"{batch.id}.errors.jsonl")
    )
    return wait_and_download(client, batch, options, base_url_flag=args.base_url)


# --- files ---------------------------------------------------------------------------------------


@command
def files_list(args: argparse.Namespace) -> int:
    client = make_client(args)
    query: dict[str, Any] = {"limit": args.limit}
    if args.purpose:
        query["purpose"] = args.purpose
    if args.after:
        query["after"] = args.after
    page = client.files.list(**query)
    if args.json:
        print_json(as_json(page))
        return EXIT_OK
    rows = [
        (
            f.id,
            f.purpose,
            format_bytes(f.bytes),
            format_time(f.created_at),
            format_time(getattr(f, "expires_at", None)),
            f.filename,
        )
        for f in page.data
    ]
    print(render_table(("ID", "PURPOSE", "SIZE", "CREATED", "EXPIRES", "FILENAME"), rows))
    if getattr(page, "has_more", False) and page.data:
        err(f"more: batch-gateway files list --after {page.data[-1].id}")
    return EXIT_OK


@command
def files_download(args: argparse.Namespace) -> int:
    client = make_client(args)
    if args.output == "-":
        with client.files.with_streaming_response.content(args.file_id) as response:
            for chunk in response.iter_bytes():
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return EXIT_OK
    if args.output:
        path = Path(args.output)
    else:
        # The file's own name, without any directory part a server might have put in it.
        name = Path(client.files.retrieve(args.file_id).filename or "").name
        path = Path(name or f"{args.file_id}.jsonl")
    lines = download(client, args.file_id, path)
    err(f"{args.file_id} -> {path} ({lines} lines)")
    return EXIT_OK


@command
def files_delete(args: argparse.Namespace) -> int:
    deleted = make_client(args).files.delete(args.file_id)
    if args.json:
        print_json(as_json(deleted))
    else:
        print(f"{deleted.id}  {'deleted' if deleted.deleted else 'not deleted'}")
    return EXIT_OK
