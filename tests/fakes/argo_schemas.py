"""Argo's full-CRD schemas, made strict so that a misspelled field is an error.

The schemas are the `openAPIV3Schema` of the full CRDs (`manifests/base/crds/full/` of the Argo Workflows Go module),
which scripts/install-control-plane.sh extracts into its cache (tests/control_plane/paths.py). They carry no
`additionalProperties: false`; `strict()` adds it to every object schema that lists `properties` and does not say
`x-kubernetes-preserve-unknown-fields`. CRD schemas leave `metadata` as a bare object (the API server checks ObjectMeta
itself), so `metadata_errors()` does the checks that matter here: names and labels. CEL rules
(`x-kubernetes-validations`) are not checked here; the real API server of the control-plane tests checks them.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Any

import jsonschema
import yaml

from tests.control_plane.paths import argo_crds_dir

ARGO_KINDS = ("Workflow", "WorkflowTemplate", "CronWorkflow")

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def strict(schema: Any) -> Any:
    """A copy of `schema` in which every object with `properties` rejects properties it does not list."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


@functools.cache
def validator(kind: str) -> jsonschema.Draft7Validator:
    if kind not in ARGO_KINDS:
        raise ValueError(f"no Argo schema for kind {kind!r}")
    return jsonschema.Draft7Validator(strict(crd_schema(kind)))


@functools.cache
def crd(kind: str) -> dict[str, Any]:
    """The full CustomResourceDefinition of an Argo kind (Workflow, WorkflowTemplate, ...)."""
    path = argo_crds_dir() / f"argoproj.io_{kind.lower()}s.yaml"
    with path.open() as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # a few MB: libyaml when present


def crd_schema(kind: str) -> dict[str, Any]:
    """The `openAPIV3Schema` of an Argo kind's served version (v1alpha1)."""
    (version,) = [v for v in crd(kind)["spec"]["versions"] if v["served"]]
    return version["schema"]["openAPIV3Schema"]


def metadata_errors(obj: dict[str, Any]) -> list[str]:
    meta = obj.get("metadata") or {}
    errors = []
    name = meta.get("name")
    if name is None and not meta.get("generateName"):
        errors.append("metadata.name: required")
    if name is not None and (len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name)):
        errors.append(f"metadata.name {name!r}: not a DNS-1123 subdomain (lowercase letters, digits, '-', '.')")
    for key, value in (meta.get("labels") or {}).items():
        prefix, _, label = key.rpartition("/")
        if (prefix and not _DNS1123_SUBDOMAIN.match(prefix)) or not _LABEL_NAME.match(label) or len(label) > 63:
            errors.append(f"metadata.labels: invalid key {key!r}")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            errors.append(f"metadata.labels[{key}]: invalid value {value!r}")
    for key, value in (meta.get("annotations") or {}).items():
        if not isinstance(value, str):
            errors.append(f"metadata.annotations[{key}]: not a string")
    return errors


def errors(obj: dict[str, Any]) -> list[str]:
    """Every schema and metadata error of an Argo object, as readable strings (empty when valid)."""
    found = [
        f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message}"
        for error in validator(obj.get("kind", "")).iter_errors(obj)
    ]
    return found + metadata_errors(obj)
