"""End-to-end fixtures: the real `batch-gateway serve` process and a simulator, driven with the `openai` SDK."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest

from batch_gateway.sim import SimConfig, SimServer
from tests.fixtures.processes import http_ok, spawn
from tests.helpers import free_port

# Fast enough for tests, slow enough that cancel and expiry can catch a batch mid-run.
FAST_SIM = dict(time_scale=0.02)


class Gateway:
    """One `batch-gateway serve` process on a loopback port, with its own data directory. It runs with `--auth open`
    (any key is tenant `default`) unless `env` sets BATCH_GATEWAY_AUTH."""

    def __init__(self, data_dir: Path, env: dict[str, str], extra_args: list[str]) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.env = {**os.environ, "BATCH_GATEWAY_AUTH": "open", **env, "BATCH_GATEWAY_LOG_FORMAT": "json"}
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self.log_path = data_dir / "serve.log"

    def start(self) -> Gateway:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = spawn(
            [
                sys.executable,
                "-m",
                "batch_gateway",
                "serve",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                *self.extra_args,
            ],
            ready=http_ok(f"http://127.0.0.1:{self.port}/health"),
            what="serve",
            log=self.log_path,
            env=self.env,
            start_new_session=True,  # so kill() can take the runner subprocesses down with it
        )
        return self

    def client(self, api_key: str = "anything", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, **kwargs)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()

    def kill(self) -> None:
        """SIGKILL the server and every runner it started: a machine crash."""
        runners = self.runners()
        self._kill_group()
        for runner in runners:
            with contextlib.suppress(psutil.NoSuchProcess):
                runner.kill()
        if self.process:
            self.process.wait()

    def kill_server(self) -> None:
        """SIGKILL the server alone (the OOM killer's choice); its runners are left to notice."""
        if self.process:
            self.process.kill()
            self.process.wait()

    def runners(self) -> list[psutil.Process]:
        """The runner processes this server started and that are still alive."""
        if not self.process:
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in children if "batch_gateway.runner" in " ".join(_cmdline(p))]

    def _kill_group(self) -> None:
        if self.process:
            with contextlib.suppress(ProcessLookupError):  # the group is gone already
                os.killpg(self.process.pid, signal.SIGKILL)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "batch_gateway", *args, "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


@pytest.fixture
def sim_factory() -> Iterator:
    started: list[SimServer] = []

    def start(**overrides) -> SimServer:
        server = SimServer(SimConfig(**{**FAST_SIM, **overrides}))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def s3_session():
    from tests.fixtures.s3 import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture(params=["embedded", "production"])
def backend(request) -> Iterator[dict[str, str]]:
    """Environment for one backend set: embedded (SQLite, local files, no Valkey) or production (a fresh PostgreSQL
    database, Valkey/Redis with a unique key prefix, and an S3 bucket on a real S3 server)."""
    if request.param == "embedded":
        yield {}
        return
    from tests.fixtures.redis import unique_prefix

    s3 = request.getfixturevalue("s3_session")
    database = create_database()
    try:
        yield {
            "BATCH_GATEWAY_DATABASE_URL": database,
            "BATCH_GATEWAY_VALKEY_URL": "redis://127.0.0.1:6379/0",
            "BATCH_GATEWAY_VALKEY_PREFIX": unique_prefix(),
            "BATCH_GATEWAY_OBJECT_STORE": s3.url(),
            **s3.env(),
        }
    finally:
        drop_database(database)


ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def create_database() -> str:
    import uuid

    import psycopg

    name = f"bg_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def gateway_factory(tmp_path, backend) -> Iterator:
    started: list[Gateway] = []

    def start(
        upstream: str | list[str] | None = None,
        *,
        env: dict[str, str] | None = None,
        args: list[str] = (),
        name: str = "gw",
    ) -> Gateway:
        upstreams = [upstream] if isinstance(upstream, str) else list(upstream or [])
        full_env = {
            **backend,
            "BATCH_GATEWAY_UPSTREAM": "\n".join(upstreams),
            "BATCH_GATEWAY_GC_INTERVAL": "1",
            **(env or {}),
        }
        gateway = Gateway(tmp_path / name, full_env, list(args)).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def sim(sim_factory):
    return sim_factory()


@pytest.fixture
def gateway(gateway_factory, sim):
    return gateway_factory(sim.url)


@pytest.fixture
def client(gateway):
    return gateway.client()
