"""Batches through real Argo Workflows on a real Kubernetes API server (tests/control_plane/), end to end: the
`openai` SDK talks to `batch-gateway serve --executor argo`, which creates Workflows with its own ServiceAccount's
token; Argo's workflow-controller runs them from templates/runner-workflowtemplate.yaml as pods, which the process
kubelet runs as `batch-gateway runner` / `reconcile` processes with the runner's ServiceAccount."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import httpx
import openai
import psycopg
import pytest

from batch_gateway.executor.argo import workflow_name
from batch_gateway.settings import Settings
from tests.control_plane.cluster import NAMESPACE
from tests.control_plane.conftest import DEADLINE_GRACE_SECONDS, SHORT_WINDOW
from tests.helpers import chat_lines, jsonl, wait_for

pytestmark = [pytest.mark.control_plane, pytest.mark.timeout(600)]


def create_batch(client, requests: int, *, window: str = "24h", **line_options) -> str:
    uploaded = client.files.create(file=("input.jsonl", chat_lines(requests, **line_options)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]  # the gateway also allows SHORT_WINDOW
    ).id


def wait_for_workflow(plane, batch_id: str, phases=("Succeeded", "Failed", "Error"), timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        plane.check()
        workflow = plane.workflow(workflow_name(batch_id))
        phase = ((workflow or {}).get("status") or {}).get("phase")
        if phase in phases:
            return workflow
        if time.monotonic() > deadline:
            raise AssertionError(
                f"Workflow of {batch_id} is {phase} after {timeout}s: "
                f"{workflow and workflow.get('status')}\n{plane.diagnostics()}"
            )
        time.sleep(0.3)


def pod_nodes(workflow: dict) -> list[dict]:
    """The Workflow's pods (one per attempt), oldest first."""
    nodes = [n for n in (workflow.get("status") or {}).get("nodes", {}).values() if n["type"] == "Pod"]
    return sorted(nodes, key=lambda n: n.get("startedAt") or "")


def test_a_batch_completes_and_the_argo_server_lists_it(gateway):
    client, plane = gateway.client, gateway.plane
    batch_id = create_batch(client, 20)

    workflow = wait_for_workflow(plane, batch_id)

    assert workflow["status"]["phase"] == "Succeeded", workflow["status"]
    assert [(n["templateName"], n["phase"]) for n in pod_nodes(workflow)] == [
        ("run", "Succeeded"),
        ("reconcile", "Succeeded"),
    ]
    batch = wait_for(client, batch_id, timeout=30)
    assert batch.status == "completed", batch
    results = jsonl(client.files.content(batch.output_file_id).content)
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(20))
    assert plane.kubelet.denied == []  # the runner's ServiceAccount could do all it needed
    # The Argo server lists it as the UI would: titled by the batch id, described by tenant and model.
    listed = httpx.get(
        f"{plane.argo_server_url}/api/v1/workflows/{NAMESPACE}",
        params={"listOptions.labelSelector": f"batch-gateway/batch-id={batch_id}"},
        timeout=10,
    ).json()
    (item,) = listed["items"]
    assert item["metadata"]["annotations"]["workflows.argoproj.io/title"] == batch_id
    # The API submits before the runner has read the model from the input file: no empty "model ``" then.
    assert item["metadata"]["annotations"]["workflows.argoproj.io/description"] == "tenant **acme**"
    # podGC: OnPodSuccess deletes the succeeded pods (and the kubelet lets them go).
    selector = f"workflows.argoproj.io/workflow={workflow_name(batch_id)}"
    wait_until(
        lambda: not plane.core.list_namespaced_pod(NAMESPACE, label_selector=selector).items,
        "podGC",
        timeout=60,
        plane=plane,
    )


# --- helpers for the scenarios below ------------------------------------------------------------------------------


def runner_pods(plane, batch_id: str, template: str = "run") -> list:
    """The kubelet's runs of a batch's `template` pods, oldest first."""
    runs = plane.kubelet.runs({"workflows.argoproj.io/workflow": workflow_name(batch_id)})
    return [r for r in runs if f"-{template}-" in r.name]  # Argo names pods <workflow>-<template>-<hash>


