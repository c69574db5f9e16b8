"""Upstream discovery on Kubernetes: `k8s://[namespace/]service:port` → the ready pods behind a Service.

`--upstream MODEL=k8s://inference/vllm:8000` sends the runner to every ready pod of Service `vllm` in namespace
`inference`, pod by pod, instead of through the Service's virtual IP: the runner balances requests itself (with prefix
affinity and a concurrency controller per endpoint), which a kube-proxy round robin would defeat.

- The pods come from the Service's EndpointSlices (`discovery.k8s.io/v1`, label `kubernetes.io/service-name`); an
  endpoint counts when its `ready` condition is true or unset (unset means ready, per the API).
- `port` is either a number, matched against the pods' (target) port numbers in the slices, or a name, matched
  against the Service port names (`k8s://vllm:http`). A named port keeps working when the Service port and the
  container port differ.
- Without a namespace (`k8s://vllm:http`) the runner's own namespace is used (POD_NAMESPACE, or the ServiceAccount's).
- The runner's ServiceAccount needs `get` and `list` on `endpointslices` (templates/role-discovery.yaml).

The pod set is read when a batch starts dispatching; pods that become ready later join the next batch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re

import msgspec
import structlog
from kubernetes import client

from batch_gateway.executor.kube import load_api_client, own_namespace

_NAME = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"  # DNS-1123 label
_REF = re.compile(rf"^k8s://(?:(?P<namespace>{_NAME})/)?(?P<service>{_NAME}):(?P<port>[0-9]+|{_NAME})$")

log = structlog.get_logger("upstreams.discovery")


class DiscoveryError(RuntimeError):
    """The Service's pods could not be found (bad reference, no such Service, no ready pod, API unreachable)."""


class ServiceRef(msgspec.Struct, frozen=True):
    namespace: str
    service: str
    port: int | str  # a number: the pods' port; a name: the Service port's name


def parse_k8s_url(url: str, *, default_namespace: str | None = None) -> ServiceRef:
    """Parse `k8s://[namespace/]service:port`; a missing namespace falls back to `default_namespace`."""
    match = _REF.match(url.strip())
    if not match:
        raise ValueError(
            f"upstream {url!r}: expected k8s://[namespace/]service:port, e.g. k8s://inference/vllm:8000 or "
            "k8s://vllm:http (lowercase DNS names; port as a number or a Service port name)"
        )
    namespace = match.group("namespace") or default_namespace
    if not namespace:
        raise ValueError(
            f"upstream {url!r} names no namespace and this process does not run in a pod; use k8s://NAMESPACE/..."
        )
    port_text = match.group("port")
    port: int | str = int(port_text) if port_text.isdigit() else port_text
    if isinstance(port, int) and not 0 < port < 65536:
        raise ValueError(f"upstream {url!r}: port {port} is out of range")
    return ServiceRef(namespace=namespace, service=match.group("service"), port=port)


async def discover_from_url(url: str, api_client: client.ApiClient | None = None) -> list[str]:
    """The `http://ip:port` URLs of the ready pods behind a `k8s://` upstream. Raises DiscoveryError when none."""
    ref = parse_k8s_url(url, default_namespace=own_namespace())
    urls = await discover_endpoints(ref.namespace, ref.service, ref.port, api_client=api_client)
    if not urls:
        raise DiscoveryError(
            f"upstream {url}: Service {ref.namespace}/{ref.service} has no ready pod serving port {ref.port!r} "
            "(are the model server pods up and ready?)"
        )
    log.info("discovery.endpoints", upstream=url, endpoints=urls)
    return urls


async def discover_endpoints(
    namespace: str, service: str, port: int | str, api_client: client.ApiClient | None = None
) -> list[str]:
    """`http://<ready pod ip>:<port>` for every ready endpoint of the Service, sorted; [] if none is ready."""
    owned = api_client is None
    api_client = api_client or load_api_client()
    try:
        api = client.DiscoveryV1Api(api_client)
        slices = await asyncio.to_thread(
            api.list_namespaced_endpoint_slice,
            namespace,
            label_selector=f"kubernetes.io/service-name={service}",
            _request_timeout=(5.0, 30.0),
        )
    except client.exceptions.ApiException as exc:
        raise DiscoveryError(
            f"cannot list EndpointSlices of Service {namespace}/{service}: HTTP {exc.status} {exc.reason}"
        ) from exc
    except Exception as exc:  # urllib3 connection errors and the like
        raise DiscoveryError(f"cannot list EndpointSlices of Service {namespace}/{service}: {exc}") from exc
    finally:
        if owned:
            api_client.close()
    if not slices.items:
        raise DiscoveryError(f"Service {namespace}/{service} has no EndpointSlices: does the Service exist?")
    urls: set[str] = set()
    matched = False
    for endpoint_slice in slices.items:
        target = _slice_port(endpoint_slice, port)
        if target is None:
            continue
        matched = True
        for endpoint in endpoint_slice.endpoints or []:
            conditions = endpoint.conditions
            if conditions is not None and conditions.ready is False:
                continue
            if endpoint.addresses:  # the addresses of one endpoint are interchangeable: use the first
                urls.add(f"http://{_host(endpoint.addresses[0])}:{target}")
    if not matched:
        known = sorted({f"{p.name or '-'}={p.port}" for s in slices.items for p in (s.ports or [])})
        raise DiscoveryError(
            f"Service {namespace}/{service} has no port {port!r} (its pods serve {', '.join(known) or 'no ports'}; "
            "give a port name or the pods' port number)"
        )
    return sorted(urls)


def _slice_port(endpoint_slice: client.V1EndpointSlice, port: int | str) -> int | None:
    ports = endpoint_slice.ports
    if not ports:  # no ports listed means "all ports" (a Service without ports): only a number can be used
        return port if isinstance(port, int) else None
    for candidate in ports:
        if isinstance(port, int) and candidate.port == port:
            return candidate.port
        if isinstance(port, str) and candidate.name == port and candidate.port is not None:
            return candidate.port
    return None


def _host(address: str) -> str:
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address  # an FQDN endpoint
