"""Where scripts/install-control-plane.sh puts the test control plane: pinned versions, a cache folder outside the
repository, and the files in it. The script and these tests read the same versions file."""

from __future__ import annotations

import functools
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO / "scripts" / "control-plane-versions.env"
INSTALL_SCRIPT = "scripts/install-control-plane.sh"


@functools.cache
def versions() -> dict[str, str]:
    found = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


def cache_dir() -> Path:
    """BATCH_GATEWAY_CONTROL_PLANE_CACHE, else ~/.cache/batch-gateway/control-plane (XDG_CACHE_HOME respected)."""
    if os.environ.get("BATCH_GATEWAY_CONTROL_PLANE_CACHE"):
        return Path(os.environ["BATCH_GATEWAY_CONTROL_PLANE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "batch-gateway" / "control-plane"


def argo_dir() -> Path:
    return cache_dir() / f"argo-{versions()['ARGO_VERSION']}"


def argo_crds_dir() -> Path:
    """Argo's full CRDs (manifests/base/crds/full/*.yaml of the Argo module), as the install script extracted them."""
    path = argo_dir() / "crds"
    if not (path / "argoproj.io_workflows.yaml").is_file():
        raise FileNotFoundError(
            f"Argo's CRDs are not in {path}. Run `{INSTALL_SCRIPT}` (make test does) to extract them from the Argo "
            f"Workflows {versions()['ARGO_VERSION']} Go module."
        )
    return path


def binaries() -> dict[str, Path]:
    """The control plane's programs, as the install script built them; a clear error when any is missing."""
    v = versions()
    found = {
        "etcd": cache_dir() / f"etcd-{v['ETCD_VERSION']}" / "bin" / "etcd",
        "kube-apiserver": cache_dir() / f"kubernetes-{v['KUBERNETES_VERSION']}" / "bin" / "kube-apiserver",
        "kube-controller-manager": cache_dir()
        / f"kubernetes-{v['KUBERNETES_VERSION']}"
        / "bin"
        / "kube-controller-manager",
        "workflow-controller": argo_dir() / "bin" / "workflow-controller",
        "argo": argo_dir() / "bin" / "argo",
    }
    missing = [str(p) for p in found.values() if not os.access(p, os.X_OK)]
    if missing:
        raise FileNotFoundError(
            f"the test control plane is not built: missing {', '.join(missing)}. Run `{INSTALL_SCRIPT}` (make test "
            "does)."
        )
    return found


def kubectl() -> str:
    """The pinned kubectl the install script built (tests never use another one from the PATH)."""
    path = cache_dir() / f"kubernetes-{versions()['KUBERNETES_VERSION']}" / "bin" / "kubectl"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(
            f"kubectl is not built: missing {path}. Run `{INSTALL_SCRIPT} kubectl` (make test does)."
        )
    return str(path)