def runners_stopped(plane, batch_id: str) -> bool:
    """Whether every runner pod of the batch has ended; if not, its Workflow's pods are deleted (again)."""
    runs = runner_pods(plane, batch_id)
    if runs and all(r.done.is_set() for r in runs):
        return True
    selector = f"workflows.argoproj.io/workflow={workflow_name(batch_id)}"
    plane.core.delete_collection_namespaced_pod(NAMESPACE, label_selector=selector)
    return False


def wait_until(condition, what: str, timeout: float = 60, plane=None, batch_id: str | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if plane is not None:
            plane.check()
        if time.monotonic() > deadline:
            nodes = ""
            if plane is not None and batch_id is not None:
                workflow = plane.workflow(workflow_name(batch_id)) or {}
                nodes = "\n".join(
                    f"{n['displayName']}: {n['phase']} {n.get('message', '')}" for n in pod_nodes(workflow)
                )
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}\n{nodes}"
                + (f"\n{plane.diagnostics()}" if plane else "")
            )
        time.sleep(0.2)


def completed_lines(client, batch_id: str) -> int:
    batch = client.batches.retrieve(batch_id)
    return batch.request_counts.completed if batch.request_counts else 0


def exactly_once(client, batch, n: int) -> None:
    results = jsonl(client.files.content(batch.output_file_id).content) if batch.output_file_id else []
    errors = jsonl(client.files.content(batch.error_file_id).content) if batch.error_file_id else []
    ids = [r["custom_id"] for r in results + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(n)), f"{len(ids)} lines, {len(set(ids))} distinct"


# --- cancel, crashes, retries -----------------------------------------------------------------------------------------


def test_cancel_stops_the_workflow_and_the_exit_handler_ends_the_batch_cancelled(gateway):
    client, plane = gateway.client, gateway.plane
    batch_id = create_batch(client, 200, max_tokens=200)
    wait_until(lambda: completed_lines(client, batch_id) > 0, "the first results", plane=plane)

    assert client.batches.cancel(batch_id).status in ("cancelling", "cancelled")
    workflow = wait_for_workflow(plane, batch_id)

    assert workflow["spec"]["shutdown"] == "Stop"  # not Terminate, which would skip the exit handler
    runs = [(n["templateName"], n["phase"]) for n in pod_nodes(workflow)]
    assert runs[0][0] == "run" and [t for t, _ in runs].count("run") == 1, runs  # a stopped Workflow is not retried
    assert ("reconcile", "Succeeded") in runs, runs
    batch = wait_for(client, batch_id, timeout=30)
    assert batch.status == "cancelled", batch
    assert 0 < batch.request_counts.completed < 200
    results = jsonl(client.files.content(batch.output_file_id).content)
    assert len(results) == len({r["custom_id"] for r in results}) == batch.request_counts.completed


async def test_a_stopped_workflow_signals_the_runner_and_the_exit_handler_finishes_the_batch(gateway):
    """`spec.shutdown: Stop` without a cancel (as `argo stop` does): the controller signals the runner pod through the
    API server's exec (`argoexec kill 15 1`, to the kubelet), starts no retry, and the exit handler resumes the
    batch from the checkpoints and completes it."""
    from batch_gateway.executor.argo import ArgoExecutor
    from batch_gateway.settings import Settings

    client, plane = gateway.client, gateway.plane
    batch_id = create_batch(client, 200, max_tokens=200)
    wait_until(lambda: completed_lines(client, batch_id) > 0, "the first results", plane=plane)
    (pod,) = runner_pods(plane, batch_id)
    api_client = plane.api_client_for("batch-gateway-api")
    try:
        await ArgoExecutor(Settings(argo_namespace=NAMESPACE), api_client=api_client).cancel(batch_id)  # Stop only
    finally:
        api_client.close()

    workflow = wait_for_workflow(plane, batch_id, timeout=180)

    assert pod.signals[:1] == [signal.SIGTERM] and pod.returncode == 75, (pod.signals, pod.returncode)
    assert [n["templateName"] for n in pod_nodes(workflow)].count("run") == 1  # a stopped Workflow is not retried
    batch = wait_for(client, batch_id, timeout=60)
    assert batch.status == "completed", batch
    exactly_once(client, batch, 200)


