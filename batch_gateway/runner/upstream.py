"""Where requests go, and one HTTP exchange with an upstream endpoint.

`--upstream URL` serves every model, `--upstream MODEL=URL` one model; `URL1,URL2` lists several endpoints (pods) of
one model. `k8s://namespace/service:port` is resolved to the ready pods of a Kubernetes Service. A trailing `/v1` on a
URL is accepted: the batch line's `url` (`/v1/chat/completions`) is appended to the root.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import msgspec

from batch_gateway import ids

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
            from batch_gateway.runner.discovery import discover_from_url

            resolved.extend(await discover_from_url(url))
        else:
            resolved.append(url)
    return resolved


class TokenUsage(msgspec.Struct):
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0


class _Details(msgspec.Struct):
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class _UsageBody(msgspec.Struct):
    # Chat/Completions/Embeddings name them prompt/completion; the Responses API names them input/output.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None
    completion_tokens_details: _Details | None = None
    output_tokens_details: _Details | None = None


class _ResponseBody(msgspec.Struct):
    usage: _UsageBody | None = None


_response_decoder = msgspec.json.Decoder(_ResponseBody)


def usage_of(body: bytes) -> TokenUsage:
    try:
        usage = _response_decoder.decode(body).usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return TokenUsage()
    if usage is None:
        return TokenUsage()
    prompt = usage.prompt_tokens if usage.prompt_tokens is not None else usage.input_tokens or 0
    completion = usage.completion_tokens if usage.completion_tokens is not None else usage.output_tokens or 0
    in_details = usage.prompt_tokens_details or usage.input_tokens_details
    out_details = usage.completion_tokens_details or usage.output_tokens_details
    return TokenUsage(
        prompt_tokens=prompt,
        cached_tokens=(in_details.cached_tokens or 0) if in_details else 0,
        completion_tokens=completion,
        reasoning_tokens=(out_details.reasoning_tokens or 0) if out_details else 0,
        total_tokens=usage.total_tokens if usage.total_tokens is not None else prompt + completion,
    )


@dataclass
class Exchange:
    """The outcome of one attempt: an HTTP response, or a transport failure (`status == 0`)."""

    status: int
    body: bytes
    request_id: str
    latency: float
    retry_after: float | None = None
    failure: str | None = None  # "timeout" or "connection" when there was no response

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def transient(self) -> bool:
        """Worth retrying: overload, server errors, and no answer at all."""
        return self.status == 0 or self.status in (408, 429) or self.status >= 500


def _retry_after(headers: httpx.Headers) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue  # an HTTP date: fall back to our own backoff
    return None


async def send(client: httpx.AsyncClient, endpoint: str, path: str, body: bytes, timeout: float) -> Exchange:
    started = time.monotonic()
    try:
        response = await client.post(
            endpoint + path, content=body, headers={"content-type": "application/json"}, timeout=timeout
        )
    except httpx.TimeoutException as exc:
        return Exchange(0, b"", ids.new_request_id(), time.monotonic() - started, failure=f"timeout: {exc!r}")
    except httpx.TransportError as exc:
        return Exchange(0, b"", ids.new_request_id(), time.monotonic() - started, failure=f"connection: {exc!r}")
    request_id = response.headers.get("x-request-id") or ids.new_request_id()
    return Exchange(
        response.status_code,
        response.content,
        request_id,
        time.monotonic() - started,
        retry_after=_retry_after(response.headers),
    )
