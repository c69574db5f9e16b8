"""`batch-gateway serve`: the API and webhook delivery, plus (in local mode) the runner subprocesses and periodic gc."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress

import structlog
import uvicorn

from batch_gateway.executor import build_executor
from batch_gateway.services import Services
from batch_gateway.settings import AuthMode, Settings

log = structlog.get_logger("serve")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_auth_refused(settings: Settings) -> str | None:
    """Why `serve` must not start with these settings' authentication, or None. `--auth open` makes every request
    tenant `default`, which is safe only when nobody else can reach the port."""
    if AuthMode(settings.auth) is AuthMode.OPEN and not is_loopback(settings.host):
        return (
            f"--auth open lets anyone who can reach {settings.host} use the gateway, so it is allowed only on a "
            "loopback --host (127.0.0.1, ::1, localhost). To listen on this address, use --auth keys (the default) "
            "and create a key with `batch-gateway keys create --tenant NAME`."
        )
    return None


async def serve(settings: Settings) -> int:
    refused = open_auth_refused(settings)
    if refused is not None:
        log.error("serve.refused", host=settings.host, auth=settings.auth, reason=refused)
        return 2
    simulator = None
    if settings.simulate:
        from batch_gateway.sim import SimConfig, SimServer

        simulator = SimServer(SimConfig())
        simulator.start()
        settings = dataclasses.replace(settings, upstream=[*settings.upstream, simulator.url])
        log.warning(
            "serve.simulator", url=simulator.url, note="batches run on the built-in vLLM simulator, not a real model"
        )
    if settings.upstream:
        log.info("serve.upstreams", upstream=settings.upstream)
    else:
        log.warning(
            "serve.no_upstream",
            note="no --upstream given: every batch will fail with model_not_found. "
            "Pass --upstream http://your-vllm:8000 or --simulate.",
        )

    from batch_gateway.webhooks import parse_webhooks

    try:  # a bad setting fails now, not at the first event or in every runner
        webhooks = parse_webhooks(settings.webhook, settings.webhook_secret)
        check_runner_settings(settings)
    except ValueError as exc:
        log.error("serve.bad_setting", error=str(exc))
        return 2
    services = await Services.open(settings)
    from batch_gateway import tracing

    tracing.configure(settings, "batch-gateway-api")
    try:
        if AuthMode(settings.auth) is AuthMode.OPEN:
            log.warning("serve.auth_open", note="--auth open: every request is tenant `default`, with or without a key")
        elif await services.metadata.active_key_count() == 0:
            log.warning(
                "serve.no_api_keys",
                note="every request gets 401 until you create a key with `batch-gateway keys create --tenant NAME` "
                "(or, for one user on this machine, start with --auth open)",
            )
        executor = build_executor(settings, services.metadata)
        services.executor = executor
        await executor.start()
        background = [asyncio.create_task(_resume_unfinished(services))]
        # Every mode delivers webhooks here (in a cluster, the API replicas share the work through claim leases).
        from batch_gateway.webhooks_outbox import WebhookOutbox

        outbox = WebhookOutbox(
            services.metadata, webhooks, timeout=settings.webhook_timeout, retry_for=settings.webhook_retry_for
        )
        background.append(asyncio.create_task(outbox.run()))
        if settings.executor == "local" and settings.gc_interval > 0:
            background.append(asyncio.create_task(_periodic_gc(services)))

        from batch_gateway.api.app import create_app

        app = create_app(services)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
        server = uvicorn.Server(config)
        log.info(
            "serve.listening",
            url=f"http://{settings.host}:{settings.port}/v1",
            data_dir=str(settings.data_path.resolve()),
            database="postgresql" if settings.database_url.startswith("postgres") else "sqlite",
            object_store=settings.object_store_url,
            valkey=services.signals.state,
            executor=settings.executor,
        )
        await server.serve()
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    finally:
        await services.close()
        tracing.shutdown()
        if simulator is not None:
            simulator.stop()
    return 0


def check_runner_settings(settings: Settings) -> None:
    """Raise ValueError for runner settings that every runner would refuse."""
    from batch_gateway.api.batch_create import completion_windows
    from batch_gateway.runner.hints import parse_hints

    completion_windows(settings.completion_windows, settings.completion_window_seconds)

    if settings.interactive_slowdown <= 1.0:
        raise ValueError(
            f"--interactive-slowdown must be above 1 (1.3: 30% slower at most), got {settings.interactive_slowdown}"
        )
    parse_hints(settings.priority_hints)


async def _resume_unfinished(services: Services) -> None:
    """Batches a crash left unfinished run again (their runners resume from checkpoints)."""
    from batch_gateway.gc.collector import GcReport, reconcile

    assert services.executor is not None
    report = GcReport()
    await reconcile(services, services.executor, report)
    if report.resubmitted:
        log.info("serve.resumed_unfinished", batches=report.resubmitted)


async def _periodic_gc(services: Services) -> None:
    from batch_gateway.gc.collector import collect

    assert services.executor is not None
    while True:
        await asyncio.sleep(services.settings.gc_interval)
        try:
            await collect(services, services.executor)
        except Exception:
            log.exception("gc.pass_failed")
