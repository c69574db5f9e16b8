"""`helm install` of charts/batch-gateway on the test control plane (tests/control_plane/), a batch through it with the
`openai` SDK, and `helm uninstall`.

`helm` is the pinned build of scripts/install-tools.sh. It installs with server-side apply and Strict field
validation (Helm 4's defaults for install; `--server-side` is given anyway), so an object that the API server or
Argo's CRDs refuse (an unknown or misspelled field, a wrong type) fails the install: the second test installs copies
of the chart with one misspelled field and checks that. `--wait` waits for the API Deployment to be available, for
real: kube-controller-manager's deployment and ReplicaSet controllers create its pod, the process kubelet runs
`batch-gateway serve` in it (on the pod's own loopback address, which `--host 0.0.0.0` becomes) and marks it Ready
only once the chart's startupProbe (/health) and readinessProbe (/ready) answer. Before that, the pre-install hook Job
(job controller, process kubelet) creates the first API key, which the test reads from the Job's log as NOTES.txt
says (`kubectl logs job/...`, the process kubelet serving the log) before deleting the Job, as NOTES.txt also says.

The SDK talks to the pod's address and the port its Service targets (there are no Service IPs here). The API runs
with the chart's ConfigMap, the Secret and its ServiceAccount's token, and submits the batch's Workflow from the
chart's runner WorkflowTemplate; Argo's controller runs it with the chart's runner ServiceAccount.

The release lives in the namespace of the kustomize-based tests, because Argo's controller and the process kubelet
serve that one namespace, under its own release name: its objects are all `chart-batch-gateway-...`, and nothing of
the kustomize install (`batch-gateway-...`) is used or changed. (The chart's API Service and Deployment select the
same labels as the kustomize base's, since the chart is one install per namespace; the base's Deployment has no
replicas on this control plane, see conftest.rendered_templates.)

Values: the Secret and the values point the pods at the test's PostgreSQL database, Redis prefix, moto S3 bucket and
simulator, as the Gateway fixture does; one API replica, to spare the machine; and a gc schedule that does not fire
while the test runs. Nothing else differs from the chart's defaults (no shorter backoffs: the batch is not retried).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from batch_gateway.executor.argo import workflow_name
from tests.control_plane import paths
from tests.control_plane.cluster import NAMESPACE, ControlPlane
from tests.control_plane.test_real_argo import create_batch, pod_nodes, wait_for_workflow
from tests.fixtures.postgres import create_test_database, drop_test_database
from tests.fixtures.redis import SHARED_URL, unique_prefix
from tests.fixtures.s3 import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY
from tests.helpers import jsonl, wait_for
from tests.infra import tools

pytestmark = [pytest.mark.control_plane, pytest.mark.timeout(600)]

CHART = paths.REPO / "charts" / "batch-gateway"
RELEASE = "chart"
FULLNAME = f"{RELEASE}-batch-gateway"  # what the chart calls the release's objects
INSTANCE = "app.kubernetes.io/instance"
# Every kind the chart installs, and what it leads to (pods, ReplicaSets, Workflows): for "is anything left?".
KINDS = (
    "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,configmaps,secrets,jobs,"
    "workflowtemplates.argoproj.io,cronworkflows.argoproj.io,workflows.argoproj.io"
)


class Helm:
    """The pinned helm, with the control plane's admin kubeconfig and folders of its own."""

    def __init__(self, plane: ControlPlane, home: Path) -> None:
        self.plane = plane
        self.binary = str(tools.require("helm"))
        self.env = {
            **plane.base_env,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.binary, *args, "--namespace", NAMESPACE, "--kubeconfig", str(self.plane.admin_kubeconfig)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def __call__(self, *args: str, timeout: float = 300) -> str:
        result = self.run(*args, timeout=timeout)
        assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout


@pytest.fixture(scope="module")
def helm(control_plane, tmp_path_factory) -> Helm:
    return Helm(control_plane, tmp_path_factory.mktemp("helm"))


def leftovers(plane: ControlPlane, release: str, names: list[str]) -> set[str]:
    """What the server still has of `release` (as `kubectl get -o name` names it): the objects in `names`, every
    object of KINDS with the release's instance label, and Helm's record of the release (its Secrets)."""
    named = plane.kubectl("get", *names, "--ignore-not-found", "-o", "name").stdout if names else ""
    labelled = plane.kubectl("get", KINDS, "-l", f"{INSTANCE}={release}", "-o", "name").stdout
    record = plane.kubectl("get", "secrets", "-l", f"owner=helm,name={release}", "-o", "name").stdout
    return set(named.split()) | set(labelled.split()) | set(record.split())


def wait_gone(plane: ControlPlane, release: str, names: list[str], keep: set[str] | None = None) -> None:
    """Wait until nothing of `release` but `keep` is left (the garbage collector removes the dependents)."""
    deadline = time.monotonic() + 60
    while (left := leftovers(plane, release, names) - (keep or set())) and time.monotonic() < deadline:
        plane.check()
        time.sleep(0.5)
    assert not left, f"left of release {release} after helm uninstall: {sorted(left)}\n{diagnostics(plane)}"


def missing_from(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Where `actual` (the object as the server keeps it) lacks or changed what `expected` (as rendered) sets."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where}: {actual!r} instead of a mapping"]
        return [m for k, v in expected.items() for m in missing_from(v, actual.get(k), f"{where}.{k}")]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{where}: {actual!r} instead of {expected!r}"]
        return [
            m
            for i, (e, a) in enumerate(zip(expected, actual, strict=True))
            for m in missing_from(e, a, f"{where}[{i}]")
        ]
    return [] if expected == actual else [f"{where}: {actual!r} instead of {expected!r}"]


def diagnostics(plane: ControlPlane) -> str:
    """What explains an install or a batch that did not go through: the pods, the kubelet's logs and errors."""
    parts = [plane.kubectl("get", "deployments,replicasets,jobs,pods", "-o", "wide", check=False).stdout]
    for run in plane.kubelet.runs({INSTANCE: RELEASE}):
        log = (run.directory / "main.log").read_text(errors="replace")[-3000:] if run.directory.exists() else ""
        parts.append(f"--- pod {run.name} (exit {run.returncode}) ---\n{log}")
    manager = next(p for p in plane.processes if p.name == "kube-controller-manager")
    parts.append(f"--- kube-controller-manager ---\n{manager.tail(2000)}")
    return "\n".join([*parts, plane.diagnostics()])


def test_helm_install_runs_a_batch_through_the_chart_and_uninstall_removes_it(
    helm, control_plane, s3_session, sim, tmp_path
):
    plane = control_plane
    database = create_test_database()
    bucket = s3_session.create_bucket()
    secret = plane.secret(
        f"{FULLNAME}-secrets",
        {
            "BATCH_GATEWAY_DATABASE_URL": database,
            "BATCH_GATEWAY_VALKEY_URL": SHARED_URL,
            "BATCH_GATEWAY_VALKEY_PREFIX": unique_prefix(),
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        },
    )
    values = {
        "upstream": sim.url,
        "objectStore": {"url": f"s3://{bucket}/objects", "region": REGION, "endpoint": s3_session.endpoint},
        "api": {"replicas": 1},
        "gc": {"schedule": "0 0 1 1 *"},
        "bootstrapKey": {"tenant": "acme"},
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    plane.apply_objects([secret])
    uninstalled = False
    try:
        started = time.monotonic()
        result = helm.run(
            "install", RELEASE, str(CHART), "-f", str(values_file), "--server-side", "--wait", "--timeout", "4m"
        )
        assert result.returncode == 0, f"helm install failed:\n{result.stdout}\n{result.stderr}\n{diagnostics(plane)}"
        install_seconds = time.monotonic() - started

        # The server holds every object of the release, and its hook, as rendered, each applied server-side (with
        # Strict field validation).
        manifest = [o for o in yaml.safe_load_all(helm("get", "manifest", RELEASE)) if o]
        hooks = [o for o in yaml.safe_load_all(helm("get", "hooks", RELEASE)) if o]
        assert {o["kind"] for o in manifest} >= {"Deployment", "Service", "WorkflowTemplate", "CronWorkflow", "Role"}
        assert [(o["kind"], o["metadata"]["name"]) for o in hooks] == [("Job", f"{FULLNAME}-bootstrap-key")]
        for rendered in manifest + hooks:
            kind, name = rendered["kind"], rendered["metadata"]["name"]
            found = json.loads(plane.kubectl("get", f"{kind}/{name}", "-o", "json", "--show-managed-fields").stdout)
            assert any(f["operation"] == "Apply" for f in found["metadata"]["managedFields"]), f"{kind}/{name}"
            lost = missing_from(rendered, found, kind)
            assert not lost, f"{kind}/{name} is not on the server as the chart renders it:\n  " + "\n  ".join(lost)
        deployment = json.loads(plane.kubectl("get", f"deployment/{FULLNAME}-api", "-o", "json").stdout)
        assert deployment["status"]["availableReplicas"] == 1, deployment["status"]

        # The first API key, as NOTES.txt says: from the bootstrap Job's log; then the Job is deleted.
        notes = helm("get", "notes", RELEASE).splitlines()
        (command,) = [line.strip() for line in notes if "logs job/" in line]
        command = command.replace("kubectl", f"{paths.kubectl()} --kubeconfig {plane.admin_kubeconfig}", 1)
        printed = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
        keys = printed.stdout.split()
        assert len(keys) == 1 and keys[0].startswith("sk-bg-"), f"{command}:\n{printed.stdout}{printed.stderr}"
        key = keys[0]
        plane.kubectl("delete", f"job/{FULLNAME}-bootstrap-key", "--wait")

        # The API pod, where the Service would send the request: its address and the port its Service targets.
        service = json.loads(plane.kubectl("get", f"service/{FULLNAME}-api", "-o", "json").stdout)["spec"]
        selector = ",".join(f"{k}={v}" for k, v in service["selector"].items())
        (pod,) = json.loads(plane.kubectl("get", "pods", "-l", selector, "-o", "json").stdout)["items"]
        assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"
        (container,) = pod["spec"]["containers"]
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == service["ports"][0]["targetPort"]]
        client = openai.OpenAI(base_url=f"http://{pod['status']['podIP']}:{port}/v1", api_key=key, max_retries=0)

        batch_id = create_batch(client, 5)
        workflow = wait_for_workflow(plane, batch_id, timeout=180)

        assert workflow["spec"]["workflowTemplateRef"] == {"name": f"{FULLNAME}-runner"}, workflow["spec"]
        assert workflow["metadata"]["labels"][INSTANCE] == RELEASE  # the chart's workflowMetadata
        stored = workflow["status"]["storedWorkflowTemplateSpec"]
        assert stored["serviceAccountName"] == f"{FULLNAME}-runner"
        assert workflow["status"]["phase"] == "Succeeded", f"{workflow['status']}\n{diagnostics(plane)}"
        assert [(n["templateName"], n["phase"]) for n in pod_nodes(workflow)] == [
            ("run", "Succeeded"),
            ("reconcile", "Succeeded"),
        ]
        batch = wait_for(client, batch_id, timeout=30)
        assert batch.status == "completed", batch
        results = jsonl(client.files.content(batch.output_file_id).content)
        assert sorted(r["custom_id"] for r in results) == [f"req-{i}" for i in range(5)]
        assert plane.kubelet.denied == []  # the chart's runner ServiceAccount could do all it needed

        # helm uninstall: every object of the release goes, with the Deployment its ReplicaSet and pod, and Helm's
        # record. What stays is the batch's Workflow: run history, not part of the release, deleted by its
        # ttlStrategy.
        helm("uninstall", RELEASE, "--wait", "--timeout", "2m")
        uninstalled = True
        names = [f"{o['kind']}/{o['metadata']['name']}" for o in manifest]
        wait_gone(plane, RELEASE, names, keep={f"workflow.argoproj.io/{workflow_name(batch_id)}"})
        api_runs = [r for r in plane.kubelet.runs({INSTANCE: RELEASE}) if r.name == pod["metadata"]["name"]]
        assert [r.done.is_set() for r in api_runs] == [True], "the API process has stopped"
        print(f"helm install --wait took {install_seconds:.1f} s")
    finally:
        if not uninstalled:  # whatever of the release got in (an install that failed still leaves some)
            helm.run("uninstall", RELEASE, "--wait", "--timeout", "2m", "--ignore-not-found")
        plane.kubectl("delete", "secret", secret["metadata"]["name"], "--ignore-not-found")
        plane.kubectl("delete", "job", f"{FULLNAME}-bootstrap-key", "--ignore-not-found")
        drop_test_database(database)


@pytest.mark.parametrize(
    "template, field, misspelt",
    [
        ("deployment-api.yaml", "revisionHistoryLimit:", "revisionHistoryLimits:"),  # the Kubernetes API's schema
        ("runner-workflowtemplate.yaml", "  podGC:", "  podGc:"),  # Argo's CRD
    ],
)
def test_an_object_the_server_refuses_fails_the_install(helm, control_plane, tmp_path, template, field, misspelt):
    """The check above is only as strict as the install: a chart with one misspelled field does not install."""
    chart = tmp_path / "batch-gateway"
    shutil.copytree(CHART, chart)  # the dashboard's symlink copied as the file it points to
    source = (chart / "templates" / template).read_text()
    assert source.count(field) == 1
    (chart / "templates" / template).write_text(source.replace(field, misspelt))
    release = "broken"
    try:
        # No API pods (no Secret for them), and no gc while it exists.
        result = helm.run(
            "install", release, str(chart), "--set", "api.replicas=0", "--set", "gc.schedule=0 0 1 1 *", "--server-side"
        )
        assert result.returncode != 0, f"the API server accepted {misspelt}:\n{result.stdout}"
        assert misspelt.strip().rstrip(":") in result.stderr, result.stderr
        print(result.stderr)
    finally:
        helm.run("uninstall", release, "--wait", "--timeout", "1m", "--ignore-not-found")
    wait_gone(control_plane, release, [])
