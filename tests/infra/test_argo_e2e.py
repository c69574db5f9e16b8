"""End to end on the manifests themselves: the API from templates/deployment-api.yaml creates a Workflow through the
Argo executor in the fake Kubernetes API; a stand-in for the Argo controller (tests/fakes/argo_controller.py) resolves
it against templates/runner-workflowtemplate.yaml and runs its containers' command, args and environment (from the
ConfigMap in templates/ and a Secret) as local processes, against PostgreSQL, Valkey/Redis, an S3 server and a
simulator reached through `k8s://` discovery. This proves the template really launches the runner and its exit
handler, and that cancel (`spec.shutdown: Stop`) ends as Argo would end it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
import yaml

from batch_gateway.executor.argo import ArgoExecutor, workflow_name
from batch_gateway.executor.base import RunState
from batch_gateway.runner.discovery import parse_k8s_url
from batch_gateway.settings import Settings
from batch_gateway.sim import SimConfig, SimServer
from tests.fakes.argo_controller import LocalArgoController, WorkflowRun, pod_environment
from tests.fakes.kube_api import KubeAPIServer
from tests.fixtures.postgres import create_test_database, drop_test_database, postgres_available
from tests.fixtures.redis import SHARED_URL, unique_prefix
from tests.fixtures.s3 import S3Server, s3_server
from tests.helpers import chat_lines, free_port, jsonl, wait_for

REPO = Path(__file__).resolve().parents[2]
NS = "batch-gateway"
EXECUTABLES = Path(sys.executable).parent  # where `batch-gateway` is installed, as the image's PATH has it


def redis_available() -> bool:
    host, port = urlsplit(SHARED_URL).hostname, urlsplit(SHARED_URL).port
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(
    not (postgres_available() and redis_available()), reason="needs PostgreSQL on 127.0.0.1:5432 and Redis on 6379"
)


def template_objects() -> list[dict]:
    """The objects of templates/kustomization.yaml, namespaced as `kubectl apply -k` would."""
    kustomization = yaml.safe_load((REPO / "templates" / "kustomization.yaml").read_text())
    objects = []
    for name in kustomization["resources"]:
        for obj in yaml.safe_load_all((REPO / "templates" / name).read_text()):
            obj["metadata"]["namespace"] = kustomization["namespace"]
            objects.append(obj)
    return objects


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        yield server


class Cluster:
    """The fake API, the controller stand-in, the API process and everything they talk to."""

    def __init__(self, tmp_path: Path, s3: S3Server, sim: SimServer) -> None:
        self.objects = template_objects()
        self.config = next(o for o in self.objects if o["metadata"]["name"] == "batch-gateway-config")["data"]
        bucket = urlsplit(self.config["BATCH_GATEWAY_OBJECT_STORE"]).netloc
        if bucket not in {b["Name"] for b in s3.client().list_buckets()["Buckets"]}:
            s3.create_bucket(bucket)
        self.database = create_test_database()
        self.kube = KubeAPIServer(namespaces={NS}).start()
        # The upstream in the ConfigMap (k8s://SERVICE:PORT_NAME) resolves, through EndpointSlices, to the simulator.
        ref = parse_k8s_url(self.config["BATCH_GATEWAY_UPSTREAM"], default_namespace=NS)
        self.kube.api.put(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": f"{ref.service}-abcde", "namespace": NS, "labels": {"kubernetes.io/service-name": ref.service}},
                "addressType": "IPv4",
                "ports": [{"name": ref.port, "port": sim.port, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
            }
        )
        secret = {
            "BATCH_GATEWAY_DATABASE_URL": self.database,
            "BATCH_GATEWAY_VALKEY_URL": SHARED_URL,
            "BATCH_GATEWAY_VALKEY_PREFIX": unique_prefix(),
            "AWS_ENDPOINT_URL": s3.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": s3.env()["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": s3.env()["AWS_SECRET_ACCESS_KEY"],
        }
        base_env = pod_environment() | {"KUBECONFIG": str(self.kube.write_kubeconfig(tmp_path / "kubeconfig", NS))}
        self.controller = LocalArgoController(
            self.kube,
            NS,
            self.objects,
            secrets={"batch-gateway-secrets": secret},
            root=tmp_path / "pods",
            base_env=base_env,
            executables=EXECUTABLES,
        )
        self.api: subprocess.Popen | None = None
        self.api_log = tmp_path / "api.log"

    def start_api(self) -> openai.OpenAI:
        """Create a key as the bootstrap Job does, then start the API container of the Deployment, on loopback."""
        deployment = next(o for o in self.objects if o["kind"] == "Deployment")
        pod_spec = deployment["spec"]["template"]["spec"]
        container = pod_spec["containers"][0]
        argv, env, pod_dir = self.controller.prepare(pod_spec, container, "batch-gateway-api-0", {})
        keys = subprocess.run([argv[0], "keys", "create", "--tenant", "acme"], env=env, cwd=pod_dir, capture_output=True, text=True, timeout=60)
        key = next((line for line in keys.stdout.splitlines() if line.startswith("sk-bg-")), None)
        assert key, f"keys create printed no key:\n{keys.stdout}\n{keys.stderr}"
        port = free_port()
        argv[argv.index("--host") + 1] = "127.0.0.1"  # the manifest listens on 0.0.0.0; tests stay on loopback
        argv[argv.index("--port") + 1] = str(port)
        self.api = subprocess.Popen(argv, env=env, cwd=pod_dir, stdout=open(self.api_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            assert self.api.poll() is None, f"the API exited:\n{self.api_log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the API did not get ready:\n{self.api_log.read_text()}"
            time.sleep(0.2)
        return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)

    def workflow_of(self, batch_id: str, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while (workflow := self.kube.api.get("workflows", NS, workflow_name(batch_id))) is None:
            assert time.monotonic() < deadline, f"no Workflow for {batch_id}:\n{self.api_log.read_text()[-3000:]}"
            time.sleep(0.1)
        return workflow

    def run_in_background(self, name: str) -> tuple[threading.Thread, dict]:
        outcome: dict = {}

        def target() -> None:
            try:
                outcome["run"] = self.controller.run(name)
            except BaseException as exc:  # surfaced by the test
                outcome["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread, outcome

    def executor(self) -> ArgoExecutor:
        return ArgoExecutor(Settings(argo_namespace=NS), api_client=self.kube.api_client(), backoff=0.05)

    def close(self) -> None:
        if self.api is not None and self.api.poll() is None:
            self.api.send_signal(signal.SIGINT)
            try:
                self.api.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.api.pid, signal.SIGKILL)
                self.api.wait()
        self.kube.stop()
        drop_test_database(self.database)


@pytest.fixture
def cluster_factory(tmp_path, s3) -> Iterator:
    made: list[tuple[Cluster, SimServer]] = []

    def make(**sim_config) -> Cluster:
        sim = SimServer(SimConfig(**sim_config)).start()
        cluster = Cluster(tmp_path, s3, sim)
        made.append((cluster, sim))
        return cluster

    yield make
    for cluster, sim in made:
        cluster.close()
        sim.stop()


def logs(run: WorkflowRun) -> str:
    return "\n".join(f"--- {r.template} exit {r.exit_code}\n{r.log.read_text()[-4000:]}" for r in run.runs)


def create_batch(client: openai.OpenAI, requests: int, **line_options) -> str:
    uploaded = client.files.create(file=("input.jsonl", chat_lines(requests, **line_options)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h").id


async def test_a_batch_runs_as_a_workflow_from_the_template(cluster_factory):
    cluster = cluster_factory(time_scale=0.02)
    client = cluster.start_api()
    batch_id = create_batch(client, 20)
    workflow = cluster.workflow_of(batch_id)
    assert workflow["spec"]["workflowTemplateRef"]["name"] == cluster.config["BATCH_GATEWAY_ARGO_TEMPLATE"]

    run = cluster.controller.run(workflow["metadata"]["name"])

    assert run.phase == "Succeeded", logs(run)
    assert [(r.template, r.exit_code) for r in run.runs] == [("run", 0), ("reconcile", 0)], logs(run)
    assert run.runs[0].argv[1:] == ["runner", "--batch-id", batch_id]
    batch = wait_for(client, batch_id, timeout=30)
    assert batch.status == "completed", batch
    results = jsonl(client.files.content(batch.output_file_id).content)
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(20))
    # what the Argo UI lists: the workflowMetadata of the template, filled in with this batch
    annotations = cluster.kube.api.get("workflows", NS, workflow["metadata"]["name"])["metadata"]["annotations"]
    assert annotations["workflows.argoproj.io/title"] == batch_id
    assert "acme" in annotations["workflows.argoproj.io/description"]
    assert workflow["metadata"]["labels"]["batch-gateway/tenant"] == "acme"
    assert await cluster.executor().state(batch_id) == RunState.FINISHED


async def test_cancel_stops_the_workflow_and_the_batch_ends_cancelled(cluster_factory):
    cluster = cluster_factory(time_scale=1.0)
    client = cluster.start_api()
    batch_id = create_batch(client, 60, max_tokens=100)
    thread, outcome = cluster.run_in_background(cluster.workflow_of(batch_id)["metadata"]["name"])
    wait_for(client, batch_id, statuses={"in_progress"}, timeout=30)

    assert client.batches.cancel(batch_id).status in ("cancelling", "cancelled")
    thread.join(90)

    assert not thread.is_alive() and "error" not in outcome, outcome
    run: WorkflowRun = outcome["run"]
    workflow = cluster.kube.api.get("workflows", NS, workflow_name(batch_id))
    assert workflow["spec"]["shutdown"] == "Stop", "the API stops the Workflow (not Terminate, which skips onExit)"
    assert [r.template for r in run.runs] == ["run", "reconcile"], logs(run)  # no retry after a stop
    assert run.of("reconcile")[0].exit_code == 0, logs(run)
    batch = wait_for(client, batch_id, timeout=30)
    assert batch.status == "cancelled", batch
    assert batch.request_counts.completed < 60


async def test_a_stopped_runner_is_finished_by_the_exit_handler(cluster_factory):
    """Stop the Workflow while the batch runs (as `argo stop` would): the runner is SIGTERMed, checkpoints and exits;
    Argo does not retry a stopped Workflow, so the exit handler resumes the batch from the checkpoints."""
    cluster = cluster_factory(time_scale=1.0)
    client = cluster.start_api()
    batch_id = create_batch(client, 40, max_tokens=60)
    thread, outcome = cluster.run_in_background(cluster.workflow_of(batch_id)["metadata"]["name"])
    deadline = time.monotonic() + 30
    while (batch := client.batches.retrieve(batch_id)).request_counts is None or batch.request_counts.completed == 0:
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)

    await cluster.executor().cancel(batch_id)  # spec.shutdown: Stop, without cancelling the batch
    thread.join(120)

    assert not thread.is_alive() and "error" not in outcome, outcome
    run: WorkflowRun = outcome["run"]
    runner, reconcile = run.of("run"), run.of("reconcile")
    assert len(runner) == 1 and runner[0].stopped and runner[0].exit_code != 0, logs(run)
    assert len(reconcile) == 1 and reconcile[0].exit_code == 0, logs(run)
    batch = wait_for(client, batch_id, timeout=30)
    assert batch.status == "completed", batch
    results = jsonl(client.files.content(batch.output_file_id).content)
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(40))  # each exactly once
