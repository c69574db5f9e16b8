"""Where requests go.

`--upstream URL` serves every model, `--upstream MODEL=URL` one model; `URL1,URL2` lists several endpoints (pods) of
one model. `k8s://namespace/service:port` is resolved to the ready pods of a Kubernetes Service. A trailing `/v1` on a
URL is accepted: the batch line's `url` (`/v1/chat/completions`) is appended to the root.
"""

from __future__ import annotations

DEFAULT_MODEL = "*"


def normalize_root(url: str) -> str:
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def parse_upstreams(items: list[str]) -> dict[str, list[str]]:
    """`["http://a:8000", "llama=http://b:8000,http://c:8000"]` → {"*": [a], "llama": [b, c]}."""
    routes: dict[str, list[str]] = {}
    for item in items:
        model, sep, urls = item.partition("=")
        if not sep or "://" in model:
            model, urls = DEFAULT_MODEL, item
        endpoints = [normalize_root(u) for u in urls.split(",") if u.strip()]
        if not endpoints:
            raise ValueError(f"--upstream {item!r}: no URL given")
        routes.setdefault(model.strip(), []).extend(endpoints)
    return routes


def endpoints_for(routes: dict[str, list[str]], model: str) -> list[str]:
    return routes.get(model) or routes.get(DEFAULT_MODEL) or []


async def resolve_endpoints(endpoints: list[str]) -> list[str]:
    """Expand `k8s://` entries into the pod URLs behind the Service."""
    resolved: list[str] = []
    for url in endpoints:
        if url.startswith("k8s://"):
            from batch_gateway.upstreams.discovery import discover_from_url

            resolved.extend(await discover_from_url(url))
        else:
            resolved.append(url)
    return resolved