def test_a_killed_runner_is_retried_and_resumes_every_line_exactly_once(gateway):
    """SIGKILL (a crash, OOM) and then SIGTERM (a node shutting down: the runner checkpoints and exits 75) mid-batch:
    retryStrategy starts a new pod each time, and the last one finishes from the checkpoints. The first kill comes
    after the batch has run longer than the test's scaled backoff.maxDuration would allow: a long batch is retried
    too."""
    client, plane = gateway.client, gateway.plane
    n = 300
    batch_id = create_batch(client, n, max_tokens=300)
    started = time.monotonic()
    for sig, expected_exit in ((9, 137), (15, 75)):
        done_before = completed_lines(client, batch_id)
        wait_until(
            lambda done_before=done_before: completed_lines(client, batch_id) > done_before + 5
            and time.monotonic() - started > 17,
            "progress",
            plane=plane,
        )
        (pod,) = wait_until(
            lambda: [r for r in runner_pods(plane, batch_id) if not r.done.is_set()],
            "a running runner pod",
            timeout=30,
            plane=plane,
            batch_id=batch_id,
        )
        os.killpg(pod.process.pid, sig)
        wait_until(pod.done.is_set, f"the runner pod to end after signal {sig}", plane=plane)
        assert (
            pod.returncode is not None
            and (128 - pod.returncode if pod.returncode < 0 else pod.returncode) == expected_exit
        ), plane.kubelet.log_of(pod.name)[-3000:]

    workflow = wait_for_workflow(plane, batch_id, timeout=180)

    assert workflow["status"]["phase"] == "Succeeded", workflow["status"]
    attempts = [n for n in pod_nodes(workflow) if n["templateName"] == "run"]
    assert [a["phase"] for a in attempts] == ["Failed", "Failed", "Succeeded"], attempts
    batch = wait_for(client, batch_id, timeout=30)
    assert batch.status == "completed", batch
    exactly_once(client, batch, n)


def sql(gateway, statement: str, *params) -> int:
    """Run one statement on the gateway's database (to play a runner or the clock); returns the rows it touched."""
    with psycopg.connect(gateway.database, autocommit=True) as connection:
        return connection.execute(statement, params).rowcount


def test_a_runner_that_finds_the_batch_leased_is_retried_until_the_lease_ends(gateway):
    """Exit 3 (another live runner holds the batch) is not a crash: retryStrategy keeps trying, past the five retries
    a crash gets, and the run that finds the lease gone finishes the batch."""
    client, plane = gateway.client, gateway.plane
    batch_id = create_batch(client, 10)
    held = sql(
        gateway,
        "UPDATE batches SET runner_owner = 'another-runner', lease_until = %s WHERE id = %s AND runner_owner IS NULL",
        int(time.time()) + 3600,
        batch_id,
    )
    assert held == 1, "the runner claimed the batch before the test could"

    def seven_attempts_exited_3() -> bool:
        phase = (plane.workflow(workflow_name(batch_id)).get("status") or {}).get("phase")
        assert phase in (None, "Pending", "Running"), (
            f"the Workflow gave up: {plane.workflow(workflow_name(batch_id))['status']}"
        )
        return sum(r.returncode == 3 for r in runner_pods(plane, batch_id)) >= 7

    try:
        wait_until(seven_attempts_exited_3, "seven attempts that exit 3", timeout=180, plane=plane)
    finally:
        sql(gateway, "UPDATE batches SET runner_owner = NULL, lease_until = NULL WHERE id = %s", batch_id)

    workflow = wait_for_workflow(plane, batch_id, timeout=120)

    assert workflow["status"]["phase"] == "Succeeded", workflow["status"]
    batch = wait_for(client, batch_id, timeout=30)
    assert batch.status == "completed", batch
    exactly_once(client, batch, 10)


