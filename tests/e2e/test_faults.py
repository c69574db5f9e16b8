"""Everyday faults, as an operator meets them, must not cost a single result.

Each dependency sits behind a proxy the test takes down and brings back (tests/fixtures/proxy.py): PostgreSQL, Valkey,
the S3 server and the model server keep running; their clients just cannot reach them. After every fault the batch
must end `completed` with every line exactly once and none failed. `benchmarks/faults.py` runs the same scenarios
with longer outages and reports what each cost.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.conftest import create_database, drop_database
from tests.fixtures.proxy import Proxy
from tests.fixtures.redis import unique_prefix
from tests.helpers import eventually, jsonl, wait_for

pytestmark = pytest.mark.e2e

SLOW_TOKENS = 1500  # the one slow line: it is still running when the fast ones are done


def batch_input(lines: int, *, slow_last: bool = False) -> bytes:
    rows = []
    for i in range(lines):
        slow = slow_last and i == lines - 1
        body = {
            "model": "sim-model",
            "max_tokens": SLOW_TOKENS if slow else 6,
            "messages": [{"role": "system", "content": f"Prompt {i % 5}. " * 30}, {"role": "user", "content": f"Q{i}"}],
        }
        rows.append(
            json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    return ("\n".join(rows) + "\n").encode()


def start_batch(client, data: bytes):
    file = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")


def served(sim) -> int:
    return httpx.get(sim.url + "/sim/stats", timeout=5).json()["completed"]


def assert_every_line_once(client, batch, lines: int) -> None:
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == lines and batch.request_counts.failed == 0, batch.request_counts
    assert batch.error_file_id is None
    outputs = jsonl(client.files.content(batch.output_file_id).content)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"req-{i}" for i in range(lines))


@dataclass
class Proxied:
    """Production backends, each behind its own proxy, and the environment that points `serve` at the proxies."""

    postgres: Proxy
    valkey: Proxy
    s3: Proxy
    env: dict[str, str]


@pytest.fixture
def backend() -> dict[str, str]:
    """Embedded storage unless a test passes the proxied production backends (`proxied.env`) itself."""
    return {}


@pytest.fixture
def proxied(s3_session) -> Iterator[Proxied]:
    database = create_database()
    s3_port = int(s3_session.endpoint.rsplit(":", 1)[1])
    with (
        Proxy(("127.0.0.1", 5432)) as postgres,
        Proxy(("127.0.0.1", 6379)) as valkey,
        Proxy(("127.0.0.1", s3_port)) as s3,
    ):
        env = {
            "BATCH_GATEWAY_DATABASE_URL": database.replace(":5432/", f":{postgres.port}/"),
            "BATCH_GATEWAY_VALKEY_URL": f"redis://127.0.0.1:{valkey.port}/0",
            "BATCH_GATEWAY_VALKEY_PREFIX": unique_prefix(),
            "BATCH_GATEWAY_OBJECT_STORE": s3_session.url(),
            **s3_session.env(),
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3.port}",
        }
        try:
            yield Proxied(postgres, valkey, s3, env)
        finally:
            postgres.up()  # the database must be reachable to be dropped
    drop_database(database)


# --- the API process dies -------------------------------------------------------------------


def test_serve_killed_alone_loses_nothing(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=0.5, max_num_seqs=8)
    gateway = gateway_factory(sim.url, env={"BATCH_GATEWAY_FIXED_CONCURRENCY": "8"})
    client = gateway.client()
    batch = start_batch(client, batch_input(120))
    eventually(lambda: served(sim) >= 20, timeout=60, what="progress")
    runners = gateway.runners()
    assert runners, "no runner process found"

    gateway.kill_server()  # SIGKILL, as the OOM killer would: the runners are not killed with it
    # They notice on their own (PR_SET_PDEATHSIG), checkpoint and exit: no orphan is left holding the batch.
    _, alive = psutil.wait_procs(runners, timeout=20)
    assert not alive, f"runners outlived serve: {[p.pid for p in alive]}"

    gateway.start()
    done = wait_for(gateway.client(), batch.id, timeout=120)
    assert_every_line_once(gateway.client(), done, 120)
    assert "executor.runner_crashed" not in gateway.logs()


# --- a dependency is unreachable for a while ---------------------------------------------------


@pytest.mark.production
@pytest.mark.parametrize("dependency", ["postgres", "s3", "valkey"])
def test_an_outage_during_dispatch_loses_nothing(gateway_factory, sim_factory, proxied, dependency):
    sim = sim_factory(time_scale=0.5, max_num_seqs=8)
    gateway = gateway_factory(sim.url, env={**proxied.env, "BATCH_GATEWAY_FIXED_CONCURRENCY": "8"})
    client = gateway.client(max_retries=8)
    batch = start_batch(client, batch_input(150))
    eventually(lambda: served(sim) >= 20, timeout=60, what="progress")
    proxy = getattr(proxied, dependency)
    proxy.down()
    time.sleep(8)
    assert served(sim) > 20, "dispatch stopped while the dependency was down"
    proxy.up()
    done = wait_for(client, batch.id, timeout=180)
    assert_every_line_once(client, done, 150)
    assert "runner.crashed" not in gateway.logs()


@pytest.mark.production
@pytest.mark.parametrize("dependency", ["postgres", "s3"])
def test_an_outage_at_finalise_loses_nothing(gateway_factory, sim_factory, proxied, dependency):
    sim = sim_factory(time_scale=0.2, max_num_seqs=16)
    # Without prefix warm-ups, the simulator's count of answers is the lines': it tells when the slow line is done.
    env = {**proxied.env, "BATCH_GATEWAY_FIXED_CONCURRENCY": "16", "BATCH_GATEWAY_PREFIX_WARM_UP": "false"}
    gateway = gateway_factory(sim.url, env=env)
    client = gateway.client(max_retries=8)
    lines = 60
    batch = start_batch(client, batch_input(lines, slow_last=True))
    eventually(lambda: served(sim) >= lines - 1, timeout=60, what="the fast lines")  # the slow line is still running
    proxy = getattr(proxied, dependency)
    proxy.down()
    eventually(lambda: served(sim) >= lines, timeout=60, what="the slow line")
    if dependency == "postgres":
        # Up only once finalising has met the outage: a fixed wait raced the pool's own 5 s wait for a connection,
        # which the outage's end could answer first.
        eventually(
            lambda: '"during": "finalise the batch"' in gateway.logs(),
            timeout=60,
            what="the runner to meet the outage while finalising",
        )
    else:
        time.sleep(6)  # the runner is finalising into the outage (obstore retries S3 itself first: nothing to see)
    proxy.up()
    done = wait_for(client, batch.id, timeout=180)
    assert_every_line_once(client, done, lines)
    assert "runner.crashed" not in gateway.logs()


@pytest.mark.production
def test_an_upstream_outage_loses_nothing(gateway_factory, sim_factory, proxied):
    sim = sim_factory(time_scale=0.5, max_num_seqs=8)
    with Proxy(("127.0.0.1", sim.port)) as upstream:
        gateway = gateway_factory(
            f"http://127.0.0.1:{upstream.port}", env={**proxied.env, "BATCH_GATEWAY_MAX_ATTEMPTS": "2"}
        )
        client = gateway.client()
        batch = start_batch(client, batch_input(150))
        eventually(lambda: served(sim) >= 20, timeout=60, what="progress")
        upstream.down()
        time.sleep(6)
        upstream.up()
        done = wait_for(client, batch.id, timeout=180)
    assert_every_line_once(client, done, 150)


# --- the work disk fills up --------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 2 MB tmpfs: a disk that can really fill up. Needs root (mount); skipped elsewhere."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_work_disk_is_waited_for_and_cleaned_up(gateway_factory, sim, small_disk):
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"x" * (2 * 1024 * 1024 - 64 * 1024))  # leaves 64 kB: less than the input
    gateway = gateway_factory(sim.url, env={"BATCH_GATEWAY_WORK_DIR": str(small_disk / "work")})
    client = gateway.client()
    data = batch_input(200)
    assert len(data) > 64 * 1024
    batch = start_batch(client, data)
    eventually(
        lambda: "runner.storage_unavailable" in gateway.logs(), timeout=60, what="the runner to meet the full disk"
    )
    time.sleep(2)
    assert not list((small_disk / "work").rglob("input.jsonl")), "a partial work file was left on the full disk"
    assert client.batches.retrieve(batch.id).status == "validating"
    assert "disk is full" in gateway.logs() and "runner.crashed" not in gateway.logs()

    ballast.unlink()  # the operator frees space
    done = wait_for(client, batch.id, timeout=120)
    assert_every_line_once(client, done, 200)


# --- runners that crash, and batches cancelled before they run -----------------------------------


def test_a_batch_given_up_after_crashes_publishes_every_finished_result(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=0.5, max_num_seqs=4)
    gateway = gateway_factory(
        sim.url, env={"BATCH_GATEWAY_FIXED_CONCURRENCY": "4", "BATCH_GATEWAY_RUNNER_MAX_CRASHES": "1"}
    )
    client = gateway.client()
    lines = 150
    batch = start_batch(client, batch_input(lines))
    eventually(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 10, timeout=60, what="progress")
    for runner in gateway.runners():
        runner.kill()  # a crash the runner cannot checkpoint for: SIGKILL
    done = wait_for(client, batch.id, timeout=60)
    assert done.status == "failed"
    assert done.errors.data[0].code == "runner_failed"
    outputs = jsonl(client.files.content(done.output_file_id).content)
    errors = jsonl(client.files.content(done.error_file_id).content)
    assert len(outputs) >= 10 and {e["error"]["code"] for e in errors} == {"batch_failed"}
    assert sorted(line["custom_id"] for line in outputs + errors) == sorted(f"req-{i}" for i in range(lines))
    assert (done.request_counts.completed, done.request_counts.failed) == (len(outputs), len(errors))


def test_a_batch_cancelled_before_it_ran_lists_every_line(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=1.0, max_num_seqs=2)
    gateway = gateway_factory(sim.url, env={"BATCH_GATEWAY_MAX_CONCURRENT_RUNNERS": "1"})
    client = gateway.client()
    first = start_batch(client, batch_input(50))
    queued = start_batch(client, batch_input(30))
    assert client.batches.retrieve(queued.id).status == "validating"
    client.batches.cancel(queued.id)
    done = wait_for(client, queued.id, timeout=60)
    assert done.status == "cancelled"
    assert done.request_counts.total == 30 and done.request_counts.failed == 30 and done.output_file_id is None
    errors = jsonl(client.files.content(done.error_file_id).content)
    assert sorted(e["custom_id"] for e in errors) == sorted(f"req-{i}" for i in range(30))
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    client.batches.cancel(first.id)


def test_a_killed_runner_is_replaced_without_waiting_out_its_lease(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=0.5, max_num_seqs=8)
    gateway = gateway_factory(sim.url, env={"BATCH_GATEWAY_RUNNER_LEASE_SECONDS": "60"})
    client = gateway.client()
    batch = start_batch(client, batch_input(150))
    eventually(lambda: served(sim) >= 10, timeout=60, what="progress")
    for runner in gateway.runners():
        runner.kill()  # SIGKILL: its lease (60 s) is left behind
    killed_at = time.monotonic()
    done = wait_for(client, batch.id, timeout=120)
    assert_every_line_once(client, done, 150)
    # The executor saw its runner die and released the lease: the next one (after the 2 s crash backoff) did not
    # wait the minute out.
    assert time.monotonic() - killed_at < 45
    assert "runner.waiting_for_lease" not in gateway.logs()
