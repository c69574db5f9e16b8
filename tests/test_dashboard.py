"""The Grafana dashboard only charts metrics the code really exports."""

import json
import re
from pathlib import Path

from batch_gateway.api import metrics as api_metrics
from batch_gateway.runner import metrics as runner_metrics

DASHBOARD = Path(__file__).parent.parent / "infra" / "grafana" / "batch-gateway-dashboard.json"


def exported_names() -> set[str]:
    names = set()
    for module in (api_metrics, runner_metrics):
        for value in vars(module).values():
            describe = getattr(value, "describe", None)
            if callable(describe) and hasattr(value, "_name"):
                base = value._name
                names |= {base, base + "_total", base + "_bucket", base + "_sum", base + "_count"}
    return names


def test_every_dashboard_query_uses_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\b(batch_(?:gateway|runner)_[a-z_]+)", target["expr"]))
    assert used, "the dashboard charts nothing"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
