"""`api`: the HTTP API under concurrent clients — batches create, retrieve, list and file uploads.

`batch-gateway serve` runs as its own process against PostgreSQL (a fresh database, dropped afterwards) and Valkey
(when one answers on 127.0.0.1:6379, under a key prefix of its own), with real API keys for four tenants. Runners are
not started (`max_concurrent_runners=0`): the API alone is measured, as in a deployment where runners run elsewhere
(Argo). Without PostgreSQL the benchmark falls back to SQLite and says so.

Each client is an asyncio task on one shared httpx client, sending its next request as soon as the last answered,
with a fixed mix of operations; latencies are end to end as the client sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import httpx
import psutil

from benchmarks import report
from benchmarks.harness import free_port, stop_process
from benchmarks.loadgen import percentile
from benchmarks.workloads import batch_lines

NAME = "api"
TITLE = "API under load: create, retrieve, list"

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
VALKEY = "redis://127.0.0.1:6379"
TENANTS = 4
CLIENT_COUNTS = (16, 64)
WARMUP_SECONDS = 3.0
MEASURE_SECONDS = 20.0
# Operation mix (weights): mostly reads, as SDK clients poll their batches.
MIX = {"batches.retrieve": 50, "batches.list": 25, "batches.create": 20, "files.create": 5}


@dataclass
class OpStats:
    latencies: list[float] = field(default_factory=list)
    errors_5xx: int = 0
    errors_other: int = 0
    transport_errors: int = 0


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN, connect_timeout=3):
            return True
    except Exception:
        return False


def valkey_available() -> bool:
    try:
        import valkey

        return bool(valkey.Valkey.from_url(VALKEY, socket_timeout=2).ping())
    except Exception:
        return False


@contextlib.contextmanager
def fresh_database():
    import psycopg

    name = "bg_bench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def clear_valkey_prefix(prefix: str) -> None:
    import valkey

    client = valkey.Valkey.from_url(VALKEY)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)


def create_keys(env: dict[str, str]) -> list[str]:
    keys = []
    for i in range(TENANTS):
        out = subprocess.run(
            [sys.executable, "-m", "batch_gateway", "keys", "create", "--tenant", f"tenant-{i}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        keys.append(out.stdout.strip().splitlines()[-1])
    return keys


def start_server(env: dict[str, str], port: int, log) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "batch_gateway", "serve", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        if time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError("serve did not become ready")
        time.sleep(0.2)


INPUT = b"".join(batch_lines(3))


async def drive(
    base: str, keys: list[str], clients: int, warmup: float, duration: float
) -> tuple[dict[str, OpStats], float]:
    """Run `clients` closed-loop clients; return per-operation stats for requests that started in the window."""
    stats = {op: OpStats() for op in MIX}
    # One httpx client (one connection) per simulated client: httpx's shared pool costs CPU in proportion to its
    # size on every request, which would make the load generator, not the server, the bottleneck.
    https = [
        httpx.AsyncClient(base_url=base, timeout=30.0, limits=httpx.Limits(max_connections=1)) for _ in range(clients)
    ]
    try:
        http = https[0]
        # Each tenant gets an input file and a first batch, so retrieve and list have something to read.
        state: dict[int, dict] = {}
        for t, key in enumerate(keys):
            headers = {"authorization": f"Bearer {key}"}
            upload = await http.post(
                "/v1/files",
                headers=headers,
                data={"purpose": "batch"},
                files={"file": ("input.jsonl", INPUT, "application/jsonl")},
            )
            upload.raise_for_status()
            file_id = upload.json()["id"]
            created = await http.post(
                "/v1/batches",
                headers=headers,
                json={"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            )
            created.raise_for_status()
            state[t] = {"headers": headers, "file_id": file_id, "batches": [created.json()["id"]]}

        start = time.monotonic()
        measure_from, measure_to = start + warmup, start + warmup + duration
        ops, weights = list(MIX), list(MIX.values())

        async def client(n: int) -> None:
            http = https[n]
            rng = random.Random(n)
            tenant = state[n % len(keys)]
            while time.monotonic() < measure_to:
                op = rng.choices(ops, weights)[0]
                began = time.monotonic()
                try:
                    if op == "batches.retrieve":
                        response = await http.get(
                            f"/v1/batches/{rng.choice(tenant['batches'])}", headers=tenant["headers"]
                        )
                    elif op == "batches.list":
                        response = await http.get("/v1/batches", params={"limit": 20}, headers=tenant["headers"])
                    elif op == "batches.create":
                        response = await http.post(
                            "/v1/batches",
                            headers=tenant["headers"],
                            json={
                                "input_file_id": tenant["file_id"],
                                "endpoint": "/v1/chat/completions",
                                "completion_window": "24h",
                                "metadata": {"client": str(n)},
                            },
                        )
                        if response.status_code == 200:
                            tenant["batches"].append(response.json()["id"])
                    else:
                        response = await http.post(
                            "/v1/files",
                            headers=tenant["headers"],
                            data={"purpose": "batch"},
                            files={"file": ("input.jsonl", INPUT, "application/jsonl")},
                        )
                except httpx.HTTPError:
                    if measure_from <= began < measure_to:
                        stats[op].transport_errors += 1
                    continue
                latency = time.monotonic() - began
                if not measure_from <= began < measure_to:
                    continue
                if response.status_code >= 500:
                    stats[op].errors_5xx += 1
                elif response.status_code != 200:
                    stats[op].errors_other += 1
                else:
                    stats[op].latencies.append(latency)

        await asyncio.gather(*(client(n) for n in range(clients)))
    finally:
        for http in https:
            await http.aclose()
    return stats, duration


def cpu_by_role(server_pid: int) -> dict[str, float]:
    """CPU seconds so far of the API server, PostgreSQL's processes, Valkey/Redis, and this (client) process."""

    def seconds(process: psutil.Process) -> float:
        try:
            times = process.cpu_times()
            return times.user + times.system
        except psutil.Error:
            return 0.0

    roles = {
        "server": seconds(psutil.Process(server_pid)),
        "PostgreSQL": 0.0,
        "Valkey": 0.0,
        "clients": seconds(psutil.Process()),
    }
    for process in psutil.process_iter(["name"]):
        name = process.info["name"] or ""
        if name.startswith("postgres"):
            roles["PostgreSQL"] += seconds(process)
        elif name.startswith(("redis-server", "valkey-server")):
            roles["Valkey"] += seconds(process)
    return roles


