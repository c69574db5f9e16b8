"""`batch-gateway sim`: serve the simulator until Ctrl-C. Every SimConfig knob is a flag."""

from __future__ import annotations

import argparse

import msgspec
import uvicorn

from batch_gateway.sim.engine import SimConfig
from batch_gateway.sim.server import create_sim_app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--model", dest="models", action="append", help="Model name to serve (repeatable; default sim-model).")
    defaults = SimConfig()
    for name in SimConfig.__struct_fields__:
        if name == "models":
            continue
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=type(value), default=value, help=f"default {value}")


def config_from_args(args: argparse.Namespace) -> SimConfig:
    values = {name: getattr(args, name) for name in SimConfig.__struct_fields__ if name != "models"}
    if args.models:
        values["models"] = args.models
    return msgspec.convert(values, SimConfig)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print(f"vLLM simulator on http://{args.host}:{args.port} serving {', '.join(config.models)}", flush=True)
    uvicorn.run(create_sim_app(config), host=args.host, port=args.port, log_level="warning", lifespan="on")
    return 0