def test_a_hung_runner_hits_the_deadline_and_the_exit_handler_ends_the_batch(gateway):
    """A runner that hangs (SIGSTOP) never expires its batch itself. The Workflow's own activeDeadlineSeconds (its
    batch's one-minute window plus the fixture's grace) stops the step, Argo runs the exit handler, and `reconcile`
    ends the batch `expired` with its partial results, once the hung runner's lease has run out."""
    client, plane = gateway.client, gateway.plane
    batch_id = create_batch(client, 200, window=SHORT_WINDOW, max_tokens=200)
    workflow = wait_for_workflow(plane, batch_id, phases=("Running",))
    assert workflow["spec"]["activeDeadlineSeconds"] <= 60 + int(DEADLINE_GRACE_SECONDS)  # the batch's, not 26 h
    wait_until(lambda: completed_lines(client, batch_id) > 0, "the first results", plane=plane)
    # The counts include results not yet durable: a few checkpoints later, some are (the batch takes ~10 s in all).
    time.sleep(4 * Settings().checkpoint_interval)
    (pod,) = runner_pods(plane, batch_id)
    os.killpg(pod.process.pid, signal.SIGSTOP)
    try:
        workflow = wait_for_workflow(plane, batch_id, timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pod.process.pid, signal.SIGKILL)  # never leave it stopped, holding a slot, whatever happened

    run_node = next(n for n in pod_nodes(workflow) if n["templateName"] == "run")
    assert run_node["phase"] == "Failed" and "deadline" in run_node["message"], run_node
    assert [n["phase"] for n in pod_nodes(workflow) if n["templateName"] == "reconcile"][-1] == "Succeeded"
    batch = wait_for(client, batch_id, timeout=30)
    assert batch.status == "expired", batch
    assert 0 < batch.request_counts.completed < 200
    exactly_once(client, batch, 200)  # partial results, and a batch_expired line for every other request


def test_the_semaphore_caps_the_batches_running_at_once(gateway):
    client, plane = gateway.client, gateway.plane
    plane.kubectl("patch", "configmap", "batch-gateway-limits", "--type", "merge", "-p", '{"data": {"runners": "1"}}')
    try:
        batch_ids = [create_batch(client, 30, max_tokens=60) for _ in range(3)]
        most_running, most_waiting = 0, 0
        deadline = time.monotonic() + 240
        while not all(
            ((plane.workflow(workflow_name(b)) or {}).get("status") or {}).get("phase") == "Succeeded"
            for b in batch_ids
        ):
            plane.check()
            running = sum(1 for b in batch_ids for r in runner_pods(plane, b) if not r.done.is_set())
            phases = [((plane.workflow(workflow_name(b)) or {}).get("status") or {}).get("phase") for b in batch_ids]
            most_running = max(most_running, running)
            most_waiting = max(most_waiting, phases.count("Pending"))
            assert time.monotonic() < deadline, f"not all done: {phases}\n{plane.diagnostics()}"
            time.sleep(0.2)
    finally:
        plane.kubectl(
            "patch", "configmap", "batch-gateway-limits", "--type", "merge", "-p", '{"data": {"runners": "4"}}'
        )
    assert most_running == 1
    assert most_waiting == 2  # the other two waited for the lock, Pending
    for batch_id in batch_ids:
        assert wait_for(client, batch_id, timeout=30).status == "completed"


