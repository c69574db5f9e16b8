"""All configuration in one documented object.

Every field is a CLI flag (`--data-dir`) and an environment variable (`BATCH_GATEWAY_DATA_DIR`); a flag wins over the
environment, which wins over the default. The docs' configuration reference is generated from these definitions
(`batch-gateway config-reference`). The runner process receives the API's settings through the environment
(`Settings.to_env`), so both always agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "BATCH_GATEWAY_"


def setting(
    default: Any, help: str, *, group: str = "general", multiple: bool = False, choices: tuple[str, ...] | None = None
) -> Any:
    meta = {"help": help, "group": group, "multiple": multiple, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


class AuthMode(enum.StrEnum):
    """How the API authenticates requests (`--auth`): a fixed choice of configuration, never inferred from state."""

    KEYS = "keys"  # a valid, unrevoked API key; its tenant scopes everything
    OPEN = "open"  # single user on a loopback address: every request is tenant `default`


@dataclass
class Settings:
    # --- server ---
    host: str = setting("127.0.0.1", "Address the API listens on.", group="server")
    port: int = setting(8000, "Port the API listens on.", group="server")
    auth: str = setting(
        AuthMode.KEYS.value,
        "How requests are authenticated. keys: each request needs a valid, unrevoked API key (`batch-gateway keys "
        "create --tenant NAME`). open: any bearer token, or none, is tenant `default`; only with a loopback --host.",
        group="server",
        choices=tuple(mode.value for mode in AuthMode),
    )
    log_format: str = setting("auto", "Log format: console, json, or auto (console on a terminal).", group="server")
    log_level: str = setting("info", "Log level: debug, info, warning, error.", group="server")
    # --- storage ---
    data_dir: str = setting(
        ".batch-gateway", "Directory for the embedded database, files and work files.", group="storage"
    )
    database_url: str = setting(
        "", "PostgreSQL URL (postgresql://...). Empty: SQLite in the data directory.", group="storage"
    )
    object_store: str = setting(
        "", "Where file bytes live: s3://bucket/prefix or file:///path. Empty: <data-dir>/objects.", group="storage"
    )
    valkey_url: str = setting(
        "", "Valkey/Redis URL for live progress and cancel events. Empty: the database alone.", group="storage"
    )
    valkey_prefix: str = setting(
        "bg:", "Prefix of every Valkey key and channel, so several deployments can share one Valkey.", group="storage"
    )
    # --- limits ---
    max_upload_bytes: int = setting(
        512 * 1024 * 1024,
        "Largest file of any purpose, in bytes: one POST /v1/files, or every part of an Upload together "
        "(OpenAI: 512 MB per file).",
        group="limits",
    )
    max_batch_file_bytes: int = setting(
        200 * 1024 * 1024,
        'Largest batch input file (purpose=batch), in bytes (OpenAI: 200 MB). Bigger files get 400 "File is too '
        'large."',
        group="limits",
    )
    max_requests_per_batch: int = setting(50_000, "Most request lines in one batch input file.", group="limits")
    completion_window_seconds: int = setting(
        86400,
        "Seconds a batch may run before it expires (its `expires_at`). OpenAI's window is 24 h; raise it for big "
        "batches on small clusters.",
        group="limits",
    )
    completion_windows: str = setting(
        "24h",
        "Completion windows clients may ask for, comma-separated (e.g. 1h,4h,24h,72h). `24h` is OpenAI's only value "
        "and lasts --completion-window-seconds; any other lasts what it says (`90m`, `4h`, `3d`). A batch shows the "
        "window it has.",
        group="limits",
    )
    max_line_bytes: int = setting(
        10 * 1024 * 1024, "Largest single line of a batch input file, in bytes.", group="limits"
    )
    # --- upstream ---
    upstream: list[str] = setting(
        [],
        "OpenAI-compatible server(s) the batches run on: URL for every model, MODEL=URL for one model; "
        "several endpoints as URL1,URL2. Repeat the flag for several models.",
        group="upstream",
        multiple=True,
    )
    simulate: bool = setting(
        False, "Start the built-in vLLM simulator in-process and use it as the upstream.", group="upstream"
    )
    upstream_api_key: str = setting(
        "", "Bearer token the runner sends to the upstream (the gateway's own, never a user's).", group="upstream"
    )
    request_timeout: float = setting(
        600.0, "Seconds one upstream request may take before it counts as a timeout.", group="upstream"
    )
    # --- runner ---
    executor: str = setting(
        "local", "How batches run: local (a subprocess per batch) or argo (a Workflow per batch).", group="runner"
    )
    max_concurrent_runners: int = setting(
        4,
        "Most batches running at once (local subprocesses, or Argo Workflows the API creates); the rest wait, and "
        "start earliest deadline first within weighted fair sharing between tenants.",
        group="runner",
    )
    admission_order: str = setting(
        "deadline",
        "The order waiting batches start in. deadline: earliest deadline first within weighted fair sharing between "
        "tenants (each tenant's weight and cap: `batch-gateway keys tenant NAME`). fifo: arrival order.",
        group="runner",
        choices=("deadline", "fifo"),
    )
    deadline_shares: bool = setting(
        True,
        "Runners sharing an engine split its batch share by their tenants' weights and what their deadlines need (a "
        "batch that would miss its deadline takes more, one with slack yields); off: equal shares.",
        group="runner",
    )
    fair_share_window: float = setting(
        600.0,
        "Seconds over which admission remembers the runner slots each tenant held: with fewer slots than tenants, a "
        "tenant whose batch just ended waits behind one that had less, so tenants take turns by their weights.",
        group="runner",
    )
    runner_max_crashes: int = setting(
        5,
        "Local executor: crashes in a row, without progress in between, after which a batch is given up (it ends "
        "failed, with every finished result published).",
        group="runner",
    )
    initial_concurrency: int = setting(
        8,
        "In-flight requests per upstream endpoint when a runner starts on an engine only batch runners use (beside "
        "others it starts within their budget: its first request waits for a reading of the engine's /metrics).",
        group="runner",
    )
    max_concurrency: int = setting(256, "Upper bound of in-flight requests per upstream endpoint.", group="runner")
    fixed_concurrency: int = setting(
        0, "Pin in-flight requests per endpoint (turns the adaptive controller off); 0 = adaptive.", group="runner"
    )
    interactive_slowdown: float = setting(
        1.3,
        "While others (interactive users) use an engine, the most the batch may slow their tokens down: their "
        "inter-token latency with the batch, over what it would be without it. Alone on an engine, the batch fills it.",
        group="runner",
    )
    preempt: bool = setting(
        False,
        "When others arrive on an engine, abort in-flight batch requests beyond what the interactive budget allows "
        "(they are sent again later); off: they finish first, within about one of their service times.",
        group="runner",
    )
    priority_hints: list[str] = setting(
        [],
        "Priority hints for serving stacks that can put batch work behind interactive work: [MODEL=]HINT[,HINT] with "
        "HINT llm-d[:OBJECTIVE] (llm-d's inference gateway headers) or vllm-priority[:N] (vLLM's request priority, for "
        "--scheduling-policy priority). Repeatable.",
        group="upstream",
        multiple=True,
    )
    prefix_ordering: bool = setting(
        True,
        "Order requests by prompt-prefix group (and warm each group's cache before its followers go out) so the "
        "engine's prefix cache is reused; off = input order.",
        group="runner",
    )
    prefix_warm_up: bool = setting(
        True,
        "With prefix ordering, warm each group's prefix with a one-token copy of its head, so its followers go out "
        "while the head itself runs (one extra request and output token per group; never for engines with a prefix "
        "cache per slot, such as llama.cpp); off = followers wait for the head to finish.",
        group="runner",
    )
    retry_budget: float = setting(
        0.2,
        "Retries allowed per batch, as a share of its requests (at least 100), before requests give up.",
        group="runner",
    )
    max_attempts: int = setting(
        5,
        "Attempts per request for failures worth retrying (500 and other 5xx besides 502-504, 408, 409, timeouts). "
        '"Not now" (429, 502-504, a refused or reset connection) waits for the endpoint and uses up no attempt.',
        group="runner",
    )
    checkpoint_interval: float = setting(
        0.5,
        "Seconds between durable result checkpoints. A crash re-sends what was in flight plus what was answered "
        "since the last checkpoint.",
        group="runner",
    )
    runner_lease_seconds: int = setting(
        30,
        "Seconds a runner's claim on a batch lasts without renewal; a crashed runner's batch is taken over after it.",
        group="runner",
    )
    storage_retry_seconds: float = setting(
        1800.0,
        "Seconds a runner keeps retrying an unavailable database, object store or full work disk before it exits to "
        "be restarted later; its results stay in checkpoints either way.",
        group="runner",
    )
    cancel_grace: float = setting(
        5.0, "Seconds in-flight requests may finish after a cancel or expiry before they are cut off.", group="runner"
    )
    runner_metrics_port: int = setting(
        0,
        "Port where a runner serves Prometheus /metrics while it runs (in-flight, limit, latency, tokens); 0 = off.",
        group="runner",
    )
    work_dir: str = setting("", "Scratch directory for runner work files. Empty: <data-dir>/work.", group="runner")
    # --- argo ---
    argo_namespace: str = setting("batch-gateway", "Namespace the runner Workflows are created in.", group="argo")
    argo_template: str = setting("batch-gateway-runner", "WorkflowTemplate that runs one batch.", group="argo")
    argo_deadline_grace_seconds: int = setting(
        7200,
        "Seconds past a batch's expires_at before Argo stops its Workflow (activeDeadlineSeconds): the backstop for a "
        "hung runner. A live runner expires its batch itself at expires_at and needs this long at most to finalise.",
        group="argo",
    )
    # --- webhooks ---
    webhook: list[str] = setting(
        [],
        "Where to POST OpenAI-style batch events (batch.completed/failed/expired/cancelled): TENANT=URL for one "
        "tenant, or a bare URL for every tenant without its own. Repeatable.",
        group="webhooks",
        multiple=True,
    )
    webhook_secret: list[str] = setting(
        [],
        "Signing secret per webhook: TENANT=whsec_..., or a bare whsec_... for the bare URL. Receivers verify with "
        "openai's client.webhooks.unwrap(). Prefer the env var: flags show in `ps`.",
        group="webhooks",
        multiple=True,
    )
    webhook_timeout: float = setting(
        10.0,
        "Seconds a webhook receiver has to answer one delivery attempt before it counts as failed.",
        group="webhooks",
    )
    webhook_retry_for: float = setting(
        72 * 3600.0,
        "Seconds after a batch ends during which its event is retried (exponential backoff up to 10 min apart, "
        "honouring Retry-After) until the receiver answers 2xx; then it is given up with an error log.",
        group="webhooks",
    )
    # --- gc ---
    gc_interval: float = setting(
        60.0, "Seconds between garbage-collection passes inside `serve` (local mode); 0 = off.", group="gc"
    )
    gc_stale_upload_age: float = setting(
        24 * 3600.0,
        "Seconds after which gc aborts an unfinished S3 multipart upload (or removes a local partial write) left by a "
        "killed upload or runner. Keep it above the longest upload.",
        group="gc",
    )
    # --- tracing ---
    otlp_endpoint: str = setting(
        "",
        "OTLP/HTTP endpoint that receives OpenTelemetry traces (e.g. http://otel-collector:4318; /v1/traces is "
        "appended). Empty: the standard OTEL_EXPORTER_OTLP_ENDPOINT if set, else tracing is off.",
        group="tracing",
    )
    trace_upstream_sample_ratio: float = setting(
        0.01,
        "Share of upstream requests traced with a span of their own and a sampled traceparent (so the engine traces "
        "them too); the others carry the batch run's traceparent marked not sampled.",
        group="tracing",
    )

    # ------------------------------------------------------------------------------------------

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def work_path(self) -> Path:
        return Path(self.work_dir).expanduser() if self.work_dir else self.data_path / "work"

    @property
    def object_store_url(self) -> str:
        return self.object_store or (self.data_path / "objects").resolve().as_uri()

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in another process (the runner)."""
        env: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                env[env_name(f.name)] = "\n".join(value)
            elif isinstance(value, bool):
                env[env_name(f.name)] = "true" if value else "false"
            else:
                env[env_name(f.name)] = str(value)
        return env

    @classmethod
    def from_env(cls, environ: typing.Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None:
                values[f.name] = parse_value(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _field_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(Settings)
    return hints[f.name]


def parse_value(f: dataclasses.Field, raw: str) -> Any:
    kind = _field_type(f)
    choices = f.metadata["choices"]
    if choices is not None and raw not in choices:
        raise ValueError(f"{env_name(f.name)}={raw!r}: expected one of {', '.join(choices)}")
    if kind is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{env_name(f.name)}={raw!r}: expected true or false")
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    if typing.get_origin(kind) is list:
        return [item.strip() for item in raw.replace("\n", " ").split() if item.strip()]
    return raw


def add_arguments(parser: argparse.ArgumentParser, names: typing.Iterable[str] | None = None) -> None:
    """Add a flag for each setting (or only those named), each naming its env var in --help."""
    wanted = set(names) if names is not None else None
    for f in dataclasses.fields(Settings):
        if wanted is not None and f.name not in wanted:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        text = f"{f.metadata['help']} [env {env_name(f.name)}; default {default!r}]"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, choices=f.metadata["choices"], help=text)


def from_args(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(Settings)}
    return Settings.from_env(**overrides)


def reference_markdown() -> str:
    """The configuration reference, generated from the definitions above."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `batch-gateway config-reference` from `batch_gateway/settings.py`.",
        "",
    ]
    group = None
    for f in dataclasses.fields(Settings):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines += ["", f"## {group}", "", "| flag | env var | default | meaning |", "|---|---|---|---|"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        lines.append(f"| `{flag}` | `{env_name(f.name)}` | `{default!r}` | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"
