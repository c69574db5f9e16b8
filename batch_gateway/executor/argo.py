"""The Argo executor: one Argo Workflow per batch, created through the Kubernetes API.

The Workflow only references the runner WorkflowTemplate (`templates/runner-workflowtemplate.yaml`) and passes the
batch id, tenant and model as parameters; everything else (image, resources, retries, deadlines, the concurrency
semaphore, the exit handler) lives in the template. This is what `argo submit --from workflowtemplate/...` does, and it
passes a controller configured with `templateReferencing: Strict`. Why the `kubernetes` client and not the PyPI
`argo-workflows` SDK: docs/kubernetes.md.

- admission: a Workflow is created only for a batch that may run now (`admission.py`: earliest deadline first within
  weighted fair sharing between tenants, `--max-concurrent-runners` at once); the others wait in the API, in the
  database, and every admission pass (each submit, and every few seconds in `serve`) starts the next ones as runner
  Workflows end. It counts the runner Workflows that have not completed, so every API replica (and gc) decides from
  the same state. Each Workflow carries a `priority` that orders any queue Argo keeps itself (the template's
  semaphore, a backstop) by deadline too, and an `activeDeadlineSeconds` that follows the batch's own window.
- submit: the Workflow's name is derived from the batch id, so a retried create answers 409 AlreadyExists and nothing
  runs twice. A Workflow that already finished while the batch still is not terminal (the runner and the exit handler
  both died) is replaced by a fresh one, up to MAX_RUNS times; then the batch ends `failed` (`cancelled` if its tenant
  cancelled it) without its files (when the executor has the metadata store) instead of being retried forever: the
  tenant reads that its results could not be published, the operator's log names the Workflow and why it failed.
- cancel: a merge patch `spec.shutdown: Stop`. Argo stops the runner pod (SIGTERM: it checkpoints and exits) and runs
  the exit handler, which finalises the batch as cancelled with its partial results. (`Terminate` would skip it.)
- state: the Workflow's `status.phase`, for the reconciler.

The kubernetes client is synchronous, so every call runs in a worker thread. Transient API failures (connection errors,
429, 5xx) are retried with exponential backoff; when retries run out an `ArgoError` says what failed and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from batch_gateway import admission, wire
from batch_gateway.admission import Place, Plan, Running, SlotUsage, Waiting
from batch_gateway.errors import StorageUnavailable
from batch_gateway.executor.base import Executor, RunState, end_unpublished
from batch_gateway.executor.kube import LABEL_VALUE_MAX, is_label_value, load_api_client
from batch_gateway.settings import Settings
from batch_gateway.store.metadata import MetadataStore

GROUP = "argoproj.io"
VERSION = "v1alpha1"
PLURAL = "workflows"

LABEL_BATCH_ID = "batch-gateway/batch-id"
LABEL_TENANT = "batch-gateway/tenant"
LABEL_MODEL = "batch-gateway/model"
ANNOTATION_BATCH_ID = "batch-gateway/batch-id"
ANNOTATION_TENANT = "batch-gateway/tenant"
ANNOTATION_RUN = "batch-gateway/run"  # 1 for the first Workflow of a batch, +1 for every replacement

MAX_RUNS = 3  # Workflows per batch (each with the template's own pod retries and exit handler)
COMPLETED_PHASES = frozenset({"Succeeded", "Failed", "Error"})
TRANSIENT_STATUSES = frozenset({0, 408, 429, 500, 502, 503, 504})
MAX_BACKOFF = 8.0
ADMISSION_INTERVAL = 3.0  # seconds between admission passes in `serve`: a finished runner's slot is taken this fast
MAX_PRIORITY = 2**31 - 1  # Workflow priority is an int32; an earlier deadline gets a higher one

_BATCH_ID = re.compile(r"^batch_([0-9a-f]{1,60})$")

log = structlog.get_logger("executor.argo")


class ArgoError(RuntimeError):
    """The Kubernetes API refused or could not take a request about a batch's Workflow."""


def workflow_name(batch_id: str) -> str:
    """A DNS-1123 name for the batch's Workflow: `bg-<hex>` for our `batch_<hex>` ids, a digest for anything else."""
    match = _BATCH_ID.match(batch_id)
    if match:
        return "bg-" + match.group(1)
    return "bg-" + hashlib.blake2b(batch_id.encode(), digest_size=16).hexdigest()


def label_value(value: str) -> str:
    """`value` if Kubernetes accepts it as a label value; otherwise a readable, still unique stand-in."""
    if is_label_value(value):
        return value
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[: LABEL_VALUE_MAX - 13].strip("-_.")
    digest = hashlib.blake2b(value.encode(), digest_size=4).hexdigest()
    return f"{cleaned}-{digest}" if cleaned else digest