def test_the_api_admits_workflows_and_holds_the_rest_back_with_the_real_controller(gateway):
    """BATCH_GATEWAY_MAX_CONCURRENT_RUNNERS (4, from the ConfigMap) at once: the others wait in the API without a
    Workflow, and start as slots free up; Argo runs Workflows carrying the API's priority and deadline."""
    client, plane = gateway.client, gateway.plane
    batch_ids = [create_batch(client, 30, max_tokens=60) for _ in range(7)]
    most_held_back, most_live = 0, 0
    deadline = time.monotonic() + 300
    while True:
        plane.check()
        batches = {b: client.batches.retrieve(b) for b in batch_ids}
        if all(b.status in ("completed", "failed", "expired", "cancelled") for b in batches.values()):
            break
        workflows = {b: plane.workflow(workflow_name(b)) for b in batch_ids}
        phases = [((w or {}).get("status") or {}).get("phase") for w in workflows.values() if w]
        most_live = max(most_live, sum(1 for p in phases if p not in ("Succeeded", "Failed", "Error")))
        held = [b for b, w in workflows.items() if w is None and batches[b].status == "validating"]
        for b in held:  # waiting in the API: validating, nothing done
            assert batches[b].request_counts.total == 0
        most_held_back = max(most_held_back, len(held))
        assert time.monotonic() < deadline, f"not all done: {phases}\n{plane.diagnostics()}"
        time.sleep(0.3)
    assert most_held_back >= 2, "the API created every Workflow at once"
    assert most_live <= 5  # four, plus one a gc pass might admit in the same instant (it decides on its own)
    for batch_id in batch_ids:
        assert client.batches.retrieve(batch_id).status == "completed"
        spec = plane.workflow(workflow_name(batch_id))["spec"]
        batch = client.batches.retrieve(batch_id)
        assert spec["priority"] == 2**31 - 1 - batch.expires_at
        assert 0 < spec["activeDeadlineSeconds"] <= 86400 + 7200


