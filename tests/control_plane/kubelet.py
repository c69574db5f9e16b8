"""A process kubelet: runs the pods of one namespace as local processes, for the test control plane.

What it plays, of the kubelet and around it:
- the scheduler: it binds every unscheduled pod of its namespace to its Node (there is no kube-scheduler), and it
  registers that Node: Ready, address 127.0.0.1, its HTTPS port as the kubelet endpoint;
- running a pod: Argo's `init` container has nothing to do (no artifacts) and is reported Completed; the `main`
  container (or a pod's only container) runs as a process. With Argo's emissary executor that is the command after
  `--` (what `argoexec emissary` runs), otherwise the container's command and args. The process gets the environment
  Kubernetes would give the container: `env` (values, `fieldRef`, `configMapKeyRef`, `secretKeyRef`, `$(VAR)`
  references), `envFrom` (ConfigMaps, Secrets), emptyDir volumes as fresh folders (environment values and arguments
  that point into a mount, and TMPDIR for /tmp, are rewritten to the folder), and the pod's projected ServiceAccount
  token (a TokenRequest bound to the pod) with the cluster's CA, handed over as a kubeconfig (KUBECONFIG) because the
  fixed in-pod path /var/run/secrets/kubernetes.io/serviceaccount/ cannot be mounted for a process. Logs go to files
  (`log_of`), which the kubelet API's containerLogs serves (`kubectl logs`);
- the pod's address: each pod gets a loopback address of its own (127.A.B.N, A and B random per kubelet, so that two
  test sessions on one machine do not meet), reported as its podIP; an argument or environment value `0.0.0.0` (every
  interface, which in a pod means the pod's own) becomes that address, so two pods can listen on the same port;
- probes: the main container's `startupProbe` and `readinessProbe` (httpGet only) against the pod's address, with
  their periods and thresholds; the pod and container are Ready only while they pass (no probe: Ready once started);
- pods/status, as a kubelet writes it: phase, conditions, the init, main and wait containers' states with their start
  and finish times and the main container's exit code (128 + the signal when a signal killed it);
- Argo's `wait` container: it creates the pod's WorkflowTaskResult when the pod starts and marks it complete when main
  has exited, as `argoexec wait` does, with the pod's own ServiceAccount token, so the runner's Role is what is tested
  (refusals are kept in `denied`); and, like it, it stops main at ARGO_DEADLINE ("Step exceeded its deadline"): the
  deadline the controller gives retries when `retryStrategy.backoff.maxDuration` is set;
- stopping: the kubelet API's exec endpoint acts on the one command the Argo controller sends to stop a step
  (`argoexec kill SIGNAL 1`, or `kill -SIGNAL 1`) by signalling the main process (no stream is served: the controller
  only logs the answer); a pod being deleted gets SIGTERM, SIGKILL after its grace period, and is then removed; a pod
  past its `activeDeadlineSeconds` is killed and ends Failed with reason DeadlineExceeded.
What it does not play: images (the command is looked up on the host's PATH, where the virtualenv's `batch-gateway`
is), volumes other than emptyDir and the ServiceAccount token, the rest of networking (one loopback interface shared
by every process, so a port bound on 0.0.0.0 by code rather than by an argument is shared too; no cluster DNS, no
Service IPs), resources, securityContext, liveness probes and the restarts a failing probe causes, container restarts
(Argo's pods never restart), following or tailing logs, and node heartbeats (no node lifecycle controller runs).
"""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.control_plane.pki import KeyPair

SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
ARGO_WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
ARGO_NODE_ID = "workflows.argoproj.io/node-id"
ARGO_COMPLETED_LABEL = "workflows.argoproj.io/report-outputs-completed"
_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def host_environment() -> dict[str, str]:
    """This process's environment without what a pod would not inherit (gateway settings, AWS, Kubernetes): the base
    of every process's environment, under what its container spec gives it."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATCH_GATEWAY_", "AWS_", "KUBERNETES_", "KUBECONFIG", "POD_"))
    }


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_code(returncode: int) -> int:
    """What Kubernetes reports for a process: its exit status, or 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode


