"""The Terraform in infra/terraform/: formatted, and wired together (variables, locals, resources, module inputs and
outputs all refer to things that exist). Nothing is applied: there is no cluster here and `terraform init` needs the
registry. python-hcl2 parses the files; references are read from the `${...}` expressions it returns."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

TERRAFORM = Path(__file__).resolve().parents[2] / "infra" / "terraform"
MODULES = sorted(p for p in (TERRAFORM / "modules").iterdir() if p.is_dir())
ENVIRONMENTS = sorted(p for p in (TERRAFORM / "environments").iterdir() if p.is_dir())
REFERENCE = re.compile(r"\b(var|local|module)\.([A-Za-z_][A-Za-z0-9_-]*)(?:\.([A-Za-z_][A-Za-z0-9_-]*))?")
RESOURCE_REFERENCE = re.compile(r"\b((?:kubernetes|helm|random|aws)_[a-z0-9_]+)\.([A-Za-z_][A-Za-z0-9_-]*)")


def unquote(name: str) -> str:
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] == '"' else name


def clean(node: Any) -> Any:
    """The parsed HCL without python-hcl2's bookkeeping (comments, block markers) and with names unquoted."""
    if isinstance(node, dict):
        return {unquote(k): clean(v) for k, v in node.items() if not k.startswith("__")}
    if isinstance(node, list):
        return [clean(v) for v in node]
    return node


def expressions(node: Any) -> list[str]:
    """Every string that holds an expression (`${...}`); plain strings such as descriptions are left out."""
    if isinstance(node, dict):
        return [e for v in node.values() for e in expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in expressions(v)]
    return [node] if isinstance(node, str) and "${" in node else []


class Config:
    """One Terraform module directory: what it declares and what it references."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = {f.name: clean(hcl2.loads(f.read_text())) for f in sorted(path.glob("*.tf"))}
        assert self.files, f"no .tf files in {path}"
        self.variables: dict[str, dict] = {}
        self.outputs: dict[str, dict] = {}
        self.locals: set[str] = set()
        self.resources: set[tuple[str, str]] = set()
        self.modules: dict[str, dict] = {}
        for parsed in self.files.values():
            for block in parsed.get("variable", []):
                self.variables.update(block)
            for block in parsed.get("output", []):
                self.outputs.update(block)
            for block in parsed.get("locals", []):
                self.locals.update(block)
            for block in parsed.get("resource", []):
                for kind, named in block.items():
                    self.resources.update((kind, name) for name in named)
            for block in parsed.get("module", []):
                self.modules.update(block)
        self.references = [ref for parsed in self.files.values() for e in expressions(parsed) for ref in REFERENCE.findall(e)]
        self.resource_references = {ref for parsed in self.files.values() for e in expressions(parsed) for ref in RESOURCE_REFERENCE.findall(e)}


@pytest.mark.process
@pytest.mark.skipif(shutil.which("terraform") is None, reason="terraform is not on the PATH")
def test_terraform_fmt_check():
    result = subprocess.run(
        ["terraform", "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"terraform fmt would change files:\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("path", MODULES + ENVIRONMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_reference_resolves_and_every_variable_is_used(path):
    config = Config(path)
    used_variables = {name for kind, name, _ in config.references if kind == "var"}
    assert used_variables <= set(config.variables), f"undeclared variables: {used_variables - set(config.variables)}"
    assert set(config.variables) <= used_variables, f"declared but unused: {set(config.variables) - used_variables}"
    used_locals = {name for kind, name, _ in config.references if kind == "local"}
    assert used_locals <= config.locals, f"undefined locals: {used_locals - config.locals}"
    assert config.resource_references <= config.resources, f"unknown resources: {config.resource_references - config.resources}"
    for name, variable in config.variables.items():
        assert variable.get("description"), f"variable {name} has no description"
    for name, output in config.outputs.items():
        assert output.get("description"), f"output {name} has no description"
    for parsed in config.files.values():  # every module pins its providers
        for block in parsed.get("terraform", []):
            for providers in block.get("required_providers", []):
                for name, spec in providers.items():
                    assert spec.get("version"), f"provider {name} has no version constraint in {path}"


@pytest.mark.parametrize("path", ENVIRONMENTS, ids=lambda p: p.name)
def test_environment_wires_module_inputs_and_outputs(path):
    environment = Config(path)
    assert environment.modules, f"{path} calls no module"
    called: dict[str, Config] = {}
    for name, call in environment.modules.items():
        source = (path / unquote(call["source"])).resolve()
        assert source.is_dir(), f"module {name}: source {call['source']} does not exist"
        module = called[name] = Config(source)
        given = set(call) - {"source", "depends_on", "providers", "count", "for_each", "version"}
        assert given <= set(module.variables), f"module {name} has no inputs {given - set(module.variables)}"
        required = {v for v, spec in module.variables.items() if "default" not in spec}
        assert required <= given, f"module {name}: required inputs missing: {required - given}"
    for kind, name, attribute in environment.references:
        if kind == "module":
            assert name in called, f"reference to undeclared module {name}"
            assert not attribute or attribute in called[name].outputs, f"module.{name}.{attribute}: module {name} has no such output"


def test_gateway_module_installs_the_repository_chart():
    """The gateway module installs charts/batch-gateway (whose objects tests/infra/test_chart.py compares with the
    kustomize base and with the module's values); no second copy of the manifests hides in the module."""
    main = (TERRAFORM / "modules" / "gateway" / "main.tf").read_text()
    assert '"${path.module}/../../../../charts/batch-gateway"' in main
    assert (TERRAFORM / "modules" / "gateway" / "../../../../charts/batch-gateway/Chart.yaml").resolve().is_file()
    assert not list((TERRAFORM / "modules").rglob("Chart.yaml")), "a chart inside a module would drift"
    templates = TERRAFORM.parents[1] / "templates"
    listed = yaml.safe_load((templates / "kustomization.yaml").read_text())["resources"]
    objects = {f.name for f in templates.glob("*.yaml")} - {"kustomization.yaml", "kustomizeconfig.yaml", "secret.example.yaml"}
    assert set(listed) == objects, "the kustomize base lists every manifest in templates/"
