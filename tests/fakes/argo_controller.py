"""Plays the Argo Workflows controller for end-to-end tests: runs a Workflow from the fake Kubernetes API as local
processes, the way the controller would run it as pods.

Given the Workflow the executor created (`workflowTemplateRef` + `arguments`), it resolves the WorkflowTemplate from
the manifests under test, merges the parameters (the Workflow's values over the template's defaults, a parameter
without either is an error), substitutes `{{workflow.*}}` placeholders (an unknown one is an error, as it is for
Argo), applies `workflowMetadata` (labels and annotations, substituted), then runs the entrypoint container:
`command` + `args`, with the environment from `envFrom` (ConfigMaps, Secrets), `env` (values, `fieldRef`,
`configMapKeyRef`, `secretKeyRef`), and each `volumeMounts` path mapped to a fresh directory (an emptyDir per pod;
`/tmp` becomes TMPDIR). A non-zero exit is retried up to `retryStrategy.limit` times (no backoff here). While a
container runs, `spec.shutdown` on the Workflow stops it the way Argo does: SIGTERM, then SIGKILL after a grace
period, and no retries after. Then the `onExit` template runs, unless the shutdown was `Terminate`. The Workflow's
`status.phase` follows along (Running, then Succeeded or Failed), so the executor's `state()` sees it.

Not emulated: resources, securityContext, the semaphore, deadlines, podGC and TTLs (the manifest tests check those).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.fakes.kube_api import KubeAPIServer

PLACEHOLDER = re.compile(r"\{\{\s*([^}\s]+)\s*\}\}")


class ControllerError(AssertionError):
    """The Workflow could not run: a missing template, parameter, ConfigMap key... (Argo would error it too)."""


@dataclass
class ContainerRun:
    template: str
    argv: list[str]
    exit_code: int
    stopped: bool  # SIGTERM sent because of spec.shutdown
    log: Path


@dataclass
class WorkflowRun:
    name: str
    phase: str = "Running"
    runs: list[ContainerRun] = field(default_factory=list)

    def of(self, template: str) -> list[ContainerRun]:
        return [r for r in self.runs if r.template == template]


class LocalArgoController:
    def __init__(
        self,
        kube: KubeAPIServer,
        namespace: str,
        objects: list[dict[str, Any]],
        *,
        secrets: dict[str, dict[str, str]],
        root: Path,
        base_env: dict[str, str],
        executables: Path,
        grace_seconds: float = 10.0,
        timeout: float = 120.0,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.templates = {o["metadata"]["name"]: o for o in objects if o["kind"] == "WorkflowTemplate"}
        self.config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
        self.secrets = secrets
        self.root = root
        self.base_env = base_env
        self.executables = executables
        self.grace_seconds = grace_seconds
        self.timeout = timeout
        self._pods = 0

    def run(self, name: str) -> WorkflowRun:
        workflow = self.kube.api.get("workflows", self.namespace, name)
        if workflow is None:
            raise ControllerError(f"no Workflow {name}")
        ref = workflow["spec"].get("workflowTemplateRef", {}).get("name")
        if ref not in self.templates:
            raise ControllerError(f"Workflow {name} references WorkflowTemplate {ref!r}, which does not exist")
        spec = self.templates[ref]["spec"]
        params = self._parameters(spec, workflow["spec"])
        variables = {f"workflow.parameters.{k}": v for k, v in params.items()}
        variables |= {"workflow.name": name, "workflow.namespace": self.namespace, "workflow.uid": workflow["metadata"]["uid"]}
        self._apply_workflow_metadata(name, spec, variables)
        run = WorkflowRun(name)
        self.kube.api.set_status(self.namespace, name, {"phase": "Running"})
        by_name = {t["name"]: t for t in spec["templates"]}
        ok = self._run_template(run, spec, by_name[spec["entrypoint"]], variables)
        run.phase = "Succeeded" if ok else "Failed"
        if spec.get("onExit") and self._shutdown(name) != "Terminate":
            variables["workflow.status"] = run.phase
            exit_ok = self._run_template(run, spec, by_name[spec["onExit"]], variables, on_exit=True)
            if not exit_ok:
                run.phase = "Failed"
        self.kube.api.set_status(self.namespace, name, {"phase": run.phase})
        return run

    # --- parameters and metadata ---------------------------------------------------------------

    @staticmethod
    def _parameters(template_spec: dict, workflow_spec: dict) -> dict[str, str]:
        params: dict[str, str | None] = {}
        for p in template_spec.get("arguments", {}).get("parameters", []):
            params[p["name"]] = p.get("value", p.get("default"))
        for p in workflow_spec.get("arguments", {}).get("parameters", []):
            if p["name"] not in params:
                raise ControllerError(f"parameter {p['name']!r} is not declared by the WorkflowTemplate")
            params[p["name"]] = p.get("value")
        missing = [k for k, v in params.items() if v is None]
        if missing:
            raise ControllerError(f"parameters without a value: {missing}")
        return params  # type: ignore[return-value]

    @staticmethod
    def substitute(text: str, variables: dict[str, str]) -> str:
        def replace(match: re.Match) -> str:
            if match.group(1) not in variables:
                raise ControllerError(f"unresolved placeholder {match.group(0)} in {text!r}")
            return variables[match.group(1)]

        return PLACEHOLDER.sub(replace, text)

    def _apply_workflow_metadata(self, name: str, spec: dict, variables: dict[str, str]) -> None:
        metadata = spec.get("workflowMetadata") or {}
        labels = {k: self.substitute(v, variables) for k, v in (metadata.get("labels") or {}).items()}
        annotations = {k: self.substitute(v, variables) for k, v in (metadata.get("annotations") or {}).items()}
        with self.kube.api._lock:  # the controller writes metadata directly, as Argo's does
            obj = self.kube.api.objects[("argoproj.io", "workflows", self.namespace, name)]
            obj["metadata"].setdefault("labels", {}).update(labels)
            obj["metadata"].setdefault("annotations", {}).update(annotations)

    # --- running containers --------------------------------------------------------------------

    def _shutdown(self, name: str) -> str | None:
        workflow = self.kube.api.get("workflows", self.namespace, name)
        return (workflow or {}).get("spec", {}).get("shutdown")

    def _run_template(self, run: WorkflowRun, spec: dict, template: dict, variables: dict[str, str], on_exit: bool = False) -> bool:
        if "container" not in template:
            raise ControllerError(f"template {template['name']}: only container templates are emulated")
        retries = int((template.get("retryStrategy") or {}).get("limit", 0))
        for _ in range(retries + 1):
            if not on_exit and self._shutdown(run.name):
                return False  # a stopped Workflow starts no new pod (the exit handler still runs)
            result = self._run_container(run.name, spec, template, variables)
            run.runs.append(result)
            if result.exit_code == 0:
                return True
            if result.stopped and not on_exit:
                return False
        return False

    def prepare(self, pod_spec: dict, container: dict, pod: str, variables: dict[str, str]) -> tuple[list[str], dict[str, str], Path]:
        """The argv, environment and working directory a pod's container would get, with its volumes as fresh
        directories under the controller's root."""
        pod_dir = self.root / pod
        volumes = {v["name"] for v in pod_spec.get("volumes", [])}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                raise ControllerError(f"{pod}: volumeMount {mount['name']} has no volume")
            mounts[mount["mountPath"]] = pod_dir / mount["name"]
            mounts[mount["mountPath"]].mkdir(parents=True, exist_ok=True)
        pod_dir.mkdir(parents=True, exist_ok=True)
        env: dict[str, str] = {}  # what the manifests give the container; the host's base_env goes under it
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self._config_map(source["configMapRef"]["name"]))
            elif "secretRef" in source:
                env.update(self._secret(source["secretRef"]["name"]))
        for item in container.get("env", []):
            env[item["name"]] = self._env_value(item, pod, variables)
        for path, host in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            for key, value in env.items():
                if value == path or value.startswith(path.rstrip("/") + "/"):
                    env[key] = str(host) + value[len(path.rstrip("/")) :]
            if path == "/tmp":
                env["TMPDIR"] = str(host)
        env = {**self.base_env, **env}
        command = [self.substitute(c, variables) for c in container.get("command", [])]
        if not command:
            raise ControllerError(f"{pod}: no command (the image's entrypoint is not known here)")
        argv = [str(self.executables / command[0]), *command[1:], *(self.substitute(a, variables) for a in container.get("args", []))]
        return argv, env, pod_dir

    def _run_container(self, name: str, spec: dict, template: dict, variables: dict[str, str]) -> ContainerRun:
        self._pods += 1
        pod = f"{name}-{template['name']}-{self._pods}"
        pod_spec = {"volumes": [*spec.get("volumes", []), *template.get("volumes", [])]}
        argv, env, pod_dir = self.prepare(pod_spec, template["container"], pod, variables)
        log = pod_dir / "log.txt"
        stopped = False
        with open(log, "wb") as out:
            process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=pod_dir, start_new_session=True)
            deadline = time.monotonic() + self.timeout
            stop_deadline = None
            try:
                while process.poll() is None:
                    if not stopped and template["name"] != (spec.get("onExit") or "") and self._shutdown(name):
                        process.send_signal(signal.SIGTERM)
                        stopped, stop_deadline = True, time.monotonic() + self.grace_seconds
                    if stop_deadline and time.monotonic() > stop_deadline:
                        process.kill()
                    if time.monotonic() > deadline:
                        process.kill()
                        raise ControllerError(f"{pod} still running after {self.timeout}s:\n{log.read_text()[-3000:]}")
                    time.sleep(0.1)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return ContainerRun(template["name"], argv, process.returncode, stopped, log)

    def _config_map(self, name: str) -> dict[str, str]:
        if name not in self.config_maps:
            raise ControllerError(f"ConfigMap {name} does not exist")
        return dict(self.config_maps[name])

    def _secret(self, name: str) -> dict[str, str]:
        if name not in self.secrets:
            raise ControllerError(f"Secret {name} does not exist")
        return dict(self.secrets[name])

    def _env_value(self, item: dict, pod: str, variables: dict[str, str]) -> str:
        if "value" in item:
            return self.substitute(item["value"], variables)
        source = item.get("valueFrom") or {}
        if "fieldRef" in source:
            field_path = source["fieldRef"]["fieldPath"]
            values = {"metadata.namespace": self.namespace, "metadata.name": pod}
            if field_path not in values:
                raise ControllerError(f"fieldRef {field_path} is not emulated")
            return values[field_path]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return self._config_map(ref["name"])[ref["key"]]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            return self._secret(ref["name"])[ref["key"]]
        raise ControllerError(f"env {item['name']}: unsupported source {source}")


def pod_environment() -> dict[str, str]:
    """This process's environment without anything a pod would not inherit (gateway settings, AWS, Kubernetes)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BATCH_GATEWAY_", "AWS_", "KUBERNETES_", "KUBECONFIG", "POD_"))
    }