def run_gc(plane) -> dict:
    """One gc pass now, as the CronWorkflow's next tick would start it: `argo submit --from cronwf/...` through the
    Argo server."""
    env = {
        **plane.base_env,
        "ARGO_SERVER": plane.argo_server_url.removeprefix("http://"),
        "ARGO_HTTP1": "true",
        "ARGO_SECURE": "false",
        "ARGO_NAMESPACE": NAMESPACE,
        "ARGO_TOKEN": "Bearer unused",
    }  # the CLI wants one; a server in `--auth-mode server` ignores it
    result = subprocess.run(
        [str(plane.binaries["argo"]), "submit", "--from", "cronwf/batch-gateway-gc", "-o", "name"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    name = result.stdout.strip().split("/")[-1]
    deadline = time.monotonic() + 120
    while ((workflow := plane.workflow(name)) or {}).get("status", {}).get("phase") not in (
        "Succeeded",
        "Failed",
        "Error",
    ):
        plane.check()
        assert time.monotonic() < deadline, (
            f"gc Workflow {name}: {workflow and workflow.get('status')}\n{plane.diagnostics()}"
        )
        time.sleep(0.3)
    assert workflow["status"]["phase"] == "Succeeded", workflow["status"]
    return workflow


def test_gc_resubmits_deleted_workflows_expires_overdue_batches_and_deletes_expired_files(gateway, s3_session):
    client, plane = gateway.client, gateway.plane
    # Two batches whose Workflows are deleted mid-run (the runner pods go with them); one is also overdue. Each
    # takes about 30 s alone: a batch of 200 tokens a line once finished while CI waited for the other's first results.
    kept, overdue = create_batch(client, 200, max_tokens=600), create_batch(client, 200, max_tokens=600)
    for batch_id in (kept, overdue):
        wait_until(lambda batch_id=batch_id: completed_lines(client, batch_id) > 0, "the first results", plane=plane)
    for batch_id in (kept, overdue):
        plane.kubectl("delete", "workflow", workflow_name(batch_id), "--wait=false")
    for batch_id in (kept, overdue):
        # The controller may still retry a runner it saw stopped before it saw its Workflow go (one CI run: attempt
        # "(1)" started after the delete); that pod goes by the garbage collector. On a loaded machine a batch once
        # ran to its end before its pods went (one CI run: `completed` below), so the test deletes the Workflow's pods
        # too, as the collector would, until none is left running.
        wait_until(lambda batch_id=batch_id: runners_stopped(plane, batch_id), "the runner pods to be gone", 180, plane)
        assert client.batches.retrieve(batch_id).status == "in_progress"
        wait_until(
            lambda batch_id=batch_id: sql(
                gateway, "SELECT 1 FROM batches WHERE id = %s AND runner_owner IS NULL", batch_id
            ),
            "the lease to be released",
            plane=plane,
        )
    sql(gateway, "UPDATE batches SET expires_at = %s WHERE id = %s", int(time.time()) - 1, overdue)
    # A file past its expiry.
    expiring = client.files.create(
        file=("old.jsonl", chat_lines(2)),
        purpose="batch",
        extra_body={"expires_after": {"anchor": "created_at", "seconds": 3600}},
    )
    sql(gateway, "UPDATE files SET expires_at = %s WHERE id = %s", int(time.time()) - 1, expiring.id)

    run_gc(plane)

    for batch_id, status in ((kept, "completed"), (overdue, "expired")):
        workflow = wait_for_workflow(plane, batch_id, timeout=180)
        annotations = workflow["metadata"]["annotations"]
        assert annotations["batch-gateway/run"] == "1"  # a new Workflow, not a replaced one
        assert annotations["workflows.argoproj.io/description"] == "tenant **acme** · model `sim-model`"  # now known
        batch = wait_for(client, batch_id, timeout=60)
        assert batch.status == status, batch
        exactly_once(client, batch, 200)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(expiring.id)


# --- RBAC and discovery with the gateway's own ServiceAccounts --------------------------------------------------------


def can_i(plane, account: str, verb: str, resource: str) -> bool:
    result = plane.kubectl(
        "auth",
        "can-i",
        verb,
        resource,
        "--namespace",
        NAMESPACE,
        "--as",
        f"system:serviceaccount:{NAMESPACE}:{account}",
        check=False,
    )
    return result.stdout.strip() == "yes"


@pytest.mark.parametrize(
    "account, allowed, denied",
    [
        (
            "batch-gateway-api",
            ["create workflows.argoproj.io", "patch workflows.argoproj.io", "delete workflows.argoproj.io"],
            [
                "get secrets",
                "create pods",
                "create workflowtaskresults.argoproj.io",
                "list endpointslices.discovery.k8s.io",
                "create workflows.argoproj.io --all-namespaces",
            ],
        ),
        (
            "batch-gateway-runner",
            [
                "create workflowtaskresults.argoproj.io",
                "patch workflowtaskresults.argoproj.io",
                "list endpointslices.discovery.k8s.io",
            ],
            ["create workflows.argoproj.io", "get secrets", "get configmaps", "delete pods"],
        ),
        (
            "batch-gateway-gc",
            ["create workflows.argoproj.io", "delete workflows.argoproj.io", "create workflowtaskresults.argoproj.io"],
            ["get secrets", "create pods", "list endpointslices.discovery.k8s.io"],
        ),
    ],
)
def test_each_service_account_may_do_what_its_code_needs_and_no_more(gateway, account, allowed, denied):
    for what in allowed:
        assert can_i(gateway.plane, account, *what.split(" ", 1)), f"{account} may not {what}"
    for what in denied:
        verb, rest = what.split(" ", 1)
        resource, *flags = rest.split()
        result = gateway.plane.kubectl(
            "auth",
            "can-i",
            verb,
            resource,
            "--namespace",
            NAMESPACE,
            *flags,
            "--as",
            f"system:serviceaccount:{NAMESPACE}:{account}",
            check=False,
        )
        assert result.stdout.strip() == "no", f"{account} may {what}"


async def test_discovery_with_the_runners_token(gateway):
    """k8s:// upstreams against the real API server, as the runner's ServiceAccount: the ready pods of a Service.
    (The addresses are never contacted; the API server refuses loopback ones, so TEST-NET addresses stand in.)"""
    from batch_gateway.upstreams.discovery import discover_endpoints

    plane = gateway.plane
    plane.apply_objects(
        [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "models", "namespace": NAMESPACE},
                "spec": {"ports": [{"name": "http", "port": 8000, "protocol": "TCP"}]},
            },
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "models-a",
                    "namespace": NAMESPACE,
                    "labels": {"kubernetes.io/service-name": "models"},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
                "endpoints": [
                    {"addresses": ["192.0.2.2"], "conditions": {"ready": True}},
                    {"addresses": ["192.0.2.3"], "conditions": {"ready": False}},
                ],
            },
        ]
    )
    api_client = plane.api_client_for("batch-gateway-runner")
    try:
        assert await discover_endpoints(NAMESPACE, "models", "http", api_client=api_client) == ["http://192.0.2.2:8000"]
    finally:
        api_client.close()