def rows_for(clients: int, stats: dict[str, OpStats], seconds: float) -> list[dict]:
    rows = []
    total_ok = sum(len(s.latencies) for s in stats.values())
    for op, s in stats.items():
        rows.append(
            {
                "clients": clients,
                "operation": op,
                "requests/s": len(s.latencies) / seconds,
                "p50 ms": percentile(s.latencies, 50) * 1000,
                "p99 ms": percentile(s.latencies, 99) * 1000,
                "5xx": s.errors_5xx,
                "other non-200": s.errors_other,
                "transport errors": s.transport_errors,
            }
        )
    rows.append(
        {
            "clients": clients,
            "operation": "**all**",
            "requests/s": total_ok / seconds,
            "p50 ms": percentile([x for s in stats.values() for x in s.latencies], 50) * 1000,
            "p99 ms": percentile([x for s in stats.values() for x in s.latencies], 99) * 1000,
            "5xx": sum(s.errors_5xx for s in stats.values()),
            "other non-200": sum(s.errors_other for s in stats.values()),
            "transport errors": sum(s.transport_errors for s in stats.values()),
        }
    )
    return rows


def run() -> None:
    data_dir = tempfile.mkdtemp(prefix="bg-bench-api-")
    use_postgres = postgres_available()
    use_valkey = use_postgres and valkey_available()
    prefix = f"bg-bench-{uuid.uuid4().hex[:8]}:"
    database = fresh_database() if use_postgres else contextlib.nullcontext("")
    rows: list[dict] = []
    with database as database_url, open(os.path.join(data_dir, "serve.log"), "ab") as log:
        env = {
            **os.environ,
            "BATCH_GATEWAY_DATA_DIR": data_dir,
            "BATCH_GATEWAY_DATABASE_URL": database_url,
            "BATCH_GATEWAY_VALKEY_URL": VALKEY if use_valkey else "",
            "BATCH_GATEWAY_VALKEY_PREFIX": prefix,
            "BATCH_GATEWAY_MAX_CONCURRENT_RUNNERS": "0",
            "BATCH_GATEWAY_GC_INTERVAL": "0",
            "BATCH_GATEWAY_UPSTREAM": "http://127.0.0.1:9",
            "BATCH_GATEWAY_LOG_FORMAT": "json",
            "BATCH_GATEWAY_LOG_LEVEL": "warning",
        }
        keys = create_keys(env)
        port = free_port()
        server = start_server(env, port, log)
        try:
            for clients in CLIENT_COUNTS:
                before, started = cpu_by_role(server.pid), time.monotonic()
                stats, seconds = asyncio.run(
                    drive(f"http://127.0.0.1:{port}", keys, clients, WARMUP_SECONDS, MEASURE_SECONDS)
                )
                elapsed = time.monotonic() - started
                used = {role: (cpu - before[role]) / elapsed for role, cpu in cpu_by_role(server.pid).items()}
                rows += rows_for(clients, stats, seconds)
                rows[-1].update({f"{role} CPU": f"{share:.0%}" for role, share in used.items()})
        finally:
            stop_process(server)
            if use_valkey:
                clear_valkey_prefix(prefix)
    five_xx = sum(r["5xx"] for r in rows if r["operation"] == "**all**")
    backend = (
        "PostgreSQL (a fresh database, dropped afterwards)" + (" and Valkey" if use_valkey else ", no Valkey")
        if use_postgres
        else "**SQLite** (PostgreSQL was not reachable on 127.0.0.1:5432)"
    )
    body = f"""
`python -m benchmarks api`. `batch-gateway serve` (one process) on {backend}, local-file object storage, four tenants
with real API keys; runners are not started, so the API alone is measured. Closed-loop httpx clients, each sending
its next request as soon as the last answered, with the mix {", ".join(f"{op} {w}%" for op, w in MIX.items())}
(uploads are 3-line JSONL files; list pages hold 20 batches). {WARMUP_SECONDS:.0f} s warm-up, then
{MEASURE_SECONDS:.0f} s measured per client count. The clients, the server and PostgreSQL share the machine's cores.

{report.table(rows)}
**Target: no 5xx under load — measured: {five_xx} 5xx** ({"met" if five_xx == 0 else "MISSED"}).
"""
    busiest = max((r for r in rows if r["operation"] == "**all**"), key=lambda r: r["requests/s"])
    report.write_section(
        NAME,
        TITLE,
        body,
        [
            ("API under load: 5xx", "0", f"{five_xx}: {'met' if five_xx == 0 else '**missed**'}"),
            (
                "API throughput (no target)",
                "",
                f"{busiest['requests/s']:,.0f} requests/s at {busiest['clients']} clients, "
                f"p99 {busiest['p99 ms']:,.0f} ms",
            ),
        ],
    )
    import shutil

    shutil.rmtree(data_dir, ignore_errors=True)
