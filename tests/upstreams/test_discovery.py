"""`k8s://` upstreams: the ready pods behind a Service, read from EndpointSlices served by the fake Kubernetes API."""

from __future__ import annotations

import pytest

from batch_gateway.upstreams.discovery import (
    DiscoveryError,
    ServiceRef,
    discover_endpoints,
    discover_from_url,
    parse_k8s_url,
)
from batch_gateway.upstreams.routes import parse_upstreams, resolve_endpoints
from tests.fakes.kube_api import KubeAPIServer

NS = "inference"


def endpoint_slice(name: str, service: str, ports: list[dict] | None, endpoints: list[dict]) -> dict:
    obj = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints,
    }
    if ports is not None:
        obj["ports"] = ports
    return obj


def pod(ip: str, ready: bool | None = True) -> dict:
    conditions = {} if ready is None else {"ready": ready, "serving": ready, "terminating": False}
    return {"addresses": [ip], "conditions": conditions}


@pytest.fixture
def kube():
    with KubeAPIServer() as server:
        http = [{"name": "http", "port": 8000, "protocol": "TCP"}]
        server.api.put(
            endpoint_slice("vllm-abc", "vllm", http, [pod("10.0.0.2"), pod("10.0.0.1"), pod("10.0.0.9", ready=False)])
        )
        server.api.put(endpoint_slice("vllm-def", "vllm", http, [pod("10.0.0.3", ready=None), pod("10.0.0.1")]))
        server.api.put(endpoint_slice("other-x", "other", http, [pod("10.9.9.9")]))
        server.api.put(endpoint_slice("cold-x", "cold", http, [pod("10.0.1.1", ready=False)]))
        server.api.put(endpoint_slice("v6-x", "v6", http, [pod("fd00::5")]))
        yield server


async def test_ready_pods_of_the_service_by_port_name_or_number(kube):
    expected = ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000"]  # not-ready .9 left out
    assert await discover_endpoints(NS, "vllm", "http", api_client=kube.api_client()) == expected
    assert await discover_endpoints(NS, "vllm", 8000, api_client=kube.api_client()) == expected
    assert await discover_endpoints(NS, "v6", "http", api_client=kube.api_client()) == ["http://[fd00::5]:8000"]
    assert await discover_endpoints(NS, "cold", "http", api_client=kube.api_client()) == []


async def test_wrong_port_and_missing_service_are_clear_errors(kube):
    with pytest.raises(DiscoveryError, match=r"no port 80 .*http=8000"):
        await discover_endpoints(NS, "vllm", 80, api_client=kube.api_client())
    with pytest.raises(DiscoveryError, match="no EndpointSlices: does the Service exist"):
        await discover_endpoints(NS, "missing", "http", api_client=kube.api_client())


async def test_a_url_without_ready_pods_is_an_error_not_an_empty_pool(kube):
    with pytest.raises(DiscoveryError, match="no ready pod"):
        await discover_from_url(f"k8s://{NS}/cold:http", api_client=kube.api_client())


def test_parse_k8s_urls(monkeypatch):
    assert parse_k8s_url("k8s://inference/vllm:8000") == ServiceRef("inference", "vllm", 8000)
    assert parse_k8s_url("k8s://vllm:http", default_namespace="ns1") == ServiceRef("ns1", "vllm", "http")
    for bad in (
        "k8s://vllm",
        "k8s://Inference/vllm:80",
        "k8s://a/b/c:80",
        "http://vllm:80",
        "k8s://ns/vllm:99999",
        "k8s://ns/vllm:",
    ):
        with pytest.raises(ValueError):
            parse_k8s_url(bad, default_namespace="ns1")
    with pytest.raises(ValueError, match="names no namespace"):
        parse_k8s_url("k8s://vllm:http")


async def test_the_runner_resolves_k8s_upstreams_through_its_kubeconfig(kube, tmp_path, monkeypatch):
    """What the runner does at dispatch: `MODEL=k8s://...` expands to pod URLs, other URLs stay as they are."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kube.write_kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.setenv("POD_NAMESPACE", NS)
    routes = parse_upstreams(["sim-model=k8s://vllm:http,http://static:9000", "k8s://other-ns/x:1"])
    assert routes["sim-model"] == ["k8s://vllm:http", "http://static:9000"]
    resolved = await resolve_endpoints(routes["sim-model"])
    assert resolved == ["http://10.0.0.1:8000", "http://10.0.0.2:8000", "http://10.0.0.3:8000", "http://static:9000"]
