"""The Argo executor's own logic against a loopback fake of the Kubernetes API (tests/fakes/kube_api.py): fast unit
tests of names, idempotent submits, retries of transient failures, clear errors, replaced Workflows.

The fake validates every Workflow the executor creates or patches against Argo's CRD schema made strict, so a
misspelled field fails these tests the way it would fail against a real API server with the full CRDs. The executor
against a real API server and real Argo: tests/control_plane/test_real_argo.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from batch_gateway import ids
from batch_gateway.executor.argo import MAX_RUNS, ArgoError, ArgoExecutor, label_value, workflow_name
from batch_gateway.executor.base import RunState
from batch_gateway.executor.kube import DNS1123_LABEL, is_label_value
from batch_gateway.settings import Settings
from batch_gateway.store.metadata import BatchRecord
from batch_gateway.store.sqlite import SqliteStore
from tests.fakes.kube_api import KubeAPIServer
from tests.helpers import free_port

NAMESPACE = "batch-gateway"
TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


@pytest.fixture
def kube():
    with KubeAPIServer(namespaces={NAMESPACE}) as server:
        yield server


def make_executor(kube: KubeAPIServer, **kwargs) -> ArgoExecutor:
    settings = Settings(argo_namespace=kwargs.pop("namespace", NAMESPACE), argo_template="batch-gateway-runner")
    return ArgoExecutor(settings, kwargs.pop("metadata", None), api_client=kube.api_client(), backoff=0.01, **kwargs)


@pytest.fixture
async def executor(kube):
    executor = make_executor(kube)
    await executor.start()
    yield executor
    await executor.stop()


def the_workflow(kube: KubeAPIServer, batch_id: str) -> dict:
    workflow = kube.api.get("workflows", NAMESPACE, workflow_name(batch_id))
    assert workflow is not None, f"no Workflow for {batch_id}: {kube.api.workflows(NAMESPACE)}"
    return workflow


# --- names and labels ----------------------------------------------------------------------------


def test_workflow_names_are_dns1123_and_deterministic():
    batch_id = ids.new_batch_id()
    assert workflow_name(batch_id) == "bg-" + batch_id.removeprefix("batch_")
    for odd in ("batch_ABC", "Batch With Spaces", "x" * 300, "batch_" + "f" * 64):
        name = workflow_name(odd)
        assert DNS1123_LABEL.match(name) and len(name) <= 63, name
        assert workflow_name(odd) == name
    assert workflow_name("batch_ABC") != workflow_name("batch_abc")


@pytest.mark.parametrize("value", ["acme", "Acme Corp", "ünïcode/tenant", "-edge-", "a" * 100, "___", "x.y_z-1"])
def test_label_values_are_always_valid(value):
    label = label_value(value)
    assert is_label_value(label), label
    if is_label_value(value):
        assert label == value
    assert label_value(value + "!") != label  # still tells tenants apart


# --- submit ----------------------------------------------------------------------------------------


async def test_submit_creates_a_workflow_from_the_template(kube, executor):
    batch_id = ids.new_batch_id()
    await executor.submit(batch_id, tenant="Acme Corp", model="sim-model")
    workflow = the_workflow(kube, batch_id)
    assert workflow["spec"] == {
        "workflowTemplateRef": {"name": "batch-gateway-runner"},
        "arguments": {
            "parameters": [
                {"name": "batch_id", "value": batch_id},
                {"name": "tenant", "value": "Acme Corp"},
                {"name": "model", "value": "sim-model"},
            ]
        },
    }
    labels = workflow["metadata"]["labels"]
    assert labels["batch-gateway/batch-id"] == batch_id
    assert labels["batch-gateway/model"] == "sim-model"
    assert is_label_value(labels["batch-gateway/tenant"])
    assert workflow["metadata"]["annotations"]["batch-gateway/tenant"] == "Acme Corp"
    assert kube.api.rejected == []


async def test_submit_is_idempotent_even_when_concurrent(kube, executor):
    batch_id = ids.new_batch_id()
    await asyncio.gather(*(executor.submit(batch_id, tenant="t") for _ in range(5)))
    await executor.submit(batch_id, tenant="t")
    assert len(kube.api.workflows(NAMESPACE)) == 1
    posts = [r for r in kube.api.requests if r[0] == "POST"]
    assert len(posts) == 6  # five of them answered 409 AlreadyExists, which counts as done


async def test_transient_api_failures_are_retried(kube, executor):
    kube.api.fail_next(503, 429, 500)
    batch_id = ids.new_batch_id()
    await executor.submit(batch_id, tenant="t")
    assert the_workflow(kube, batch_id)
    assert len(kube.api.requests) == 4


async def test_submission_that_keeps_failing_raises(kube):
    executor = make_executor(kube, attempts=3)
    kube.api.fail_next(503, 503, 503)
    with pytest.raises(ArgoError, match=r"failed 3 times.*503"):
        await executor.submit(ids.new_batch_id(), tenant="t")
    assert kube.api.workflows(NAMESPACE) == []


async def test_missing_namespace_is_a_clear_error(kube):
    executor = make_executor(kube, namespace="nowhere")
    with pytest.raises(ArgoError, match="namespace nowhere"):
        await executor.submit(ids.new_batch_id(), tenant="t")
    assert len(kube.api.requests) == 1  # a 404 is not retried


async def test_unreachable_api_server_raises_after_retries():
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    configuration.retries = 0
    api_client = client.ApiClient(configuration)
    executor = ArgoExecutor(Settings(), api_client=api_client, attempts=2, backoff=0.01)
    try:
        with pytest.raises(ArgoError, match="failed 2 times"):
            await executor.submit(ids.new_batch_id(), tenant="t")
    finally:
        api_client.close()


async def test_the_fake_rejects_what_a_strict_api_server_would(kube):
    """The checks above mean something only if the fake really refuses bad Workflows."""
    api = client.CustomObjectsApi(kube.api_client())
    body = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "bg-bad"},
        "spec": {"workflowTemplateRefs": {"name": "x"}},  # misspelled
    }
    with pytest.raises(ApiException) as caught:
        api.create_namespaced_custom_object("argoproj.io", "v1alpha1", NAMESPACE, "workflows", body)
    assert caught.value.status == 422 and "workflowTemplateRefs" in caught.value.body
    body = {**body, "metadata": {"name": "Bad_Name"}, "spec": {"workflowTemplateRef": {"name": "x"}}}
    with pytest.raises(ApiException) as caught:
        api.create_namespaced_custom_object("argoproj.io", "v1alpha1", NAMESPACE, "workflows", body)
    assert caught.value.status == 422 and "DNS-1123" in caught.value.body


# --- cancel and state ------------------------------------------------------------------------------


async def test_cancel_stops_the_workflow_so_its_exit_handler_runs(kube, executor):
    batch_id = ids.new_batch_id()
    await executor.submit(batch_id, tenant="t")
    await executor.cancel(batch_id)
    assert the_workflow(kube, batch_id)["spec"]["shutdown"] == "Stop"  # not Terminate: that skips onExit
    patches = [r for r in kube.api.requests if r[0] == "PATCH"]
    assert len(patches) == 1
    await executor.cancel(ids.new_batch_id())  # no Workflow (never submitted, or deleted): nothing to stop


async def test_state_follows_the_workflow_phase(kube, executor):
    batch_id = ids.new_batch_id()
    assert await executor.state(batch_id) == RunState.UNKNOWN
    await executor.submit(batch_id, tenant="t")
    assert await executor.state(batch_id) == RunState.RUNNING  # created, not yet seen by the controller
    name = workflow_name(batch_id)
    for phase, expected in [
        ("Pending", RunState.RUNNING),
        ("Running", RunState.RUNNING),
        ("Succeeded", RunState.FINISHED),
        ("Failed", RunState.FAILED),
        ("Error", RunState.FAILED),
    ]:
        kube.api.set_status(NAMESPACE, name, {"phase": phase})
        assert await executor.state(batch_id) == expected, phase


# --- a finished Workflow for an unfinished batch ---------------------------------------------------


@pytest.mark.parametrize(("status", "ended"), [("in_progress", "failed"), ("cancelling", "cancelled")])
async def test_a_finished_workflow_is_replaced_then_the_batch_fails(kube, tmp_path, status, ended):
    """After MAX_RUNS Workflows whose runner and exit handler both died, the batch ends without its files: `failed`,
    or `cancelled` if its tenant cancelled it; what the tenant reads names nothing of Argo or Kubernetes."""
    store = SqliteStore(str(tmp_path / "metadata.sqlite3"))
    await store.open()
    executor = make_executor(kube, metadata=store)
    try:
        batch_id = ids.new_batch_id()
        now = ids.now()
        await store.insert_batch(
            BatchRecord(
                id=batch_id,
                tenant="t",
                endpoint="/v1/chat/completions",
                input_file_id="file-x",
                completion_window="24h",
                status=status,
                created_at=now,
                expires_at=now + 86400,
            )
        )
        await executor.submit(batch_id, tenant="t")
        uids = [the_workflow(kube, batch_id)["metadata"]["uid"]]
        for run in range(2, MAX_RUNS + 1):
            kube.api.set_status(NAMESPACE, workflow_name(batch_id), {"phase": "Failed", "message": "OOMKilled"})
            await executor.submit(batch_id, tenant="t")  # what the reconciler does for a non-terminal batch
            workflow = the_workflow(kube, batch_id)
            assert workflow["metadata"]["annotations"]["batch-gateway/run"] == str(run)
            assert "status" not in workflow
            uids.append(workflow["metadata"]["uid"])
        assert len(set(uids)) == MAX_RUNS
        kube.api.set_status(NAMESPACE, workflow_name(batch_id), {"phase": "Error", "message": "node lost"})
        await executor.submit(batch_id, tenant="t")
        assert the_workflow(kube, batch_id)["metadata"]["uid"] == uids[-1]  # kept for its logs
        batch = await store.get_batch(batch_id, None)
        assert batch.status == ended
        message = batch.errors[0].message
        assert batch.errors[0].code == "runner_failed" and "could not be published" in message
        for internal in ("node lost", NAMESPACE, workflow_name(batch_id), "argo"):
            assert internal not in message.lower()
    finally:
        await store.close()


# --- the executor and the template agree -----------------------------------------------------------


def test_the_template_declares_every_parameter_the_executor_passes():
    template = yaml.safe_load((TEMPLATES / "runner-workflowtemplate.yaml").read_text())
    assert template["metadata"]["name"] == Settings().argo_template
    declared = {p["name"]: p for p in template["spec"]["arguments"]["parameters"]}
    body = ArgoExecutor(Settings(), api_client=object()).workflow_body("batch_ab", tenant="t", model=None)  # type: ignore[arg-type]
    passed = {p["name"] for p in body["spec"]["arguments"]["parameters"]}
    assert passed == set(declared)
    assert all("value" in p or "default" in p for name, p in declared.items() if name != "batch_id")


def test_a_workflow_is_stopped_its_grace_after_its_batch_expires():
    def deadline(settings: Settings, expires_in: float) -> int:
        executor = ArgoExecutor(settings, api_client=object())  # type: ignore[arg-type]
        body = executor.workflow_body("batch_ab", tenant="t", model=None, deadline=time.time() + expires_in)
        return body["spec"]["activeDeadlineSeconds"]

    assert 3600 + 7200 - 2 <= deadline(Settings(), 3600) <= 3600 + 7200
    assert 90 + 15 - 2 <= deadline(Settings(argo_deadline_grace_seconds=15), 90) <= 90 + 15
    assert deadline(Settings(argo_deadline_grace_seconds=0), -30) == 60  # already overdue: a minute to finalise
    no_deadline = ArgoExecutor(Settings(), api_client=object()).workflow_body("batch_ab", tenant="t", model=None)  # type: ignore[arg-type]
    assert "activeDeadlineSeconds" not in no_deadline["spec"]  # the template's own applies


# --- admission: Workflows held back in the API, started in the admission order ---------------------


async def test_workflows_are_held_back_and_created_earliest_deadline_first_fairly_between_tenants(kube, tmp_path):
    store = SqliteStore(str(tmp_path / "metadata.sqlite3"))
    await store.open()
    settings = Settings(argo_namespace=NAMESPACE, max_concurrent_runners=1)
    executor = ArgoExecutor(settings, store, api_client=kube.api_client(), backoff=0.01)
    now = ids.now()
    arrivals = iter(range(100))

    async def batch(tenant: str, window: int) -> str:
        batch_id = ids.new_batch_id()
        created_at = now + next(arrivals)
        record = BatchRecord(
            id=batch_id,
            tenant=tenant,
            endpoint="/v1/chat/completions",
            input_file_id="file-x",
            completion_window="24h",
            status="validating",
            created_at=created_at,
            expires_at=created_at + window,
        )
        await store.insert_batch(record)
        await executor.submit(batch_id, tenant=tenant, deadline=record.expires_at)
        return batch_id

    def created() -> list[str]:
        return [w["metadata"]["annotations"]["batch-gateway/batch-id"] for w in kube.api.workflows(NAMESPACE)]

    clock = iter(range(int(time.time()) + 300, 10**10, 300))  # each run takes ten minutes

    async def finish(batch_id: str) -> None:
        # The batch ends first; its Workflow a moment later, once its exit handler ran: only then is its slot free.
        await store.transition(batch_id, ["validating"], "completed", ids.now())
        kube.api.set_status(NAMESPACE, workflow_name(batch_id), {"phase": "Running"})
        before = len(created())
        await executor.admit(now=next(clock))
        assert len(created()) == before
        kube.api.set_status(NAMESPACE, workflow_name(batch_id), {"phase": "Succeeded"})
        await executor.admit(now=next(clock))

    try:
        a1 = await batch("acme", 86400)
        a2, a3 = await batch("acme", 86400), await batch("acme", 86400)  # acme floods the queue...
        b1 = await batch("globex", 86400)  # ...globex's single batch arrives after it...
        a_urgent = await batch("acme", 3600)  # ...and acme's tight one last
        assert created() == [a1]  # one slot: the others wait in the API, not as Pending Workflows
        assert [p.batch.batch_id for p in executor.queue()] == [b1, a_urgent, a2, a3]
        assert executor.queue_place(b1).position == 1
        await finish(a1)
        assert created()[-1] == b1  # globex's turn: acme just had the slot (FIFO would run a2 and a3 first)...
        await finish(b1)
        assert created()[-1] == a_urgent  # ...then acme's batches, earliest deadline first
        await finish(a_urgent)
        await finish(a2)
        assert created() == [a1, b1, a_urgent, a2, a3]

        urgent = the_workflow(kube, a_urgent)["spec"]
        loose = the_workflow(kube, a2)["spec"]
        assert urgent["priority"] > loose["priority"]  # Argo's own queue (its semaphore) orders by deadline too
        assert 3600 + 7200 - 10 <= urgent["activeDeadlineSeconds"] <= 3600 + 7200 + 10  # its window, not 26 h
        assert kube.api.rejected == []

        # A waiting batch is one the executor will run (the reconciler leaves it alone); being cancelled while it
        # waits, it gets its runner at once, outside the slots, to end it.
        waiting = await batch("globex", 86400)
        assert waiting not in created() and await executor.state(waiting) == RunState.RUNNING
        await store.transition(waiting, ["validating"], "cancelling", ids.now())
        await executor.cancel(waiting)
        assert waiting in created()
    finally:
        await executor.stop()
        await store.close()