def argo_deadline(pod: client.V1Pod) -> datetime.datetime | None:
    """ARGO_DEADLINE of the pod's wait container (Argo's zero time means none)."""
    for container in pod.spec.containers:
        for item in container.env or []:
            if item.name == "ARGO_DEADLINE" and item.value and not item.value.startswith("0001-"):
                return datetime.datetime.fromisoformat(item.value.replace("Z", "+00:00"))
    return None


def kill_signal(command: list[str]) -> int | None:
    """The signal in the controller's stop command: `argoexec kill 15 1` or `kill -15 1`."""
    if len(command) >= 3 and command[0].endswith("argoexec") and command[1] == "kill":
        return int(command[2])
    if len(command) >= 3 and command[0] in ("kill", "/bin/kill") and command[1].startswith("-"):
        return int(command[1][1:])
    if len(command) == 3 and command[:2] == ["/bin/sh", "-c"]:
        return kill_signal(command[2].split())
    return None


@dataclass
class Probe:
    """One httpGet probe of a container, against the pod's address: due every `period` seconds after
    `initial_delay`; `passing` flips after `success_threshold` successes or `failure_threshold` failures in a row."""

    url: str
    headers: dict[str, str]
    period: float
    timeout: float
    success_threshold: int
    failure_threshold: int
    next_at: float
    passing: bool = False
    streak: int = 0  # consecutive results that disagree with `passing`

    @classmethod
    def of(cls, spec: client.V1Probe | None, container: client.V1Container, ip: str, started: float) -> Probe | None:
        if spec is None:
            return None
        action = spec.http_get
        if action is None:
            raise RuntimeError(f"container {container.name}: only httpGet probes are played here")
        port = action.port
        if isinstance(port, str) and not port.isdigit():
            port = next((p.container_port for p in container.ports or [] if p.name == port), None)
            if port is None:
                raise RuntimeError(f"container {container.name}: a probe names port {action.port}, which it lacks")
        scheme = (action.scheme or "HTTP").lower()
        return cls(
            url=f"{scheme}://{action.host or ip}:{port}{action.path or '/'}",
            headers={h.name: h.value for h in action.http_headers or []},
            period=float(spec.period_seconds or 10),
            timeout=float(spec.timeout_seconds or 1),
            success_threshold=spec.success_threshold or 1,
            failure_threshold=spec.failure_threshold or 3,
            next_at=started + (spec.initial_delay_seconds or 0),
        )

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def run(self, now: float) -> bool:
        """Probe once (as the kubelet does: any status from 200 to 399 passes); True when `passing` changed."""
        self.next_at = now + self.period
        try:
            response = httpx.get(self.url, headers=self.headers, timeout=self.timeout, verify=False)
            ok = 200 <= response.status_code < 400
        except httpx.HTTPError:
            ok = False
        if ok == self.passing:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= (self.success_threshold if ok else self.failure_threshold):
            self.passing, self.streak = ok, 0
            return True
        return False


class Readiness:
    """Whether a started container is Ready: once its startup probe has passed, while its readiness probe passes."""

    def __init__(self, container: client.V1Container, ip: str, started: float) -> None:
        self.startup = Probe.of(container.startup_probe, container, ip, started)
        self.readiness = Probe.of(container.readiness_probe, container, ip, started)

    @property
    def ready(self) -> bool:
        started = self.startup is None or self.startup.passing
        return started and (self.readiness is None or self.readiness.passing)

    def check(self, now: float) -> bool:
        """Run the probes that are due; True when `ready` changed."""
        before = self.ready
        if self.startup is not None and not self.startup.passing:
            if self.startup.due(now) and self.startup.run(now) and self.readiness is not None:
                self.readiness.next_at = now  # readiness is probed from the moment the container has started
        elif self.readiness is not None and self.readiness.due(now):
            self.readiness.run(now)
        return self.ready != before


@dataclass
class PodRun:
    """One pod on this node: its process, its folders, and how it is being ended."""

    namespace: str
    name: str
    uid: str
    directory: Path
    ip: str  # the pod's own loopback address
    labels: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    started_at: str = ""
    stop_requested: float | None = None  # monotonic time SIGTERM was sent
    grace_seconds: float = 30.0
    deadline_exceeded: bool = False  # the pod's activeDeadlineSeconds
    argo_deadline: datetime.datetime | None = None  # ARGO_DEADLINE, which Argo's wait container enforces
    step_deadline_exceeded: bool = False
    deleting: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    signals: list[int] = field(default_factory=list)  # signals delivered through exec, for the tests
    returncode: int | None = None


