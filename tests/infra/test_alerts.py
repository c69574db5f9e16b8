"""The chart's alerts (PrometheusRule, docs/operations.md "Alerts"): valid rules (`promtool check rules`), written only
against metrics and labels the code exports (or the few external ones named in EXTERNAL), and firing when they should
(`promtool test rules` on synthetic series). promtool is the pinned build of scripts/install-tools.sh."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from batch_gateway import ids, wire
from batch_gateway.api import metrics as api_metrics
from batch_gateway.executor.argo import workflow_name
from batch_gateway.runner import metrics as runner_metrics
from tests.infra import tools
from tests.infra.test_chart import CHART, render_chart

pytestmark = pytest.mark.process  # helm, promtool, kubectl

NS = "batch-gateway"
# Metrics the alerts read that the gateway does not export: who does, and the labels used.
EXTERNAL = {
    "up": ("Prometheus itself", {"namespace", "job"}),
    "kube_pod_status_phase": ("kube-state-metrics", {"namespace", "phase", "pod"}),
}
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def exported() -> dict[str, set[str]]:
    """Every sample name the code exports, with its label names (a scrape adds namespace, pod, job, ...)."""
    names: dict[str, set[str]] = {}
    for module in (api_metrics, runner_metrics):
        for metric in vars(module).values():
            if hasattr(metric, "_name") and hasattr(metric, "_labelnames"):
                for suffix in ("", "_total", "_bucket", "_sum", "_count"):
                    names[metric._name + suffix] = set(metric._labelnames) | {"namespace"}
    return names


@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("alerts")
    objects = render_chart({"prometheusRule": {"enabled": True}}, tmp_path=tmp)
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    path = tmp / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def alerts(rules: Path) -> list[dict]:
    return [r for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_promtool_accepts_the_rules(rules):
    result = subprocess.run([str(tools.require("promtool")), "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts(rules))} rules found" in result.stdout


def test_alerts_cover_the_issue():
    names = {a["alert"] for a in alerts_of_chart()}
    assert {
        "BatchGatewayBatchesFailing", "BatchGatewayBatchesNearDeadline", "BatchGatewayBatchesOverdue",
        "BatchGatewayRunnerCrashLooping", "BatchGatewayUpstreamErrors", "BatchGatewayUpstreamThrottled",
        "BatchGatewayQueueGrowing", "BatchGatewayNoProgress", "BatchGatewayMetadataStoreUnavailable",
        "BatchGatewayObjectStoreUnavailable",
    } <= names
    docs = (CHART.parents[1] / "docs" / "operations.md").read_text()
    assert not [n for n in names if f"`{n}`" not in docs], "every alert is explained in docs/operations.md"


def alerts_of_chart() -> list[dict]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        objects = render_chart({"prometheusRule": {"enabled": True}}, tmp_path=Path(tmp))
    return [r for o in objects if o["kind"] == "PrometheusRule" for g in o["spec"]["groups"] for r in g["rules"]]


def test_every_expression_reads_exported_metrics_and_labels(rules):
    known = exported()
    statuses = {status.value for status in wire.BatchStatus}
    for alert in alerts(rules):
        expr = alert["expr"]
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{alert['alert']}: reads no metric"
        bare = set(re.findall(r"\b(batch_(?:gateway|runner)_[a-z_]+)\b(?!\{)", expr)) - {name for name, _ in selectors}
        assert not bare, f"{alert['alert']}: select {bare} with {{namespace=...}}, so that the test can check them"
        for name, matchers in selectors:
            if name in EXTERNAL:
                labels = EXTERNAL[name][1]
            else:
                assert name in known, f"{alert['alert']}: {name} is not exported by batch_gateway (nor in EXTERNAL)"
                labels = known[name]
            for label, op, value in MATCHER.findall(matchers):
                assert label in labels, f"{alert['alert']}: {name} has no label {label} (it has {sorted(labels)})"
                if label == "namespace":
                    assert value == NS
                if name == "batch_gateway_batches" and label == "status":
                    assert set(value.split("|")) <= statuses, f"{alert['alert']}: unknown status in {value}"
                if name == "batch_runner_requests_total" and label == "outcome":
                    assert value in ("ok", "error")


def test_runner_pod_names_match_the_crash_loop_alert():
    """Argo names a Workflow's pods <workflow>-<template>-<hash>; the alert groups failed `run` pods by Workflow."""
    assert re.fullmatch(r"bg-[0-9a-f]+", workflow_name(ids.new_batch_id()))
    runner = yaml.safe_load((CHART.parents[1] / "templates" / "runner-workflowtemplate.yaml").read_text())
    assert runner["spec"]["entrypoint"] == "run"


# --- the alerts fire on the series they are about, and only then (`promtool test rules`) ------------------------------

