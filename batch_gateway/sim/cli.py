"""`batch-gateway sim`: serve the simulator until Ctrl-C. Every SimConfig knob is a flag."""

from __future__ import annotations

import argparse
import contextlib
import sys

import msgspec

from batch_gateway.sim.config import HELP, SCHEDULING_POLICIES, SimConfig

CHOICES = {"scheduling_policy": SCHEDULING_POLICIES}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8100, help="Port to listen on (default 8100).")
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help="Model name to serve, each with its own engine (repeatable; default sim-model).",
    )
    defaults = SimConfig()
    for name in SimConfig.__struct_fields__:
        if name == "models":
            continue
        value = getattr(defaults, name)
        if isinstance(value, bool):
            parser.add_argument(
                "--" + name.replace("_", "-"),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=value,
                help=f"{HELP[name]} (default {'on' if value else 'off'})",
            )
            continue
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=type(value),
            default=value,
            choices=CHOICES.get(name),
            metavar=None if name in CHOICES else type(value).__name__.upper(),
            help=f"{HELP[name]} (default {value})",
        )


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Raises ValueError with every problem named when a value is out of range."""
    values = {name: getattr(args, name) for name in SimConfig.__struct_fields__ if name != "models"}
    if args.models:
        values["models"] = args.models
    try:
        return msgspec.convert(values, SimConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    # Imported here: every `batch-gateway` command builds this parser, and only `sim` needs the server.
    import uvicorn

    from batch_gateway.sim.server import create_sim_app, uvicorn_config

    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"batch-gateway sim: {exc}", file=sys.stderr)
        return 2
    print(
        f"vLLM simulator on http://{args.host}:{args.port} serving {', '.join(config.models)} "
        f"(max-num-seqs {config.max_num_seqs}, time-scale {config.time_scale}); Ctrl-C to stop",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn_config(create_sim_app(config), host=args.host, port=args.port, log_level="warning"))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how this command is meant to end
        server.run()  # shuts down gracefully on SIGINT/SIGTERM, then raises the signal again
    return 0 if server.started else 1
