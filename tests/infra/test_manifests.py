"""Every Kubernetes manifest in templates/ and infra/ validates offline, and the pieces fit together.

- Argo kinds against Argo's full-CRD schemas made strict (tests/fakes/argo_schemas.py): a misspelled field fails.
- Core kinds with kubernetes-validate in strict mode, for Kubernetes 1.37.
- Each kustomization is rendered with `kubectl kustomize` (the pinned build) and validated again, then
  checked for consistency: references to ServiceAccounts, ConfigMaps, Roles and templates resolve, RBAC grants what
  the code needs, containers are hardened, the kind cluster's port mappings match the NodePorts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.control_plane import paths
from tests.fakes import argo_schemas

pytestmark = pytest.mark.process  # helm, promtool, kubectl

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.37"
NOT_API_OBJECTS = ("kustomize.config.k8s.io/", "kind.x-k8s.io/")
EXTERNAL_SECRETS = {"batch-gateway-secrets"}  # created by install.sh / Terraform / the operator, not shipped
GATEWAY_IMAGE = re.compile(r"^batch-gateway(:|$)")


def validation_errors(obj: dict[str, Any]) -> list[str]:
    if obj["kind"] in argo_schemas.ARGO_KINDS:
        return argo_schemas.errors(obj)
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(str(p) for p in exc.path)}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"no schema for {obj['apiVersion']} {obj['kind']}: unknown kind (a CRD this test cannot check?)"]
    return []


def is_api_object(doc: Any) -> bool:
    return isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc and not doc["apiVersion"].startswith(NOT_API_OBJECTS)


def helm_template_dirs() -> set[Path]:
    return {chart.parent / "templates" for chart in REPO.glob("infra/**/Chart.yaml")}


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in [*REPO.glob("templates/**/kustomization.yaml"), *REPO.glob("infra/**/kustomization.yaml")])


def patch_files() -> set[Path]:
    """Strategic-merge and JSON patches: partial objects, checked through the rendered kustomization instead."""
    found = set()
    for directory in kustomization_dirs():
        for patch in yaml.safe_load((directory / "kustomization.yaml").read_text()).get("patches", []):
            if "path" in patch:
                found.add((directory / patch["path"]).resolve())
    return found


def manifest_files() -> list[Path]:
    skip_dirs, patches = helm_template_dirs(), patch_files()
    files = []
    for path in sorted([*REPO.glob("templates/**/*.y*ml"), *REPO.glob("infra/**/*.y*ml")]):
        if any(d in path.parents for d in skip_dirs) or path.resolve() in patches:
            continue
        if objects_in(path):  # Helm values, the kind config and kustomize files hold no API object
            files.append(path)
    return files


def objects_in(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if is_api_object(doc)]


@cache
def rendered(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run([paths.kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]




# --- every file, as written ----------------------------------------------------------------------


def test_the_validators_reject_misspelled_fields():
    """Strictness is the point of these tests: make sure both validators really refuse an unknown field."""
    deployment = objects_in(REPO / "templates" / "deployment-api.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert validation_errors(deployment)
    template = objects_in(REPO / "templates" / "runner-workflowtemplate.yaml")[0]
    template["spec"]["templates"][0]["retryStrategy"]["limitt"] = 1
    assert any("limitt" in e for e in validation_errors(template))


def test_manifests_are_found():
    files = manifest_files()
    kinds = {obj["kind"] for f in files for obj in objects_in(f)}
    assert {"WorkflowTemplate", "CronWorkflow", "Deployment", "Service", "Role", "RoleBinding", "ConfigMap", "Job"} <= kinds


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_manifest_validates(path):
    for obj in objects_in(path):
        errors = validation_errors(obj)
        assert not errors, f"{path.relative_to(REPO)}: {obj['kind']} {obj['metadata'].get('name')}:\n  " + "\n  ".join(errors)


# --- every kustomization, rendered ---------------------------------------------------------------


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=lambda p: str(p.relative_to(REPO)))
def test_kustomization_renders_valid_objects(directory):
    objects = rendered(directory)
    assert objects
    for obj in objects:
        errors = validation_errors(obj)
        assert not errors, f"{directory.relative_to(REPO)}: {obj['kind']} {obj['metadata']['name']}:\n  " + "\n  ".join(errors)
        assert obj["metadata"].get("namespace") == "batch-gateway", f"{obj['kind']} {obj['metadata']['name']} has no namespace"


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod_specs(objects: list[dict]) -> list[tuple[str, dict, list[dict]]]:
    """(where, pod-level spec, containers) for every workload: Deployments, Jobs and Argo container templates."""
    found = []
    for o in objects:
        where = f"{o['kind']} {o['metadata']['name']}"
        if o["kind"] in ("Deployment", "Job"):
            spec = o["spec"]["template"]["spec"]
            found.append((where, spec, spec["containers"]))
        elif o["kind"] == "WorkflowTemplate":
            containers = [t["container"] for t in o["spec"]["templates"] if "container" in t]
            found.append((where, o["spec"], containers))
    return found


@pytest.mark.parametrize("directory", [REPO / "templates", REPO / "infra" / "kind" / "gateway"], ids=["templates", "kind"])
def test_references_resolve_and_containers_are_hardened(directory):
    objects = rendered(directory)
    config_maps, accounts, roles = by_kind(objects, "ConfigMap"), by_kind(objects, "ServiceAccount"), by_kind(objects, "Role")
    templates = by_kind(objects, "WorkflowTemplate")
    for where, spec, containers in pod_specs(objects):
        if not any(GATEWAY_IMAGE.match(c["image"]) for c in containers):
            continue  # the simulator: not ours
        assert spec.get("serviceAccountName") in accounts, f"{where}: unknown ServiceAccount {spec.get('serviceAccountName')}"
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001, where
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for container in containers:
            assert container["command"] == ["batch-gateway"], f"{where}: the image's entrypoint is batch-gateway"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert {"/tmp", "/var/lib/batch-gateway"} <= set(mounts), f"{where}: writable /tmp and data dir needed"
            assert set(mounts.values()) <= volumes, f"{where}: mounts without a volume: {set(mounts.values()) - volumes}"
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in config_maps, where
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in EXTERNAL_SECRETS | set(by_kind(objects, "Secret")), where
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], where
    for name, binding in by_kind(objects, "RoleBinding").items():
        assert binding["roleRef"]["name"] in roles, f"RoleBinding {name}: no Role {binding['roleRef']['name']}"
        for subject in binding["subjects"]:
            assert subject["name"] in accounts and subject["namespace"] == binding["metadata"]["namespace"], name
    runner = templates["batch-gateway-runner"]["spec"]
    names = {t["name"] for t in runner["templates"]}
    assert runner["entrypoint"] in names and runner["onExit"] in names
    for semaphore in runner["synchronization"]["semaphores"]:
        ref = semaphore["configMapKeyRef"]
        assert int(config_maps[ref["name"]]["data"][ref["key"]]) > 0
    cron = by_kind(objects, "CronWorkflow")["batch-gateway-gc"]["spec"]
    assert cron["workflowSpec"]["workflowTemplateRef"]["name"] in templates
    # the API Service reaches the API pods on a port they declare
    service = by_kind(objects, "Service")["batch-gateway-api"]["spec"]
    pod = by_kind(objects, "Deployment")["batch-gateway-api"]["spec"]["template"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}


def permissions(objects: list[dict], account: str) -> set[tuple[str, str, str]]:
    roles = by_kind(objects, "Role")
    granted = set()
    for binding in by_kind(objects, "RoleBinding").values():
        if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]):
            for rule in roles[binding["roleRef"]["name"]]["rules"]:
                granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return granted


def test_rbac_grants_what_the_code_needs_and_no_more():
    objects = rendered(REPO / "templates")
    manage_workflows = {("argoproj.io", "workflows", v) for v in ("create", "get", "list", "patch", "delete")}
    argo_executor = {("argoproj.io", "workflowtaskresults", v) for v in ("create", "patch")}  # Argo >= 3.4
    discovery = {("discovery.k8s.io", "endpointslices", v) for v in ("get", "list")}
    assert permissions(objects, "batch-gateway-api") == manage_workflows
    assert permissions(objects, "batch-gateway-runner") == argo_executor | discovery
    assert permissions(objects, "batch-gateway-gc") == manage_workflows | argo_executor
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")


def test_workflow_template_placeholders_are_declared_parameters():
    known_globals = {"workflow.name", "workflow.namespace", "workflow.uid", "workflow.status", "workflow.duration"}
    for path in (REPO / "templates").glob("*workflowtemplate.yaml"):
        template = objects_in(path)[0]
        declared = {f"workflow.parameters.{p['name']}" for p in template["spec"].get("arguments", {}).get("parameters", [])}
        used = set(re.findall(r"\{\{\s*([^}\s]+)\s*\}\}", path.read_text()))
        assert used <= declared | known_globals, f"{path.name}: unknown placeholders {used - declared - known_globals}"


# --- the image and the kind demo -----------------------------------------------------------------


def test_containerfile_matches_the_manifests():
    text = (REPO / "Containerfile").read_text()
    assert 'ENTRYPOINT ["batch-gateway"]' in text and 'CMD ["serve"]' in text
    assert re.search(r"^USER 10001:10001$", text, re.M), "run as the uid the manifests' runAsUser expects"
    assert re.search(r"^FROM python:3\.11-slim AS build$", text, re.M) and "pip wheel" in text
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ignored[0] == "*" and "!batch_gateway/" in ignored and "!pyproject.toml" in ignored


def test_kind_cluster_ports_settings_and_names_agree():
    cluster = yaml.safe_load((REPO / "infra" / "kind" / "cluster.yaml").read_text())
    mapped = {m["containerPort"]: m["hostPort"] for m in cluster["nodes"][0]["extraPortMappings"]}
    objects = rendered(REPO / "infra" / "kind" / "gateway")
    api_service = by_kind(objects, "Service")["batch-gateway-api"]["spec"]
    assert api_service["type"] == "NodePort" and mapped[api_service["ports"][0]["nodePort"]] == 8000
    argo = yaml.safe_load((REPO / "infra" / "kind" / "values" / "argo-workflows.yaml").read_text())
    assert mapped[argo["server"]["serviceNodePort"]] == 2746
    assert argo["controller"]["workflowNamespaces"] == ["batch-gateway"]
    assert argo["controller"]["workflowRestrictions"]["templateReferencing"] == "Strict"
    assert argo["crds"] == {"install": True, "full": True}  # the minimal CRDs validate nothing
    postgres = yaml.safe_load((REPO / "infra" / "kind" / "values" / "postgres.yaml").read_text())
    database = argo["controller"]["persistence"]["postgresql"]
    assert database["host"].startswith(f"{postgres['fullnameOverride']}-rw.batch-gateway.")
    assert database["database"] == postgres["cluster"]["initdb"]["database"]
    script = (REPO / "infra" / "kind" / "install.sh").read_text()
    assert f"@{postgres['fullnameOverride']}-rw:5432/{postgres['cluster']['initdb']['database']}" in script
    assert postgres["cluster"]["initdb"]["secret"]["name"] in script
    config = by_kind(objects, "ConfigMap")["batch-gateway-config"]["data"]
    sim = by_kind(objects, "Service")["llm-d-sim"]
    assert config["BATCH_GATEWAY_UPSTREAM"] == f"sim-model=k8s://{sim['metadata']['name']}:{sim['spec']['ports'][0]['name']}"
    assert "--model" in (args := by_kind(objects, "Deployment")["llm-d-sim"]["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args[args.index("--model") + 1] == "sim-model"
    assert config["AWS_ENDPOINT_URL"] == "http://minio:9000" and "helm upgrade --install minio " in script
    assert "fullnameOverride: valkey" in (REPO / "infra" / "kind" / "values" / "valkey.yaml").read_text()
    assert "redis://valkey:6379/0" in script


def test_install_script_is_strict_bash():
    script = REPO / "infra" / "kind" / "install.sh"
    assert script.stat().st_mode & 0o111, "install.sh must be executable"
    assert "set -euo pipefail" in script.read_text()
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