class ArgoExecutor(Executor):
    def __init__(
        self,
        settings: Settings,
        metadata: MetadataStore | None = None,
        *,
        api_client: client.ApiClient | None = None,
        attempts: int = 5,
        backoff: float = 0.5,
        request_timeout: tuple[float, float] = (5.0, 30.0),
    ) -> None:
        self.namespace = settings.argo_namespace
        self.template = settings.argo_template
        self.deadline_grace = settings.argo_deadline_grace_seconds
        self.metadata = metadata
        self.attempts = attempts
        self.backoff = backoff
        self.request_timeout = request_timeout
        self._api_client = api_client
        self._owns_client = api_client is None
        self._api: client.CustomObjectsApi | None = None
        # Admission holds Workflows back in the API; without the metadata store (or with no slots), every submit
        # creates its Workflow at once and the template's semaphore alone caps the runs.
        self.slots = settings.max_concurrent_runners if metadata is not None else 0
        self._admitting = asyncio.Lock()
        self._plan = Plan([], [])
        self._usage = SlotUsage(settings.fair_share_window)
        self.fifo = settings.admission_order == "fifo"
        self._admitter: asyncio.Task | None = None

    # --- Executor --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._objects()  # a missing kubeconfig fails now, with its reason, not at the first batch
        if self.slots > 0 and self._admitter is None:  # waiting batches start as runner Workflows end
            self._admitter = asyncio.create_task(self._admit_loop())

    async def stop(self) -> None:
        if self._admitter is not None:
            self._admitter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._admitter
            self._admitter = None
        if self._owns_client and self._api_client is not None:
            await asyncio.to_thread(self._api_client.close)
            self._api_client = None
            self._api = None

    async def submit(self, batch_id: str, *, tenant: str, model: str | None = None, deadline: float = math.inf) -> None:
        if self.slots > 0 and await self._get(workflow_name(batch_id)) is None:
            await self.admit()  # a new batch: it starts when admission lets it
            return
        await self._launch(batch_id, tenant=tenant, model=model, deadline=deadline)

    def queue_place(self, batch_id: str) -> Place | None:
        return self._plan.place_of(batch_id)

    def queue(self) -> list[Place]:
        return list(self._plan.queue)

    async def admit(self, now: float | None = None) -> Plan:
        """One admission pass: create the Workflows of the waiting batches that may start now (those being cancelled
        or past their deadline at once: their runner only ends them), and note the order of the others."""
        async with self._admitting:
            now = time.time() if now is None else now
            workflows = await self._runner_workflows()
            live = {b: phase for b, (phase, _) in workflows.items()}
            active = await self.metadata.batches_with_status(wire.ACTIVE_STATUSES)  # type: ignore[union-attr]
            running_ids = [b.id for b in active if live.get(b.id, "") not in COMPLETED_PHASES and b.id in live]
            policies = await self.metadata.tenant_policies()  # type: ignore[union-attr]
            forecasts = await self.metadata.forecasts(running_ids)  # type: ignore[union-attr]
            running, waiting = [], []
            for batch in active:
                if batch.id not in live:
                    if admission.needs_runner_now(batch, now):
                        await self._launch(batch.id, tenant=batch.tenant, model=batch.model, deadline=batch.expires_at)
                    else:
                        waiting.append(Waiting.of(batch))
                elif batch.id in running_ids:
                    forecast = forecasts.get(batch.id)
                    started = batch.in_progress_at or batch.created_at
                    running.append(Running(batch.tenant, started, forecast.projected_end_at if forecast else None))
            # A Workflow whose batch has ended may still run its exit handler: it holds its slot (and the template's
            # semaphore) for those few seconds more.
            active_ids = {b.id for b in active}
            for batch_id, (phase, tenant) in workflows.items():
                if batch_id not in active_ids and phase not in COMPLETED_PHASES:
                    running.append(Running(tenant, None, now))
            usage = self._usage.observe(Counter(r.tenant for r in running), now)
            plan = admission.plan(waiting, running, self.slots, policies, now, usage, fifo=self.fifo)
            for batch in plan.start:
                await self._launch(batch.batch_id, tenant=batch.tenant, model=batch.model, deadline=batch.deadline)
            self._plan = plan
            if plan.queue:
                log.info("argo.admission", started=len(plan.start), waiting=len(plan.queue), running=len(running))
            return plan

    async def _admit_loop(self) -> None:
        while True:
            try:
                await self.admit()
            except (ArgoError, StorageUnavailable) as exc:  # the next pass tries again
                log.warning("argo.admission_failed", error=str(exc))
            except Exception:
                log.exception("argo.admission_failed")
            await asyncio.sleep(ADMISSION_INTERVAL)

    async def _runner_workflows(self) -> dict[str, tuple[str, str]]:
        """Batch id -> (phase, tenant) of every runner Workflow in the namespace (phase "" before the controller has
        seen it)."""
        selector = "app.kubernetes.io/component=runner,app.kubernetes.io/managed-by=batch-gateway"
        try:
            listed = await self._call(
                "list", self._objects().list_namespaced_custom_object, *self._collection, label_selector=selector
            )
        except ApiException as exc:
            raise self._error("list the runner Workflows", exc) from exc
        found: dict[str, tuple[str, str]] = {}
        for workflow in listed.get("items", []):
            annotations = workflow.get("metadata", {}).get("annotations") or {}
            batch_id = annotations.get(ANNOTATION_BATCH_ID)
            if batch_id and not workflow["metadata"].get("deletionTimestamp"):
                phase = (workflow.get("status") or {}).get("phase") or ""
                found[batch_id] = (phase, annotations.get(ANNOTATION_TENANT, ""))
        return found

    async def _launch(self, batch_id: str, *, tenant: str, model: str | None, deadline: float) -> None:
        """Create the batch's Workflow (or see that it exists, or replace a finished one)."""
        name = workflow_name(batch_id)
        run = 1
        for _ in range(MAX_RUNS + 2):  # room for a replacement racing another submitter
            body = self.workflow_body(batch_id, tenant=tenant, model=model, run=run, deadline=deadline)
            try:
                await self._call("create", self._objects().create_namespaced_custom_object, *self._collection, body)
                log.info("argo.submitted", batch_id=batch_id, workflow=name, namespace=self.namespace, run=run)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise self._error(f"create Workflow {name} for batch {batch_id}", exc) from exc
            existing = await self._get(name)
            if existing is None:
                continue  # deleted between our create and our get: create it again
            meta = existing.get("metadata", {})
            if meta.get("deletionTimestamp"):
                await asyncio.sleep(self.backoff)  # still being deleted: the name frees up shortly
                continue
            phase = (existing.get("status") or {}).get("phase") or ""
            if phase not in COMPLETED_PHASES:
                log.info("argo.already_submitted", batch_id=batch_id, workflow=name, phase=phase or "new")
                return
            # The Workflow finished but the batch is still not terminal: its runner and exit handler both died.
            finished_run = _run_number(existing)
            if finished_run >= MAX_RUNS:
                await self._give_up(batch_id, name, existing)
                return
            run = finished_run + 1
            log.warning("argo.replacing_finished_workflow", batch_id=batch_id, workflow=name, phase=phase, run=run)
            await self._delete(name, uid=meta.get("uid"))
        raise ArgoError(f"could not create Workflow {name} for batch {batch_id}: it kept changing under us; try again")

    async def cancel(self, batch_id: str) -> None:
        name = workflow_name(batch_id)
        patch = {"spec": {"shutdown": "Stop"}}
        try:
            await self._call("stop", self._objects().patch_namespaced_custom_object, *self._collection, name, patch)
        except ApiException as exc:
            if exc.status == 404:
                log.info("argo.cancel_without_workflow", batch_id=batch_id, workflow=name)
                if self.slots > 0:
                    await self.admit()  # held back: a cancelled batch gets its runner at once, to end it
                return
            raise self._error(f"stop Workflow {name} of batch {batch_id}", exc) from exc
        log.info("argo.stopped", batch_id=batch_id, workflow=name)

    async def state(self, batch_id: str) -> RunState:
        if self._plan.place_of(batch_id) is not None:
            return RunState.RUNNING  # waiting for a slot: it will be, as admission decides
        workflow = await self._get(workflow_name(batch_id))
        if workflow is None or workflow.get("metadata", {}).get("deletionTimestamp"):
            return RunState.UNKNOWN
        phase = (workflow.get("status") or {}).get("phase") or ""
        if phase == "Succeeded":
            return RunState.FINISHED
        if phase in ("Failed", "Error"):
            return RunState.FAILED
        return RunState.RUNNING  # "" (the controller has not seen it yet), Pending (e.g. semaphore), Running

    # --- the Workflow object ---------------------------------------------------------------------

    def workflow_body(
        self, batch_id: str, *, tenant: str, model: str | None, run: int = 1, deadline: float = math.inf
    ) -> dict[str, Any]:
        labels = {
            "app.kubernetes.io/name": "batch-gateway",
            "app.kubernetes.io/component": "runner",
            "app.kubernetes.io/part-of": "batch-gateway",
            "app.kubernetes.io/managed-by": "batch-gateway",
            LABEL_BATCH_ID: label_value(batch_id),
            LABEL_TENANT: label_value(tenant),
        }
        if model:
            labels[LABEL_MODEL] = label_value(model)
        spec: dict[str, Any] = {}
        if math.isfinite(deadline):
            # Earlier deadlines first in any queue Argo keeps (its semaphore); Unix seconds fit an int32 until 2038.
            spec["priority"] = max(0, MAX_PRIORITY - int(deadline))
            spec["activeDeadlineSeconds"] = max(60, int(deadline - time.time()) + self.deadline_grace)
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Workflow",
            "metadata": {
                "name": workflow_name(batch_id),
                "namespace": self.namespace,
                "labels": labels,
                # exact values, whatever characters they hold (labels may have been shortened)
                "annotations": {ANNOTATION_BATCH_ID: batch_id, ANNOTATION_TENANT: tenant, ANNOTATION_RUN: str(run)},
            },
            "spec": {
                "workflowTemplateRef": {"name": self.template},
                "arguments": {
                    "parameters": [
                        {"name": "batch_id", "value": batch_id},
                        {"name": "tenant", "value": tenant},
                        {"name": "model", "value": model or ""},
                    ]
                },
                **spec,
            },
        }

    # --- Kubernetes API calls --------------------------------------------------------------------

    @property
    def _collection(self) -> tuple[str, str, str, str]:
        return GROUP, VERSION, self.namespace, PLURAL

    def _objects(self) -> client.CustomObjectsApi:
        if self._api is None:
            if self._api_client is None:
                self._api_client = load_api_client()
            self._api = client.CustomObjectsApi(self._api_client)
        return self._api

    async def _call(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one API call in a thread, retrying transient failures with exponential backoff. Non-transient
        ApiExceptions (404, 409, 403, 422...) are raised at once for the caller to interpret."""
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return await asyncio.to_thread(method, *args, _request_timeout=self.request_timeout, **kwargs)
            except Exception as exc:
                if not _transient(exc):
                    raise
                if attempt == self.attempts:
                    raise ArgoError(
                        f"Kubernetes API {what} failed {attempt} times in namespace {self.namespace}: {_describe(exc)}"
                    ) from exc
                log.warning("argo.api_retry", what=what, attempt=attempt, error=_describe(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
        raise AssertionError("unreachable")

    async def _get(self, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("get", self._objects().get_namespaced_custom_object, *self._collection, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._error(f"read Workflow {name}", exc) from exc

    async def _delete(self, name: str, *, uid: str | None) -> None:
        # The uid precondition makes sure we delete the finished Workflow we looked at, never a newer one.
        options: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self._call(
                "delete", self._objects().delete_namespaced_custom_object, *self._collection, name, body=options
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return  # already gone, or already replaced by someone else
            raise self._error(f"delete finished Workflow {name}", exc) from exc

    async def _give_up(self, batch_id: str, name: str, workflow: dict[str, Any]) -> None:
        status = workflow.get("status") or {}
        reason = f"phase {status.get('phase')}" + (f": {status['message']}" if status.get("message") else "")
        # The Workflow, its namespace and Argo's message are for the operator; the tenant reads `UNPUBLISHED`.
        log.error(
            "argo.gave_up",
            batch_id=batch_id,
            workflow=name,
            namespace=self.namespace,
            runs=MAX_RUNS,
            reason=reason,
            logs=f"argo logs -n {self.namespace} {name}",
        )
        if self.metadata is not None:
            await end_unpublished(self.metadata, batch_id)

    def _error(self, what: str, exc: ApiException) -> ArgoError:
        hint = {
            401: "the API server rejected our credentials",
            403: f"the ServiceAccount lacks permission on workflows.argoproj.io in namespace {self.namespace} "
            "(see templates/role-workflows.yaml)",
            404: f"namespace {self.namespace} or the Argo Workflow CRD does not exist (is Argo Workflows installed?)",
            422: "the API server rejected the Workflow as invalid",
        }.get(exc.status, "")
        return ArgoError(f"cannot {what}: {_describe(exc)}" + (f" ({hint})" if hint else ""))


def _run_number(workflow: dict[str, Any]) -> int:
    try:
        return int(workflow.get("metadata", {}).get("annotations", {}).get(ANNOTATION_RUN, "1"))
    except ValueError:
        return 1


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUSES
    return isinstance(exc, (urllib3.exceptions.HTTPError, OSError))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        message = ""
        try:
            message = json.loads(exc.body or "{}").get("message", "")
        except (ValueError, AttributeError):
            message = str(exc.body or "")[:200]
        return f"HTTP {exc.status} {exc.reason}" + (f": {message}" if message else "")
    return f"{type(exc).__name__}: {exc}"
