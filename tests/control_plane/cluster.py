"""A real Kubernetes control plane and Argo Workflows on 127.0.0.1, for the control-plane tests.

etcd, kube-apiserver (client certificates, RBAC, ServiceAccount tokens) and kube-controller-manager (garbage
collection, ServiceAccounts, the root CA ConfigMap, Deployments, ReplicaSets and Jobs), all built by
scripts/install-control-plane.sh; Argo's full CRDs
from its module; Argo's workflow-controller configured as infra/kind/values/argo-workflows.yaml configures it; the
Argo server; and a process kubelet (tests/control_plane/kubelet.py) that runs the pods. The harness itself (the
kubelet, the controllers, kubectl) acts as a cluster admin; the gateway and its pods use their own ServiceAccounts'
tokens (`kubeconfig_for`), so the Roles in templates/ are what is tested.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.control_plane import paths
from tests.control_plane.kubelet import ProcessKubelet
from tests.control_plane.pki import PKI
from tests.helpers import free_port

NAMESPACE = "batch-gateway"
CONTROLLER_CONFIGMAP = "workflow-controller-configmap"
KIND_ARGO_VALUES = paths.REPO / "infra" / "kind" / "values" / "argo-workflows.yaml"
# What kube-controller-manager runs: owner references and ServiceAccounts for everything, and what the Helm chart's
# API Deployment and bootstrap-key Job need (tests/control_plane/test_chart_install.py).
CONTROLLERS = (
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "deployment-controller",
    "replicaset-controller",
    "job-controller",
)


class ControlPlaneError(RuntimeError):
    pass


class Process:
    """A server process with its log file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log = name, argv, log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise ControlPlaneError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def terminate(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


class ControlPlane:
    def __init__(self, root: Path, *, base_env: dict[str, str]) -> None:
        self.root = root
        self.base_env = base_env
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.processes: list[Process] = []
        self.kubelet: ProcessKubelet | None = None
        self.api_port = free_port()
        self.server = f"https://127.0.0.1:{self.api_port}"
        self.argo_server_url = ""

    # --- start and stop -----------------------------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        binaries = self.binaries = paths.binaries()
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        self.pki = PKI(self.root / "pki")
        self._serving = self.pki.issue("apiserver", common_name="kube-apiserver", server=True)
        self._admin = self.pki.issue("admin", common_name="test-admin", organizations=("system:masters",))
        self._to_kubelet = self.pki.issue(
            "apiserver-kubelet-client", common_name="kube-apiserver-kubelet-client", organizations=("system:masters",)
        )
        self.admin_kubeconfig = self._write_kubeconfig(
            "admin", {"client-certificate": str(self._admin.cert), "client-key": str(self._admin.key)}
        )

        etcd_port, peer_port = free_port(), free_port()
        self._spawn(
            "etcd",
            [
                str(binaries["etcd"]),
                "--data-dir",
                str(self.root / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )
        self._spawn(
            "kube-apiserver",
            [
                str(binaries["kube-apiserver"]),
                "--etcd-servers",
                f"http://127.0.0.1:{etcd_port}",
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--secure-port",
                str(self.api_port),
                "--tls-cert-file",
                str(self._serving.cert),
                "--tls-private-key-file",
                str(self._serving.key),
                "--client-ca-file",
                str(self.pki.ca),
                "--authorization-mode",
                "RBAC",
                "--anonymous-auth=false",
                "--service-account-issuer",
                "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file",
                str(self.pki.service_account.cert),
                "--service-account-signing-key-file",
                str(self.pki.service_account.key),
                "--service-cluster-ip-range",
                "10.96.0.0/24",
                "--kubelet-client-certificate",
                str(self._to_kubelet.cert),
                "--kubelet-client-key",
                str(self._to_kubelet.key),
                "--kubelet-certificate-authority",
                str(self.pki.ca),
                "--kubelet-preferred-address-types",
                "InternalIP",
                "--endpoint-reconciler-type",
                "none",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
            ],
        )
        self._wait_ready("kube-apiserver", f"{self.server}/readyz", timeout=90)
        timings["apiserver"] = time.monotonic() - t0
        self._spawn(
            "kube-controller-manager",
            [
                str(binaries["kube-controller-manager"]),
                "--kubeconfig",
                str(self.admin_kubeconfig),
                "--controllers",
                ",".join(CONTROLLERS),
                "--service-account-private-key-file",
                str(self.pki.service_account.key),
                "--root-ca-file",
                str(self.pki.ca),
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                "0",
                "--concurrent-gc-syncs",
                "5",
            ],
        )
        self.api_client = self.admin_api_client()
        self.core = client.CoreV1Api(self.api_client)
        self.objects = client.CustomObjectsApi(self.api_client)
        self.kubectl("create", "namespace", NAMESPACE)
        self.kubectl("apply", "--server-side", "-f", str(paths.argo_crds_dir()))
        self.kubectl("wait", "--for", "condition=Established", "--timeout", "60s", "-f", str(paths.argo_crds_dir()))
        timings["crds"] = time.monotonic() - t0
        self._wait_for(
            lambda: self._exists(lambda: self.core.read_namespaced_service_account("default", NAMESPACE)),
            "the default ServiceAccount",
        )
        self.kubelet = ProcessKubelet(
            self.api_client,
            server=self.server,
            ca_file=self.pki.ca,
            namespace=NAMESPACE,
            root=self.root / "pods",
            base_env=self.base_env,
            serving=self.pki.issue("kubelet", common_name="process-node", server=True),
        ).start()
        self.timings = timings
        return self

    def start_argo(self, database_url: str | None = None) -> None:
        """Argo's controller (configured as the kind recipe configures it) and its server."""
        binaries = paths.binaries()
        objects = [self.controller_configmap(database_url)]
        if database_url is not None:  # the archive's credentials, in the Secret the kind recipe names
            objects.append(
                self.secret(
                    "argo-postgres-config",
                    {"username": urlsplit(database_url).username or "postgres", "password": "trust"},
                )
            )
        self.apply_objects(objects)
        env = {
            **self.base_env,
            "LEADER_ELECTION_DISABLE": "true",
            "DEFAULT_REQUEUE_TIME": "1s",
            "ARGO_NAMESPACE": NAMESPACE,
        }
        common = [
            "--kubeconfig",
            str(self.admin_kubeconfig),
            "--namespace",
            NAMESPACE,
            "--namespaced",
            "--managed-namespace",
            NAMESPACE,
            "--configmap",
            CONTROLLER_CONFIGMAP,
            "--loglevel",
            "info",
        ]
        self._spawn(
            "workflow-controller",
            [str(binaries["workflow-controller"]), *common, "--executor-image", "argoexec:test"],
            env=env,
        )
        port = free_port()
        self._spawn(
            "argo-server",
            [str(binaries["argo"]), "server", *common, "--auth-mode", "server", "--secure=false", "--port", str(port)],
            env=env,
        )
        self.argo_server_url = f"http://127.0.0.1:{port}"
        self._wait_ready("argo-server", f"{self.argo_server_url}/api/v1/version", timeout=60, tls=False)

    def stop(self) -> None:
        if self.kubelet is not None:
            self.kubelet.stop()
        for process in reversed(self.processes):  # all at once: each may take seconds to shut down
            process.terminate()
        for process in reversed(self.processes):
            process.stop(timeout=5)

    # --- configuration -----------------------------------------------------------------------------------------------

    def controller_configmap(self, database_url: str | None) -> dict[str, Any]:
        """The controller's ConfigMap, from the kind recipe's Helm values: template referencing Strict, and (given a
        database) the workflow archive on PostgreSQL, here the local server without TLS."""
        values = yaml.safe_load(KIND_ARGO_VALUES.read_text())["controller"]
        config: dict[str, Any] = {"workflowRestrictions": values["workflowRestrictions"]}
        if database_url is not None:
            url = urlsplit(database_url)
            persistence = json.loads(json.dumps(values["persistence"]))
            persistence["postgresql"].update(
                host=url.hostname, port=url.port or 5432, database=url.path.lstrip("/"), ssl=False
            )
            persistence["postgresql"].pop("sslMode", None)
            config["persistence"] = persistence
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONTROLLER_CONFIGMAP, "namespace": NAMESPACE},
            "data": {k: yaml.safe_dump(v) for k, v in config.items()},
        }

    # --- talking to the API -------------------------------------------------------------------------------------------

    def admin_api_client(self) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.pki.ca)
        configuration.cert_file = str(self._admin.cert)
        configuration.key_file = str(self._admin.key)
        return client.ApiClient(configuration)

    def token(self, service_account: str, seconds: int = 7200) -> str:
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds)
        )
        return self.core.create_namespaced_service_account_token(service_account, NAMESPACE, request).status.token

    def kubeconfig_for(self, service_account: str) -> Path:
        """A kubeconfig with a token of `service_account` (what a pod of it would get), for a process outside pods."""
        return self._write_kubeconfig(f"sa-{service_account}", {"token": self.token(service_account)})

    def api_client_for(self, service_account: str) -> client.ApiClient:
        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.pki.ca)
        configuration.api_key = {"authorization": f"Bearer {self.token(service_account)}"}
        return client.ApiClient(configuration)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [paths.kubectl(), "--kubeconfig", str(self.admin_kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def apply_objects(self, objects: list[dict[str, Any]]) -> str:
        return self.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(objects)
        ).stdout

    def secret(self, name: str, data: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }

    def workflow(self, name: str) -> dict[str, Any] | None:
        return self._exists(
            lambda: self.objects.get_namespaced_custom_object("argoproj.io", "v1alpha1", NAMESPACE, "workflows", name)
        )

    def check(self) -> None:
        for process in self.processes:
            process.check()

    def diagnostics(self) -> str:
        parts = [f"--- {p.name} ---\n{p.tail(3000)}" for p in self.processes if p.name in ("workflow-controller",)]
        if self.kubelet is not None and self.kubelet.errors:
            parts.append("--- kubelet errors ---\n" + "\n".join(self.kubelet.errors[-20:]))
        return "\n".join(parts)

    # --- helpers ------------------------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        process = Process(name, argv, self.logs / f"{name}.log", env=env or self.base_env)
        self.processes.append(process)
        return process

    def _write_kubeconfig(self, name: str, user: dict[str, str]) -> Path:
        path = self.root / f"{name}.kubeconfig"
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {"name": "test", "cluster": {"server": self.server, "certificate-authority": str(self.pki.ca)}}
                    ],
                    "users": [{"name": name, "user": user}],
                    "contexts": [{"name": name, "context": {"cluster": "test", "user": name, "namespace": NAMESPACE}}],
                    "current-context": name,
                }
            )
        )
        path.chmod(0o600)
        return path

    def _wait_ready(self, name: str, url: str, *, timeout: float, tls: bool = True) -> None:
        deadline = time.monotonic() + timeout
        kwargs: dict[str, Any] = {}
        if tls:
            context = ssl.create_default_context(cafile=str(self.pki.ca))
            context.load_cert_chain(self._admin.cert, self._admin.key)
            kwargs["verify"] = context
        while True:
            for process in self.processes:
                process.check()
            try:
                if httpx.get(url, timeout=2, **kwargs).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{name} not ready at {url} after {timeout}s:\n{self.processes[-1].tail()}")
            time.sleep(0.2)

    def _wait_for(self, condition, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.check()
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"timed out waiting for {what}")
            time.sleep(0.2)

    @staticmethod
    def _exists(read):
        try:
            return read()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
