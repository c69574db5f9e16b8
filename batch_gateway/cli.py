"""The `batch-gateway` command: the server, the runner, gc, key management and the simulator.

Every server flag also reads `BATCH_GATEWAY_<NAME>` from the environment (see `--help` or docs/configuration.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING, NoReturn

import structlog

from batch_gateway import logs
from batch_gateway import settings as settings_mod
from batch_gateway.settings import Settings

if TYPE_CHECKING:
    from batch_gateway.store.metadata import TenantPolicy

STORAGE_FLAGS = ("data_dir", "database_url", "object_store", "valkey_url", "log_format", "log_level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch-gateway", description="Self-hosted OpenAI-compatible Batch API for your own models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="Run the API server (and, locally, the batch runners and gc).")
    settings_mod.add_arguments(serve)

    runner = sub.add_parser("runner", help="Run (or resume) one batch to a terminal status, then exit.")
    runner.add_argument("--batch-id", required=True)
    runner.add_argument(
        "--give-up",
        metavar="REASON",
        help="Do not run the batch: end it failed with REASON (cancelled, if its tenant cancelled it), publishing the "
        "results its runners left in checkpoints (what an executor does after repeated crashes).",
    )
    settings_mod.add_arguments(runner)

    reconcile = sub.add_parser(
        "reconcile", help="After a batch's runner ended: resume or fail the batch if it is not terminal (exit handler)."
    )
    reconcile.add_argument("--batch-id", required=True)
    settings_mod.add_arguments(reconcile)

    gc = sub.add_parser(
        "gc", help="One garbage-collection pass: expire overdue batches, delete expired files, then exit."
    )
    settings_mod.add_arguments(gc)

    migrate = sub.add_parser("migrate", help="Apply pending database migrations and exit.")
    settings_mod.add_arguments(migrate, STORAGE_FLAGS)

    keys = sub.add_parser("keys", help="Manage API keys (each key belongs to one tenant).")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="Create a key for a tenant; prints the key (only this once).")
    create.add_argument("--tenant", required=True)
    _add_policy_arguments(create)
    settings_mod.add_arguments(create, STORAGE_FLAGS)
    tenant = keys_sub.add_parser(
        "tenant",
        help="Show or set a tenant's admission policy: its weight against other tenants (its share of the runner "
        "slots and of an engine) and its cap on running batches.",
    )
    tenant.add_argument("name")
    _add_policy_arguments(tenant)
    settings_mod.add_arguments(tenant, STORAGE_FLAGS)
    listing = keys_sub.add_parser("list", help="List keys (id, tenant, prefix, created, revoked, weight, cap).")
    settings_mod.add_arguments(listing, STORAGE_FLAGS)
    revoke = keys_sub.add_parser("revoke", help="Revoke a key by its id (from `keys list`).")
    revoke.add_argument("key_id")
    settings_mod.add_arguments(revoke, STORAGE_FLAGS)

    sim = sub.add_parser("sim", help="Run the vLLM simulator (an OpenAI-compatible stand-in for a GPU server).")
    from batch_gateway.sim.cli import add_arguments as add_sim_arguments

    add_sim_arguments(sim)

    sub.add_parser("config-reference", help="Print the configuration reference (Markdown).")

    from batch_gateway.client.cli import register as register_client

    register_client(sub)  # submit, batches, files: the user-facing client built on the openai SDK
    return parser


def _add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--weight", type=float, help="The tenant's weight against other tenants' (default 1): its fair share."
    )
    parser.add_argument(
        "--max-running", type=int, help="Most of the tenant's batches running at once; 0 removes the cap."
    )


def _policy_from(args: argparse.Namespace, current: TenantPolicy) -> TenantPolicy | None:
    """The tenant policy `args` ask for, from `current`; None if they change nothing. Raises ValueError."""
    from batch_gateway.store.metadata import TenantPolicy

    if args.weight is None and args.max_running is None:
        return None
    weight = current.weight if args.weight is None else args.weight
    if not weight > 0:
        raise ValueError(f"--weight must be above 0, got {args.weight}")
    cap = current.max_running if args.max_running is None else (args.max_running or None)
    if cap is not None and cap < 0:
        raise ValueError(f"--max-running must be 0 (no cap) or more, got {args.max_running}")
    return TenantPolicy(weight=weight, max_running=cap)


def entry(argv: list[str] | None = None) -> NoReturn:
    """The `batch-gateway` script and `python -m batch_gateway[.runner]`: `main`, then exit with its code."""
    exit_without_finalizing(main(argv))


def exit_without_finalizing(code: int) -> NoReturn:
    """Exit with `code` without tearing the interpreter down.

    obstore does its I/O on tokio threads that take the GIL to hand results back, some of them just after the
    awaited call has returned. On Python before 3.14 a thread that takes the GIL while the interpreter finalizes is
    ended with pthread_exit, which Rust turns into an abort: a runner that had finished its batch then exits with
    SIGABRT (-6) instead of its code, and its executor takes a finished run for a crash. Every command has closed what
    it opened before `main` returns, so only the log streams are left to flush.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or file: nothing more can reach it
            stream.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "client_command", None):
        return args.client_command(args)
    if args.command == "sim":
        from batch_gateway.sim.cli import run as run_sim

        return run_sim(args)
    if args.command == "config-reference":
        sys.stdout.write(settings_mod.reference_markdown())
        return 0
    try:
        settings = settings_mod.from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logs.configure(settings.log_format, settings.log_level)
    command = {
        "serve": _serve,
        "runner": _runner,
        "reconcile": _reconcile,
        "gc": _gc,
        "migrate": _migrate,
        "keys": _keys,
    }[args.command]
    try:
        return asyncio.run(command(settings, args))
    except KeyboardInterrupt:
        return 130