def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in {"namespace": NS, **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


UNIT_TESTS = [
    {   # 3 batches failed within the hour
        "interval": "1m",
        "input_series": [series("batch_gateway_batches", {"status": "failed", "pod": "api-0"}, "2x60 5x60")],
        "alert_rule_test": [
            {"eval_time": "50m", "alertname": "BatchGatewayBatchesFailing", "exp_alerts": []},
            {"eval_time": "90m", "alertname": "BatchGatewayBatchesFailing",
             "exp_alerts": [{"exp_labels": {"namespace": NS, "severity": "warning"},
                             "exp_annotations": None}]},
        ],
    },
    {   # a batch in progress, runners report results, then nothing for 15 minutes
        "interval": "1m",
        "input_series": [
            series("batch_gateway_batches", {"status": "in_progress", "pod": "api-0"}, "1x60"),
            series("batch_runner_requests_total", {"outcome": "ok", "pod": "bg-1-run-1"}, "0+10x20 200x40"),
        ],
        "alert_rule_test": [
            {"eval_time": "19m", "alertname": "BatchGatewayNoProgress", "exp_alerts": []},
            {"eval_time": "45m", "alertname": "BatchGatewayNoProgress",
             "exp_alerts": [{"exp_labels": {"namespace": NS, "severity": "critical"}, "exp_annotations": None}]},
        ],
    },
    {   # the database stops answering one replica's scrapes
        "interval": "1m",
        "input_series": [
            series("batch_gateway_metadata_up", {"pod": "api-0"}, "1x10 0x10"),
            series("batch_gateway_metadata_up", {"pod": "api-1"}, "1x20"),
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "BatchGatewayMetadataStoreUnavailable", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "BatchGatewayMetadataStoreUnavailable",
             "exp_alerts": [{"exp_labels": {"namespace": NS, "severity": "critical"}, "exp_annotations": None}]},
        ],
    },
    {   # one attempt in ten ends 503; later one in a hundred: only the first is over 5 %
        "interval": "1m",
        "input_series": [
            series("batch_runner_requests_total", {"outcome": "ok", "pod": "bg-1-run-1"}, "0+90x30 2700+99x30"),
            series("batch_runner_upstream_errors_total", {"code": "503", "pod": "bg-1-run-1"}, "0+10x30 300+1x30"),
            series("batch_runner_upstream_errors_total", {"code": "400", "pod": "bg-1-run-1"}, "0x60"),
        ],
        "alert_rule_test": [
            {"eval_time": "25m", "alertname": "BatchGatewayUpstreamErrors",
             "exp_alerts": [{"exp_labels": {"namespace": NS, "severity": "warning"}, "exp_annotations": None}]},
            {"eval_time": "55m", "alertname": "BatchGatewayUpstreamErrors", "exp_alerts": []},
            {"eval_time": "25m", "alertname": "BatchGatewayUpstreamThrottled", "exp_alerts": []},
        ],
    },
    {   # a Workflow's runner pod failed three times; another's once
        "interval": "1m",
        "input_series": [
            *(series("kube_pod_status_phase", {"phase": "Failed", "pod": f"bg-0a1b-run-{i}"}, "1x10") for i in range(3)),
            series("kube_pod_status_phase", {"phase": "Failed", "pod": "bg-ffff-run-9"}, "1x10"),
            series("kube_pod_status_phase", {"phase": "Failed", "pod": "bg-ffff-reconcile-1"}, "1x10"),
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "BatchGatewayRunnerCrashLooping",
             "exp_alerts": [{"exp_labels": {"namespace": NS, "workflow": "bg-0a1b", "severity": "warning"},
                             "exp_annotations": None}]},
        ],
    },
    {   # unfinished batches pile up: 30 more within an hour
        "interval": "1m",
        "input_series": [
            series("batch_gateway_batches", {"status": "validating", "pod": "api-0"}, "0+0.5x120"),
            series("batch_gateway_batches", {"status": "in_progress", "pod": "api-0"}, "4x120"),
            series("batch_gateway_batches", {"status": "completed", "pod": "api-0"}, "0+3x120"),
        ],
        "alert_rule_test": [
            {"eval_time": "50m", "alertname": "BatchGatewayQueueGrowing", "exp_alerts": []},
            {"eval_time": "110m", "alertname": "BatchGatewayQueueGrowing",
             "exp_alerts": [{"exp_labels": {"namespace": NS, "severity": "warning"}, "exp_annotations": None}]},
        ],
    },
]


def test_alerts_fire_when_they_should(rules, tmp_path):
    """When and with which labels; the annotations (checked by `promtool check rules`) are left out here."""
    groups = yaml.safe_load(rules.read_text())
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    bare_rules = tmp_path / "rules.yaml"
    bare_rules.write_text(yaml.safe_dump(groups))
    for case in UNIT_TESTS:
        for check in case["alert_rule_test"]:
            for alert in check["exp_alerts"]:
                alert.pop("exp_annotations", None)
    spec = {"rule_files": [str(bare_rules)], "evaluation_interval": "1m", "tests": UNIT_TESTS}
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = subprocess.run([str(tools.require("promtool")), "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
