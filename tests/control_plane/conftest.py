"""Fixtures of the control-plane tests: one real Kubernetes control plane and Argo for this package's tests
(tests/control_plane/cluster.py; stopped after them, so that it takes no CPU from the suite's timing-sensitive runner
tests), templates/ applied to it with kubectl, and `batch-gateway serve --executor argo` in front of it.

Deselect these tests with `-m "not control_plane"`; they need scripts/install-control-plane.sh to have run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from batch_gateway.sim import SimConfig, SimServer
from tests.control_plane import paths
from tests.control_plane.cluster import NAMESPACE, ControlPlane
from tests.control_plane.kubelet import host_environment
from tests.control_plane.paths import REPO
from tests.fixtures.postgres import create_test_database, drop_test_database
from tests.fixtures.redis import SHARED_URL, unique_prefix
from tests.fixtures.s3 import S3Server, s3_server
from tests.helpers import free_port

EXECUTABLES = Path(sys.executable).parent  # where `batch-gateway` is installed: the "image" of the pods

# What the tests change so that they run in seconds, not minutes: retry backoffs of one second (which exits are
# retried, and how often, stays as templates/ says; a backoff.maxDuration would become 15 s), and a 10 s runner lease
# instead of 30 s (a killed runner's batch is taken over sooner). Nothing else is changed.
RETRY_BACKOFF = {"duration": "1s", "factor": 1}
RETRY_MAX_DURATION = "15s"
RUNNER_LEASE_SECONDS = "10"
# The API also allows one-minute batches, and stops a Workflow 15 s past its batch's expiry (not 2 h): a hung runner
# meets its deadline within a test.
SHORT_WINDOW = "1m"
DEADLINE_GRACE_SECONDS = "15"


def rendered_templates() -> list[dict[str, Any]]:
    """templates/ as `kubectl kustomize` renders it, with the test's shorter retry backoffs, and no replicas of the
    API Deployment: the Gateway runs the API as a process of its own (the chart's test runs it in a pod)."""
    result = subprocess.run(
        [paths.kubectl(), "kustomize", str(REPO / "templates")], capture_output=True, text=True, timeout=60, check=True
    )
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    for obj in objects:
        if obj["kind"] == "Deployment":
            obj["spec"]["replicas"] = 0
        if obj["kind"] == "WorkflowTemplate":
            for template in obj["spec"]["templates"]:
                backoff = (template.get("retryStrategy") or {}).get("backoff")
                if backoff:
                    backoff.update(RETRY_BACKOFF)
                    if "maxDuration" in backoff:
                        backoff["maxDuration"] = RETRY_MAX_DURATION
                    if "cap" in backoff:
                        backoff["cap"] = RETRY_BACKOFF["duration"]
    return objects


@pytest.fixture(scope="session")
def s3_session() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


@pytest.fixture(scope="package")
def control_plane(tmp_path_factory) -> Iterator[ControlPlane]:
    base_env = host_environment() | {"PATH": f"{EXECUTABLES}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), base_env=base_env)
    archive = create_test_database()
    try:
        plane.start()
        plane.start_argo(archive)
        yield plane
    finally:
        plane.stop()
        drop_test_database(archive)


class Gateway:
    """templates/ applied to the control plane, their Secret, the model Service, and the API process."""

    def __init__(self, plane: ControlPlane, s3: S3Server, sim: SimServer, root: Path) -> None:
        self.plane = plane
        self.root = root
        self.objects = rendered_templates()
        self.config = next(o for o in self.objects if o["metadata"]["name"] == "batch-gateway-config")["data"]
        bucket = self.config["BATCH_GATEWAY_OBJECT_STORE"].removeprefix("s3://").split("/")[0]
        if bucket not in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}:
            s3.create_bucket(bucket)
        self.database = create_test_database()
        self.secret = {
            "BATCH_GATEWAY_DATABASE_URL": self.database,
            "BATCH_GATEWAY_VALKEY_URL": SHARED_URL,
            "BATCH_GATEWAY_VALKEY_PREFIX": unique_prefix(),
            "AWS_ENDPOINT_URL": s3.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": s3.env()["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": s3.env()["AWS_SECRET_ACCESS_KEY"],
            "BATCH_GATEWAY_RUNNER_LEASE_SECONDS": RUNNER_LEASE_SECONDS,
            "BATCH_GATEWAY_UPSTREAM": sim.url,
        }
        self.applied = plane.apply_objects([*self.objects, plane.secret("batch-gateway-secrets", self.secret)])
        # The ConfigMap's upstream is k8s://vllm:http, the ready pods behind a Service. The API server refuses loopback
        # addresses in EndpointSlices (and no dotted name resolves to 127.0.0.1 here), so the Secret points the pods
        # at the simulator directly; test_discovery_with_the_runners_token covers k8s:// against this API server.
        self.api: subprocess.Popen | None = None
        self.api_log = root / "api.log"
        self.client: openai.OpenAI | None = None

    def api_env(self) -> dict[str, str]:
        """What the Deployment gives the API container: the ConfigMap, the Secret, its namespace, and its
        ServiceAccount's token (here through a kubeconfig)."""
        data = self.root / "api-data"
        data.mkdir(exist_ok=True)
        return {
            **self.plane.base_env,
            **self.config,
            **self.secret,
            "BATCH_GATEWAY_ARGO_NAMESPACE": NAMESPACE,
            "POD_NAMESPACE": NAMESPACE,
            "BATCH_GATEWAY_DATA_DIR": str(data),
            "BATCH_GATEWAY_WORK_DIR": str(data / "work"),
            "KUBECONFIG": str(self.plane.kubeconfig_for("batch-gateway-api")),
            "TMPDIR": str(data),
            "BATCH_GATEWAY_COMPLETION_WINDOWS": f"24h,{SHORT_WINDOW}",
            "BATCH_GATEWAY_ARGO_DEADLINE_GRACE_SECONDS": DEADLINE_GRACE_SECONDS,
        }

    def start_api(self) -> openai.OpenAI:
        env = self.api_env()
        keys = subprocess.run(
            [str(EXECUTABLES / "batch-gateway"), "keys", "create", "--tenant", "acme"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        key = next((line for line in keys.stdout.splitlines() if line.startswith("sk-bg-")), None)
        assert key, f"keys create printed no key:\n{keys.stdout}\n{keys.stderr}"
        port = free_port()
        with open(self.api_log, "wb") as log:  # the process writes to its own copy of the descriptor
            self.api = subprocess.Popen(
                [str(EXECUTABLES / "batch-gateway"), "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.api.poll() is None, f"the API exited:\n{self.api_log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the API did not get ready:\n{self.api_log.read_text()}"
            time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        return self.client

    def close(self) -> None:
        if self.api is not None and self.api.poll() is None:
            self.api.send_signal(signal.SIGINT)
            try:
                self.api.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.api.pid, signal.SIGKILL)
                self.api.wait()
        drop_test_database(self.database)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    # Eight sequences at a time, 2 ms a step: a batch of 200 requests of 200 tokens takes about 10 s.
    server = SimServer(SimConfig(time_scale=0.2, max_num_seqs=8, max_num_batched_tokens=8192)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(control_plane, s3_session, sim, tmp_path_factory) -> Iterator[Gateway]:
    gateway = Gateway(control_plane, s3_session, sim, tmp_path_factory.mktemp("gateway"))
    gateway.start_api()
    yield gateway
    gateway.close()