class ProcessKubelet:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        server: str,
        ca_file: Path,
        namespace: str,
        root: Path,
        base_env: dict[str, str],
        serving: KeyPair,
        node_name: str = "process-node",
        poll_seconds: float = 0.2,
    ) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.server = server
        self.ca_file = ca_file
        self.namespace = namespace
        self.root = root
        self.base_env = base_env
        self.node_name = node_name
        self.poll_seconds = poll_seconds
        self.pods: dict[str, PodRun] = {}  # by uid
        self.denied: list[str] = []  # API calls the pods' ServiceAccounts were refused
        self.errors: list[str] = []  # what went wrong in the kubelet itself
        self._network = (random.randrange(1, 250), random.randrange(256))  # 127.A.B.x: this kubelet's pod addresses
        self._addresses = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(serving.cert, serving.key)
        self._https = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._https.socket = context.wrap_socket(self._https.socket, server_side=True)
        self._https.daemon_threads = True
        self.port = self._https.server_address[1]

    # --- lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> ProcessKubelet:
        self._register_node()
        for target in (self._https.serve_forever, self._loop):
            thread = threading.Thread(target=target, daemon=True, name=f"kubelet-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._https.shutdown()
        with self._lock:
            runs = list(self.pods.values())
        for run in runs:
            if run.process and run.process.poll() is None:
                os.killpg(run.process.pid, signal.SIGKILL)
        for run in runs:
            run.done.wait(10)

    def log_of(self, pod_name: str) -> str:
        paths = sorted(self.root.glob(f"{pod_name}-*/main.log"))
        return "\n".join(p.read_text(errors="replace") for p in paths)

    def runs(self, labels: dict[str, str]) -> list[PodRun]:
        """The pods this kubelet ran or runs whose labels include `labels`, in the order they started."""
        with self._lock:
            return [r for r in self.pods.values() if labels.items() <= r.labels.items()]

    def run_of(self, pod_name: str) -> PodRun | None:
        with self._lock:
            return next((r for r in self.pods.values() if r.name == pod_name), None)

    # --- the node --------------------------------------------------------------------------------------------------

    def _register_node(self) -> None:
        body = client.V1Node(
            metadata=client.V1ObjectMeta(
                name=self.node_name,
                labels={
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            )
        )
        try:
            self.core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        allocatable = {"cpu": "64", "memory": "256Gi", "pods": "1000", "ephemeral-storage": "1Ti"}
        info = {
            k: "" for k in ("machineID", "systemUUID", "bootID", "kernelVersion", "osImage", "containerRuntimeVersion")
        }
        info |= {
            "kubeletVersion": "process-kubelet",
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64",
        }
        status = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "process kubelet is ready",
                    "lastHeartbeatTime": now(),
                    "lastTransitionTime": now(),
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.port}},
            "capacity": allocatable,
            "allocatable": allocatable,
            "nodeInfo": info,
        }
        self.core.patch_node_status(self.node_name, {"status": status})

    # --- the loop: bind, start, stop, delete --------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.wait(self.poll_seconds):
            try:
                self._sync()
            except Exception as exc:  # keep going: a failed list is retried at the next tick
                self.errors.append(f"sync: {type(exc).__name__}: {exc}")

    def _sync(self) -> None:
        pods = self.core.list_namespaced_pod(self.namespace).items
        seen = set()
        for pod in pods:
            uid = pod.metadata.uid
            seen.add(uid)
            with self._lock:
                run = self.pods.get(uid)
            if pod.metadata.deletion_timestamp is not None:
                if run is None or run.done.is_set():  # nothing (left) running: gone at once
                    self._delete_for_good(pod.metadata.name, uid)
                elif not run.deleting:
                    run.deleting = True
                    run.grace_seconds = float(pod.metadata.deletion_grace_period_seconds or 0)
                    self._terminate(run)
                continue
            if not pod.spec.node_name:
                self._bind(pod.metadata.name)
                continue
            if pod.spec.node_name != self.node_name or run is not None:
                if run is not None:
                    self._enforce_deadline(run, pod)
                continue
            if pod.status.phase not in (None, "Pending"):
                continue  # finished before this kubelet started: nothing to run
            run = PodRun(
                self.namespace,
                pod.metadata.name,
                uid,
                self.root / f"{pod.metadata.name}-{uid[:8]}",
                self._next_address(),
                dict(pod.metadata.labels or {}),
            )
            run.grace_seconds = float(pod.spec.termination_grace_period_seconds or 30)
            with self._lock:
                self.pods[uid] = run
            thread = threading.Thread(
                target=self._run_pod, args=(run, pod), daemon=True, name=f"pod-{pod.metadata.name}"
            )
            thread.start()
        with self._lock:
            gone = [r for uid, r in self.pods.items() if uid not in seen and not r.done.is_set()]
        for run in gone:  # force-deleted: nothing left to report to
            if run.process and run.process.poll() is None:
                os.killpg(run.process.pid, signal.SIGKILL)

    def _next_address(self) -> str:
        a, b = self._network
        n, self._addresses = self._addresses, self._addresses + 1
        return str(ipaddress.IPv4Address(f"127.{a}.{(b + n // 254) % 256}.{n % 254 + 1}"))

    def _bind(self, name: str) -> None:
        binding = client.V1Binding(
            metadata=client.V1ObjectMeta(name=name),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=self.node_name),
        )
        try:  # the generated client cannot read the answer back (a Binding has no target in it): skip decoding
            self.core.create_namespaced_pod_binding(name, self.namespace, binding, _preload_content=False)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def _enforce_deadline(self, run: PodRun, pod: client.V1Pod) -> None:
        deadline = pod.spec.active_deadline_seconds
        if deadline is None or run.deadline_exceeded or not run.started_at or run.done.is_set():
            return
        started = datetime.datetime.strptime(run.started_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
        if (datetime.datetime.now(datetime.UTC) - started).total_seconds() > deadline:
            run.deadline_exceeded = True
            self._terminate(run)

    def _terminate(self, run: PodRun) -> None:
        """SIGTERM now; SIGKILL once the grace period is over (the pod thread watches the clock)."""
        if run.stop_requested is None:
            run.stop_requested = time.monotonic()
            if run.process and run.process.poll() is None:
                os.killpg(run.process.pid, signal.SIGTERM)

    def _delete_for_good(self, name: str, uid: str) -> None:
        try:
            self.core.delete_namespaced_pod(
                name,
                self.namespace,
                body=client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)),
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    # --- one pod ------------------------------------------------------------------------------------------------------

    def _run_pod(self, run: PodRun, pod: client.V1Pod) -> None:
        try:
            self._run_pod_inner(run, pod)
        except Exception as exc:
            self.errors.append(f"pod {run.name}: {type(exc).__name__}: {exc}")
            if run.process and run.process.poll() is None:
                os.killpg(run.process.pid, signal.SIGKILL)
            self._write_status(
                run,
                pod,
                "Failed",
                main={"terminated": self._terminated(128, "Error", run.started_at or now())},
                message=f"process kubelet: {exc}",
            )
        finally:
            run.done.set()
            if run.deleting:
                self._delete_for_good(run.name, run.uid)

    def _run_pod_inner(self, run: PodRun, pod: client.V1Pod) -> None:
        run.directory.mkdir(parents=True, exist_ok=True)
        main = next((c for c in pod.spec.containers if c.name == "main"), pod.spec.containers[0])
        token = self._service_account_token(pod)
        argv, env = self._process_spec(pod, main, run.directory, token, run.ip)
        argo = ARGO_WORKFLOW_LABEL in (pod.metadata.labels or {}) and any(c.name == "wait" for c in pod.spec.containers)
        if argo:
            self._task_result(pod, token, completed=False)
            run.argo_deadline = argo_deadline(pod)
        run.started_at = now()
        readiness = Readiness(main, run.ip, time.monotonic())
        try:
            with open(run.directory / "main.log", "wb") as log:  # the process writes to its own copy of the descriptor
                run.process = subprocess.Popen(
                    argv, env=env, cwd=run.directory, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        except OSError as exc:
            self._write_status(
                run, pod, "Failed", main={"terminated": self._terminated(128, "StartError", run.started_at, str(exc))}
            )
            return
        running = {"running": {"startedAt": run.started_at}}
        self._write_status(run, pod, "Running", main=running, ready=readiness.ready)
        if run.stop_requested is not None or run.deleting:  # a stop arrived while starting
            os.killpg(run.process.pid, signal.SIGTERM)
            run.stop_requested = run.stop_requested or time.monotonic()
        while run.process.poll() is None:
            if run.stop_requested is None and readiness.check(time.monotonic()):
                self._write_status(run, pod, "Running", main=running, ready=readiness.ready)
            if (
                run.argo_deadline is not None
                and not run.step_deadline_exceeded
                and datetime.datetime.now(datetime.UTC) > run.argo_deadline
            ):
                run.step_deadline_exceeded = True
                self._terminate(run)
            if run.stop_requested is not None and time.monotonic() - run.stop_requested > run.grace_seconds:
                os.killpg(run.process.pid, signal.SIGKILL)
            time.sleep(0.1)
        run.returncode = run.process.returncode
        code = exit_code(run.returncode)
        terminated = self._terminated(code, "Completed" if code == 0 else "Error", run.started_at)
        if argo:
            self._task_result(pod, token, completed=True)
        if run.deadline_exceeded:
            self._write_status(
                run,
                pod,
                "Failed",
                main={"terminated": terminated},
                reason="DeadlineExceeded",
                message="Pod was active on the node longer than the specified deadline",
            )
        else:
            self._write_status(run, pod, "Succeeded" if code == 0 else "Failed", main={"terminated": terminated})

    @staticmethod
    def _terminated(code: int, reason: str, started_at: str, message: str | None = None) -> dict[str, Any]:
        state = {"exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": now()}
        if message:
            state["message"] = message
        return state

    def _write_status(
        self,
        run: PodRun,
        pod: client.V1Pod,
        phase: str,
        *,
        main: dict,
        ready: bool = True,
        reason: str | None = None,
        message: str | None = None,
    ) -> None:
        """`ready`: whether the main container passes its probes (while it runs)."""
        finished = phase in ("Succeeded", "Failed")
        started = run.started_at or now()

        pod_ready = phase == "Running" and ready

        def container(name: str, image: str) -> dict[str, Any]:
            is_main = name == "main" or len(pod.spec.containers) == 1
            if is_main:
                state = main
            elif finished:  # Argo's wait (and any sidecar): runs as long as main, then completes
                note = "Step exceeded its deadline" if run.step_deadline_exceeded else None
                state = {"terminated": self._terminated(0, "Completed", started, note)}
            else:
                state = {"running": {"startedAt": started}}
            running = "running" in state
            return {
                "name": name,
                "image": image,
                "imageID": f"process://{image}",
                "containerID": f"process://{run.uid}/{name}",
                "ready": running and (ready or not is_main),
                "started": running,
                "restartCount": 0,
                "state": state,
            }

        def condition(kind: str, ok: bool, why: str | None = None) -> dict[str, str]:
            return {
                "type": kind,
                "status": "True" if ok else "False",
                "lastTransitionTime": now(),
                **({"reason": why} if why else {}),
            }

        why = None if pod_ready else "PodCompleted" if finished else "ContainersNotReady"
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "startTime": started,
            "conditions": [
                condition("PodScheduled", True),
                condition("Initialized", True),
                condition("ContainersReady", pod_ready, why),
                condition("Ready", pod_ready, why),
            ],
            "initContainerStatuses": [
                {
                    "name": c.name,
                    "image": c.image,
                    "imageID": f"process://{c.image}",
                    "ready": True,
                    "restartCount": 0,
                    "state": {"terminated": self._terminated(0, "Completed", started)},
                }
                for c in pod.spec.init_containers or []
            ],
            "containerStatuses": [container(c.name, c.image) for c in pod.spec.containers],
        }
        if reason:
            status["reason"] = reason
        if message:
            status["message"] = message
        try:
            self.core.patch_namespaced_pod_status(run.name, run.namespace, {"status": status})
        except ApiException as exc:
            if exc.status != 404:  # a pod deleted meanwhile has no status to write
                raise

    # --- what the container sees --------------------------------------------------------------------------------------

    def _service_account_token(self, pod: client.V1Pod) -> str:
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[],
                expiration_seconds=3607,
                bound_object_ref=client.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
                ),
            )
        )
        account = pod.spec.service_account_name or "default"
        return self.core.create_namespaced_service_account_token(account, pod.metadata.namespace, request).status.token

    def _process_spec(
        self, pod: client.V1Pod, container: client.V1Container, directory: Path, token: str, ip: str
    ) -> tuple[list[str], dict[str, str]]:
        volumes = {v.name: v for v in pod.spec.volumes or []}
        mounts: dict[str, Path] = {}
        for mount in container.volume_mounts or []:
            volume = volumes.get(mount.name)
            if volume is None:
                raise RuntimeError(f"volumeMount {mount.name} has no volume")
            host = directory / "volumes" / mount.name
            if mount.mount_path == SA_MOUNT or volume.projected is not None:
                host.mkdir(parents=True, exist_ok=True)
                (host / "token").write_text(token)
                shutil.copy(self.ca_file, host / "ca.crt")
                (host / "namespace").write_text(pod.metadata.namespace)
            elif volume.empty_dir is None:
                raise RuntimeError(f"volume {mount.name}: only emptyDir and the ServiceAccount token are played here")
            if mount.sub_path:
                host = host / mount.sub_path
            host.mkdir(parents=True, exist_ok=True)
            mounts[mount.mount_path.rstrip("/") or "/"] = host

        env: dict[str, str] = {}
        for source in container.env_from or []:
            prefix = source.prefix or ""
            if source.config_map_ref is not None:
                data = self._config_map(source.config_map_ref.name, optional=bool(source.config_map_ref.optional))
            else:
                data = self._secret(source.secret_ref.name, optional=bool(source.secret_ref.optional))
            env.update({prefix + k: v for k, v in data.items()})
        for item in container.env or []:
            env[item.name] = self._env_value(item, pod, env, ip)

        def remap(value: str) -> str:
            if value == "0.0.0.0":  # every interface of the pod: here, its own address
                return ip
            for path, host in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if value == path or value.startswith(path + "/"):
                    return str(host) + value[len(path) :]
            return value

        env = {k: remap(v) for k, v in env.items()}
        if "/tmp" in mounts:
            env["TMPDIR"] = str(mounts["/tmp"])
        if SA_MOUNT in mounts:  # the token, through a kubeconfig (see the module docstring)
            env["KUBECONFIG"] = str(self._kubeconfig(directory, mounts[SA_MOUNT], pod.metadata.namespace))
        env = {**self.base_env, "HOME": str(directory), "HOSTNAME": pod.metadata.name, **env}

        command = list(container.command or []) + list(container.args or [])
        if "--" in command and command[0].endswith("/argoexec"):  # Argo's emissary: what it would run
            command = command[command.index("--") + 1 :]
        if not command:
            raise RuntimeError(f"container {container.name}: no command (image entrypoints are not known here)")
        command = [remap(_VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), part)) for part in command]
        executable = shutil.which(command[0], path=env.get("PATH"))
        if executable is None:
            raise RuntimeError(f"container {container.name}: {command[0]} is not on the PATH ({env.get('PATH')})")
        return [executable, *command[1:]], env

    def _kubeconfig(self, directory: Path, token_dir: Path, namespace: str) -> Path:
        path = directory / "kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "test",
                            "cluster": {"server": self.server, "certificate-authority": str(token_dir / "ca.crt")},
                        }
                    ],
                    "users": [{"name": "pod", "user": {"tokenFile": str(token_dir / "token")}}],
                    "contexts": [
                        {"name": "pod", "context": {"cluster": "test", "user": "pod", "namespace": namespace}}
                    ],
                    "current-context": "pod",
                }
            )
        )
        return path

    def _config_map(self, name: str, *, optional: bool = False) -> dict[str, str]:
        try:
            return self.core.read_namespaced_config_map(name, self.namespace).data or {}
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            raise

    def _secret(self, name: str, *, optional: bool = False) -> dict[str, str]:
        try:
            data = self.core.read_namespaced_secret(name, self.namespace).data or {}
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            raise
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def _env_value(self, item: client.V1EnvVar, pod: client.V1Pod, env: dict[str, str], ip: str) -> str:
        if item.value_from is None:
            return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), item.value or "")
        source = item.value_from
        if source.field_ref is not None:
            path = source.field_ref.field_path
            values = {
                "metadata.name": pod.metadata.name,
                "metadata.namespace": pod.metadata.namespace,
                "metadata.uid": pod.metadata.uid,
                "spec.nodeName": self.node_name,
                "spec.serviceAccountName": pod.spec.service_account_name or "default",
                "status.hostIP": "127.0.0.1",
                "status.podIP": ip,
            }
            if path in values:
                return values[path]
            keyed = _FIELD_KEY.match(path)
            if keyed:
                return (getattr(pod.metadata, keyed.group(1)) or {}).get(keyed.group(2), "")
            raise RuntimeError(f"env {item.name}: fieldRef {path} is not played here")
        if source.config_map_key_ref is not None:
            ref = source.config_map_key_ref
            return self._config_map(ref.name, optional=bool(ref.optional)).get(ref.key, "")
        if source.secret_key_ref is not None:
            ref = source.secret_key_ref
            return self._secret(ref.name, optional=bool(ref.optional)).get(ref.key, "")
        raise RuntimeError(f"env {item.name}: this kind of valueFrom is not played here")

    # --- Argo's wait container ----------------------------------------------------------------------------------------

    def _task_result(self, pod: client.V1Pod, token: str, *, completed: bool) -> None:
        """Create (at start) or complete (after main) the pod's WorkflowTaskResult, as the pod's ServiceAccount."""
        annotations, labels = pod.metadata.annotations or {}, pod.metadata.labels or {}
        node_id = annotations.get(ARGO_NODE_ID)
        workflow = labels[ARGO_WORKFLOW_LABEL]
        owner = next((o for o in pod.metadata.owner_references or [] if o.kind == "Workflow"), None)
        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.ca_file)
        configuration.api_key = {"authorization": f"Bearer {token}"}
        with client.ApiClient(configuration) as api:
            objects = client.CustomObjectsApi(api)
            args = ("argoproj.io", "v1alpha1", pod.metadata.namespace, "workflowtaskresults")
            try:
                if completed:
                    patch = {"metadata": {"labels": {ARGO_COMPLETED_LABEL: "true"}}}
                    objects.patch_namespaced_custom_object(*args, node_id, patch)
                else:
                    body = {
                        "apiVersion": "argoproj.io/v1alpha1",
                        "kind": "WorkflowTaskResult",
                        "metadata": {
                            "name": node_id,
                            "labels": {ARGO_WORKFLOW_LABEL: workflow, ARGO_COMPLETED_LABEL: "false"},
                            "ownerReferences": [
                                {
                                    "apiVersion": "argoproj.io/v1alpha1",
                                    "kind": "Workflow",
                                    "name": workflow,
                                    "uid": owner.uid if owner else "",
                                }
                            ],
                        },
                    }
                    objects.create_namespaced_custom_object(*args, body)
            except ApiException as exc:
                if exc.status == 403:
                    self.denied.append(
                        f"{pod.spec.service_account_name}: {'patch' if completed else 'create'} workflowtaskresults: "
                        f"{exc.reason}"
                    )
                elif exc.status != 409:
                    raise

    # --- the kubelet API: exec ---------------------------------------------------------------------------------------

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        kubelet = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path).path.strip("/").split("/")
                if len(parts) == 4 and parts[0] == "containerLogs":  # `kubectl logs`: the whole log, at once
                    _, namespace, pod, _container = parts
                    run = kubelet.run_of(pod)
                    log = run.directory / "main.log" if run is not None and run.namespace == namespace else None
                    if log is not None and log.is_file():
                        self._answer(200, log.read_bytes())
                    else:
                        self._answer(404, f"no log of pod {namespace}/{pod} on this node".encode())
                    return
                self._exec()

            def do_POST(self) -> None:
                self._exec()

            def _exec(self) -> None:
                url = urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) == 4 and parts[0] == "exec":
                    _, namespace, pod, container = parts
                    command = parse_qs(url.query).get("command", [])
                    kubelet._exec(namespace, pod, container, command)
                self._answer(400, b"the process kubelet acts on `kill` commands but serves no exec stream")

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def _exec(self, namespace: str, pod: str, container: str, command: list[str]) -> None:
        number = kill_signal(command)
        run = self.run_of(pod)
        if number is None or run is None or run.namespace != namespace or container != "main":
            return  # Argo signals the wait container too; here main is the only process
        run.signals.append(number)
        if run.process and run.process.poll() is None:  # no grace timer here: the controller sends SIGKILL itself
            os.killpg(run.process.pid, number)
