"""A Kubernetes API client for the Argo executor and Service discovery.

Inside a pod the ServiceAccount token is used (in-cluster config); elsewhere the kubeconfig (`KUBECONFIG` or
`~/.kube/config`). Tests pass their own `ApiClient` pointed at a loopback API server instead.
"""

from __future__ import annotations

import os
import re

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

# DNS-1123 label: what Kubernetes accepts for most object names and for label values without a prefix.
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_VALUE_MAX = 63

SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class KubeConfigError(RuntimeError):
    """No way to reach a Kubernetes API server from this process."""


def load_api_client() -> client.ApiClient:
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException as exc:
            raise KubeConfigError(f"running in a pod but the in-cluster Kubernetes config is unusable: {exc}") from exc
    else:
        try:
            # the kubernetes package reads KUBECONFIG once at import; read it now so a later setting counts
            kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except (ConfigException, OSError) as exc:
            raise KubeConfigError(
                "cannot reach Kubernetes: not running in a pod (KUBERNETES_SERVICE_HOST is unset) and no usable "
                f"kubeconfig (KUBECONFIG or ~/.kube/config): {exc}"
            ) from exc
    return client.ApiClient(configuration)


def own_namespace() -> str | None:
    """The namespace this pod runs in: POD_NAMESPACE (downward API) or the ServiceAccount's namespace file."""
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def is_label_value(value: str) -> bool:
    return len(value) <= LABEL_VALUE_MAX and bool(LABEL_VALUE.match(value))
