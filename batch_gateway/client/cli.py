"""Argument parsing for the client commands (`submit`, `batches ...`, `files ...`).

`register(subparsers)` adds them to the main `batch-gateway` parser; each parsed command carries its function in
`args.client_command`. `main(argv)` runs them on their own (`python -m batch_gateway.client`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from textwrap import fill

from batch_gateway.client.output import DEFAULT_BASE_URL, EXIT_CODES_HELP


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The client command `name`, imported only when it runs: the openai SDK it needs is heavy (~40 MB), and the
    server and the runner parse their arguments with this same parser."""

    def run(args: argparse.Namespace) -> int:
        from batch_gateway.client import commands

        return getattr(commands, name)(args)

    return run


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--base-url",
        default=None,
        help=f"API base URL [env OPENAI_BASE_URL; default {DEFAULT_BASE_URL}, a local `batch-gateway serve`]. "
        "Use https://api.openai.com/v1 to talk to OpenAI itself.",
    )
    common.add_argument(
        "--api-key",
        default=None,
        help="API key [env OPENAI_API_KEY; without one a placeholder is sent, which a gateway without API keys "
        "accepts].",
    )
    common.add_argument("--json", action="store_true", help="Print the API's objects as JSON (for scripts).")
    return common


def _wait_options() -> argparse.ArgumentParser:
    wait = argparse.ArgumentParser(add_help=False)
    wait.add_argument("--output", metavar="PATH", help="Where to save the output file (the successful results).")
    wait.add_argument("--errors", metavar="PATH", help="Where to save the error file (the failed requests).")
    wait.add_argument(
        "--partial",
        metavar="PATH",
        help="While waiting, append results to PATH as they finish (batch-gateway's partial results extension; "
        "ignored with a notice when the server does not offer it).",
    )
    wait.add_argument(
        "--interval", type=float, default=2.0, metavar="SECONDS", help="Seconds between polls (default 2)."
    )
    return wait


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `submit`, `batches` and `files` to the main parser's subcommands."""
    common = _connection_options()
    wait = _wait_options()
    raw = argparse.RawDescriptionHelpFormatter

    submit = subparsers.add_parser(
        "submit",
        parents=[common, wait],
        formatter_class=raw,
        help="Upload a JSONL file and create a batch from it; with --wait, watch it and download the results.",
        description=fill(
            "Upload INPUT (purpose=batch), create a batch from it and print the batch id. With --wait, show its "
            "progress on stderr until it ends, then download the output and error files (by default next to INPUT, "
            "as INPUT.output.jsonl and INPUT.errors.jsonl) and print a summary. Ctrl-C stops watching and leaves "
            "the batch running.",
            100,
        ),
        epilog=EXIT_CODES_HELP,
    )
    submit.add_argument("input", metavar="INPUT", help="The batch input file (JSONL, one request per line).")
    submit.add_argument(
        "--endpoint",
        help="The batch's endpoint, such as /v1/chat/completions or /v1/embeddings "
        "(default: the `url` of the first line, else /v1/chat/completions).",
    )
    submit.add_argument(
        "--metadata", action="append", metavar="KEY=VALUE", help="Metadata to attach to the batch (repeatable)."
    )
    submit.add_argument("--completion-window", default="24h", help="The batch's completion window (default 24h).")
    submit.add_argument("--wait", action="store_true", help="Watch the batch until it ends, then download its results.")
    submit.set_defaults(client_command=_command("submit"))

    batches = subparsers.add_parser("batches", help="List, inspect, cancel or watch batches.")
    actions = batches.add_subparsers(dest="batches_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="List batches, newest first.")
    listing.add_argument("--limit", type=int, default=20, help="How many batches (default 20).")
    listing.add_argument("--after", metavar="BATCH_ID", help="Start after this batch (the next page).")
    listing.set_defaults(client_command=_command("batches_list"))
    get = actions.add_parser("get", parents=[common], help="Show one batch.")
    get.add_argument("batch_id")
    get.set_defaults(client_command=_command("batches_get"))
    cancel = actions.add_parser("cancel", parents=[common], help="Cancel a batch (finished results are kept).")
    cancel.add_argument("batch_id")
    cancel.set_defaults(client_command=_command("batches_cancel"))
    watch = actions.add_parser(
        "watch",
        parents=[common, wait],
        formatter_class=raw,
        help="Show a batch's progress until it ends, then download its results.",
        description=fill(
            "Show the batch's progress on stderr until it ends, then download its output and error files (by "
            "default BATCH_ID.output.jsonl and BATCH_ID.errors.jsonl in the current directory) and print a summary.",
            100,
        ),
        epilog=EXIT_CODES_HELP,
    )
    watch.add_argument("batch_id")
    watch.set_defaults(client_command=_command("batches_watch"))

    files = subparsers.add_parser("files", help="List, download or delete files.")
    file_actions = files.add_subparsers(dest="files_command", required=True, metavar="ACTION")
    flist = file_actions.add_parser("list", parents=[common], help="List files, newest first.")
    flist.add_argument("--purpose", help="Only files with this purpose (batch, batch_output, ...).")
    flist.add_argument("--limit", type=int, default=100, help="How many files (default 100).")
    flist.add_argument("--after", metavar="FILE_ID", help="Start after this file (the next page).")
    flist.set_defaults(client_command=_command("files_list"))
    fdownload = file_actions.add_parser("download", parents=[common], help="Download a file's content.")
    fdownload.add_argument("file_id")
    fdownload.add_argument(
        "-o", "--output", metavar="PATH", help="Where to save it; - for stdout (default: the file's own name)."
    )
    fdownload.set_defaults(client_command=_command("files_download"))
    fdelete = file_actions.add_parser("delete", parents=[common], help="Delete a file.")
    fdelete.add_argument("file_id")
    fdelete.set_defaults(client_command=_command("files_delete"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch-gateway", description="Submit and manage batches with the openai SDK.")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.client_command(args)


if __name__ == "__main__":
    sys.exit(main())
