"""The Helm chart (charts/batch-gateway): it lints, renders objects that validate against the real schemas, and
installs exactly what the kustomize base (templates/) installs; so does the Terraform gateway module, which installs
the chart with values made of its variables. One source of truth, three ways in, no drift.

`helm` is the pinned build of scripts/install-tools.sh; the kustomize base is rendered with `kubectl kustomize`. The
Terraform module's values are read with python-hcl2 (nothing is applied; `terraform init` needs the registry) and
evaluated here: they may only name variables, locals and literals, plus the opaque expressions listed in
TERRAFORM_OPAQUE. What Helm adds for its own bookkeeping (the labels in HELM_LABELS) is not compared.

`helm install` against a real API server is tested on the test control plane, in
tests/control_plane/test_chart_install.py: `helm install --wait` (server-side apply, Strict field validation, the
API pod Ready by its probes), every object on the server as rendered, the bootstrap key read as NOTES.txt says, a
batch through the SDK and the chart's runner WorkflowTemplate on real Argo, and `helm uninstall` leaving nothing of
the release behind.
"""

from __future__ import annotations

import difflib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

from tests.infra import tools
from tests.infra.test_manifests import by_kind, rendered, validation_errors

pytestmark = pytest.mark.process  # helm, promtool, kubectl

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "batch-gateway"
TEMPLATES = REPO / "templates"
GATEWAY_MODULE = REPO / "infra" / "terraform" / "modules" / "gateway"
DASHBOARD = REPO / "infra" / "grafana" / "batch-gateway-dashboard.json"
NAMESPACE = "batch-gateway"
HELM_LABELS = {
    "app.kubernetes.io/instance",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/version",
    "helm.sh/chart",
}
HOOK = "helm.sh/hook"
# Terraform values that are computed, not given: replaced by a stand-in, and checked separately.
TERRAFORM_OPAQUE = {("secret", "checksum"): "checksum-of-the-secrets"}
# prometheus-operator's kinds: no schema here (its CRDs are not on the Go module proxy); their wiring is checked below.
MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def helm(*args: str) -> str:
    result = subprocess.run([str(tools.require("helm")), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def render_chart(values: dict[str, Any] | None = None, *, release: str = "batch-gateway", tmp_path: Path) -> list[dict]:
    values_file = tmp_path / f"values-{release}.yaml"
    values_file.write_text(yaml.safe_dump(values or {}))
    out = helm("template", release, str(CHART), "--namespace", NAMESPACE, "-f", str(values_file))
    return [doc for doc in yaml.safe_load_all(out) if doc]


def base_image() -> dict[str, str]:
    """The image the kustomize base names (its `images:` entry), as chart values."""
    (image,) = yaml.safe_load((TEMPLATES / "kustomization.yaml").read_text())["images"]
    return {"repository": image["newName"], "tag": image["newTag"]}


def without_helm_labels(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: (
                {lk: lv for lk, lv in v.items() if lk not in HELM_LABELS}
                if k == "labels" and isinstance(v, dict)
                else without_helm_labels(v)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [without_helm_labels(v) for v in node]
    return node


def keyed(objects: list[dict]) -> dict[str, dict]:
    return {f"{o['kind']}/{o['metadata']['name']}": without_helm_labels(o) for o in objects}


def assert_same_objects(expected: list[dict], actual: list[dict], what: str) -> None:
    want, got = keyed(expected), keyed(actual)
    assert sorted(got) == sorted(want), (
        f"{what}: objects differ: missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}"
    )
    for key in want:
        if got[key] != want[key]:
            a = yaml.safe_dump(want[key], sort_keys=True).splitlines()
            b = yaml.safe_dump(got[key], sort_keys=True).splitlines()
            diff = "\n".join(difflib.unified_diff(a, b, "kustomize base", what, lineterm=""))
            pytest.fail(f"{key} differs between the kustomize base and {what}:\n{diff}")


def not_hooks(objects: list[dict]) -> list[dict]:
    return [o for o in objects if HOOK not in o["metadata"].get("annotations", {})]


# --- the Terraform module's values ---------------------------------------------------------------------------------


def unquote(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def terraform_values(variables: dict[str, Any]) -> dict[str, Any]:
    """The gateway module's `local.values`, evaluated with `variables` over the variables' defaults."""
    parsed = {f.name: hcl2.loads(f.read_text()) for f in GATEWAY_MODULE.glob("*.tf")}
    declared: dict[str, Any] = {}
    for block in (b for p in parsed.values() for b in p.get("variable", [])):
        for name, spec in block.items():
            declared[unquote(name)] = spec
    unknown = set(variables) - set(declared)
    assert not unknown, f"not variables of the gateway module: {unknown}"
    given = {
        name: variables[name] if name in variables else evaluate(spec.get("default"), {}, {}, ())
        for name, spec in declared.items()
    }
    missing = [name for name, spec in declared.items() if "default" not in spec and name not in variables]
    assert not missing, f"required variables not given: {missing}"
    local_defs = {
        k: v for p in parsed.values() for b in p.get("locals", []) for k, v in b.items() if not k.startswith("__")
    }
    return evaluate(local_defs["values"], given, local_defs, ())


def evaluate(node: Any, variables: dict[str, Any], local_defs: dict[str, Any], path: tuple[str, ...]) -> Any:
    if isinstance(node, dict):
        return {
            unquote(k): evaluate(v, variables, local_defs, (*path, unquote(k)))
            for k, v in node.items()
            if not k.startswith("__")
        }
    if isinstance(node, list):
        return [evaluate(v, variables, local_defs, path) for v in node]
    if not isinstance(node, str):
        return node
    if node == "${null}":
        return None
    if (match := re.fullmatch(r"\$\{var\.([A-Za-z_][A-Za-z0-9_]*)\}", node)) is not None:
        return variables[match.group(1)]
    if (match := re.fullmatch(r"\$\{local\.([A-Za-z_][A-Za-z0-9_]*)\}", node)) is not None:
        return evaluate(local_defs[match.group(1)], variables, local_defs, path)
    if path in TERRAFORM_OPAQUE:
        return TERRAFORM_OPAQUE[path]
    assert "${" not in node, (
        f"local.values.{'.'.join(path)} = {node}: keep the module's chart values to variables and literals"
    )
    return unquote(node)


def base_terraform_variables() -> dict[str, Any]:
    """The gateway module's variables that give the kustomize base's settings."""
    config = yaml.safe_load((TEMPLATES / "configmap-config.yaml").read_text())["data"]
    image = base_image()
    return {
        "namespace": NAMESPACE,
        "image": f"{image['repository']}:{image['tag']}",
        "upstream": config["BATCH_GATEWAY_UPSTREAM"],
        "object_store_url": config["BATCH_GATEWAY_OBJECT_STORE"],
        "aws_region": config["AWS_REGION"],
        "database_url": "postgresql://example/db",
    }


# --- the tests -----------------------------------------------------------------------------------------------------


EVERYTHING_ON = {
    "bootstrapKey": {"tenant": "admin"},
    "metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "tracing": {"otlpEndpoint": "http://otel-collector:4318", "upstreamSampleRatio": 0.05},
    "objectStore": {"endpoint": "http://minio:9000"},
    "limits": {"maxUploadBytes": 1 << 30, "completionWindowSeconds": 172800},
    "secret": {"checksum": "abc"},
}


def test_helm_lint(tmp_path):
    helm("lint", "--strict", str(CHART))
    values = tmp_path / "on.yaml"
    values.write_text(yaml.safe_dump(EVERYTHING_ON))
    helm("lint", "--strict", str(CHART), "-f", str(values))


def test_chart_renders_the_kustomize_base(tmp_path):
    assert_same_objects(rendered(TEMPLATES), render_chart({"image": base_image()}, tmp_path=tmp_path), "the chart")


def test_terraform_module_installs_the_kustomize_base(tmp_path):
    values = terraform_values(base_terraform_variables())
    objects = render_chart(values, tmp_path=tmp_path)
    api = by_kind(objects, "Deployment")["batch-gateway-api"]["spec"]["template"]["metadata"]
    assert api.pop("annotations") == {"batch-gateway/secret-checksum": TERRAFORM_OPAQUE[("secret", "checksum")]}
    # The module's bootstrap_tenant (default admin) creates the first key in a pre-install hook: not in the base.
    hooks = [o for o in objects if HOOK in o["metadata"].get("annotations", {})]
    assert [(o["kind"], o["metadata"]["annotations"][HOOK]) for o in hooks] == [("Job", "pre-install")]
    assert "admin" in hooks[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert_same_objects(rendered(TEMPLATES), not_hooks(objects), "the Terraform module's chart")


def test_terraform_module_passes_only_values_the_chart_has(tmp_path):
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())

    def check(given: dict, defined: dict, where: str) -> None:
        for key, value in given.items():
            assert key in defined, (
                f"the Terraform module sets {where}{key}, which charts/batch-gateway/values.yaml lacks"
            )
            if isinstance(value, dict) and isinstance(defined[key], dict) and defined[key]:
                check(value, defined[key], f"{where}{key}.")

    check(terraform_values(base_terraform_variables()), chart_values, "")
    main = (GATEWAY_MODULE / "main.tf").read_text()
    assert "values     = [yamlencode(local.values)]" in main and "charts/batch-gateway" in main


def test_every_rendered_object_validates(tmp_path):
    objects = render_chart({**EVERYTHING_ON, "image": base_image()}, tmp_path=tmp_path)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "WorkflowTemplate", "CronWorkflow", "Job", "ConfigMap", *MONITORING_KINDS} <= kinds
    for obj in objects:
        assert obj["metadata"]["namespace"] == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']} has no namespace"
        if obj["kind"] in MONITORING_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        errors = validation_errors(obj)
        assert not errors, f"{obj['kind']} {obj['metadata']['name']}:\n  " + "\n  ".join(errors)


def test_options_reach_the_objects(tmp_path):
    objects = render_chart(
        {**EVERYTHING_ON, "image": {"repository": "registry.example:5000/team/batch-gateway:1.2.3"}}, tmp_path=tmp_path
    )
    config = by_kind(objects, "ConfigMap")["batch-gateway-config"]["data"]
    assert config["AWS_ENDPOINT_URL"] == "http://minio:9000" and config["AWS_ALLOW_HTTP"] == "true"
    assert config["BATCH_GATEWAY_MAX_UPLOAD_BYTES"] == str(1 << 30)
    assert config["BATCH_GATEWAY_COMPLETION_WINDOW_SECONDS"] == "172800"
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert config["BATCH_GATEWAY_TRACE_UPSTREAM_SAMPLE_RATIO"] == "0.05"
    runner = by_kind(objects, "WorkflowTemplate")["batch-gateway-runner"]["spec"]
    assert runner["activeDeadlineSeconds"] == 172800 + 7200, "the runner's deadline follows the completion window"
    images = {c["image"] for o in objects for c in containers(o)}
    assert images == {"registry.example:5000/team/batch-gateway:1.2.3"}
    dashboard = by_kind(objects, "ConfigMap")["batch-gateway-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["batch-gateway.json"]) == json.loads(DASHBOARD.read_text())
    default = render_chart({"image": {"repository": "batch-gateway"}}, tmp_path=tmp_path)
    assert {c["image"] for o in default for c in containers(o)} == {f"batch-gateway:{chart_app_version()}"}
    assert not MONITORING_KINDS & {o["kind"] for o in default}, "the prometheus-operator objects are optional"


def test_another_release_name_keeps_every_reference(tmp_path):
    """Every name an object refers to (accounts, ConfigMaps, Roles, templates, the Secret) follows the release."""
    objects = render_chart(
        {**EVERYTHING_ON, "config": {"BATCH_GATEWAY_LOG_LEVEL": "debug"}}, release="team-a", tmp_path=tmp_path
    )
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert all(name.startswith("team-a-batch-gateway-") for _, name in names), names
    config = by_kind(objects, "ConfigMap")["team-a-batch-gateway-config"]["data"]
    assert config["BATCH_GATEWAY_LOG_LEVEL"] == "debug", "config wins over the chart's settings"
    assert ("WorkflowTemplate", config["BATCH_GATEWAY_ARGO_TEMPLATE"]) in names
    for obj in objects:
        for account in re.findall(r"'serviceAccountName': '([^']+)'", repr(obj)):
            assert ("ServiceAccount", account) in names, (
                f"{obj['kind']} {obj['metadata']['name']}: no account {account}"
            )
        for config_map in re.findall(r"'configMap(?:Ref|KeyRef)': \{[^}]*'name': '([^']+)'", repr(obj)):
            assert ("ConfigMap", config_map) in names, (
                f"{obj['kind']} {obj['metadata']['name']}: no ConfigMap {config_map}"
            )
        for secret in re.findall(r"'secretRef': \{'name': '([^']+)'", repr(obj)):
            assert secret == "team-a-batch-gateway-secrets"
    for binding in by_kind(objects, "RoleBinding").values():
        assert ("Role", binding["roleRef"]["name"]) in names
        assert all(("ServiceAccount", s["name"]) in names for s in binding["subjects"])
    cron = by_kind(objects, "CronWorkflow")["team-a-batch-gateway-gc"]
    assert ("WorkflowTemplate", cron["spec"]["workflowSpec"]["workflowTemplateRef"]["name"]) in names
    # The monitors select what the chart labels: the API Service (port http) and the runner pods (port metrics).
    service = by_kind(objects, "Service")["team-a-batch-gateway-api"]
    monitor = by_kind(objects, "ServiceMonitor")["team-a-batch-gateway-api"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    runner = by_kind(objects, "WorkflowTemplate")["team-a-batch-gateway-runner"]["spec"]
    pods = by_kind(objects, "PodMonitor")["team-a-batch-gateway-runner"]["spec"]
    assert pods["selector"]["matchLabels"].items() <= runner["podMetadata"]["labels"].items()
    run = next(t for t in runner["templates"] if t["name"] == "run")["container"]
    assert pods["podMetricsEndpoints"][0]["port"] in {p["name"] for p in run["ports"]}
    assert str(run["ports"][0]["containerPort"]) == config["BATCH_GATEWAY_RUNNER_METRICS_PORT"]


def containers(obj: dict) -> list[dict]:
    if obj["kind"] in ("Deployment", "Job"):
        return obj["spec"]["template"]["spec"]["containers"]
    if obj["kind"] == "WorkflowTemplate":
        return [t["container"] for t in obj["spec"]["templates"] if "container" in t]
    return []


def chart_app_version() -> str:
    return str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])


def test_chart_values_schema_rejects_a_misspelled_value(tmp_path):
    values = tmp_path / "typo.yaml"
    values.write_text(yaml.safe_dump({"api": {"replica": 3}}))
    result = subprocess.run(
        [str(tools.require("helm")), "template", "x", str(CHART), "-f", str(values)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "replica" in result.stderr, result.stderr