# --- commands ------------------------------------------------------------------------------------


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from batch_gateway.server import serve

    return await serve(settings)


async def _runner(settings: Settings, args: argparse.Namespace) -> int:
    from batch_gateway.runner.process import run_batch

    return await run_batch(settings, args.batch_id, give_up=args.give_up)


async def _reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from batch_gateway.runner.exit_handler import reconcile_batch

    return await reconcile_batch(settings, args.batch_id)


async def _gc(settings: Settings, args: argparse.Namespace) -> int:
    from batch_gateway.executor import build_executor
    from batch_gateway.gc.collector import collect
    from batch_gateway.services import Services

    services = await Services.open(settings)
    executor = build_executor(settings, services.metadata)
    await executor.start()
    try:
        await collect(services, executor)
    finally:
        await executor.stop()
        await services.close()
    return 0


async def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from batch_gateway.services import open_metadata_store

    store = open_metadata_store(settings)
    await store.open()  # open() applies pending migrations
    await store.close()
    structlog.get_logger("migrate").info("migrate.done")
    return 0


async def _keys(settings: Settings, args: argparse.Namespace) -> int:
    from batch_gateway import ids, keys
    from batch_gateway.admission import DEFAULT_POLICY
    from batch_gateway.services import open_metadata_store

    store = open_metadata_store(settings)
    await store.open()
    try:
        if args.keys_command in ("create", "tenant"):
            tenant = args.tenant if args.keys_command == "create" else args.name
            current = (await store.tenant_policies()).get(tenant, DEFAULT_POLICY)
            try:
                policy = _policy_from(args, current)
            except ValueError as exc:
                print(exc, file=sys.stderr)
                return 2
            if policy is not None:
                await store.set_tenant_policy(tenant, policy)
                current = policy
            if args.keys_command == "create":
                key, _ = await keys.create_key(store, args.tenant)
                print(key)
            else:
                cap = current.max_running if current.max_running is not None else "none"
                print(f"tenant {tenant}: weight {current.weight:g}, max running {cap}")
        elif args.keys_command == "list":
            records = await store.list_keys()
            policies = await store.tenant_policies()
            print(f"{'ID':<22} {'TENANT':<20} {'PREFIX':<12} {'CREATED':<11} {'REVOKED':<11} {'WEIGHT':<7} CAP")
            for r in records:
                policy = policies.get(r.tenant, DEFAULT_POLICY)
                cap = policy.max_running if policy.max_running is not None else "-"
                print(
                    f"{r.id:<22} {r.tenant:<20} {r.prefix:<12} {r.created_at:<11} {r.revoked_at or '-'!s:<11} "
                    f"{policy.weight:<7g} {cap}"
                )
        elif args.keys_command == "revoke":
            if not await store.revoke_key(args.key_id, ids.now()):
                print(f"No active key with id {args.key_id}; see `batch-gateway keys list`.", file=sys.stderr)
                return 1
    finally:
        await store.close()
    return 0
