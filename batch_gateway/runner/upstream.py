"""One HTTP exchange with an upstream endpoint, and the usage read out of its answer. (Where requests go:
`upstreams/routes.py`.)"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import msgspec

from batch_gateway import ids
from batch_gateway.runner import metrics as runner_metrics
from batch_gateway.wire import TokenUsage

if TYPE_CHECKING:
    from batch_gateway.tracing import UpstreamTracing


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
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # an upstream's answer is input too
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


class Outcome(enum.Enum):
    """What an attempt means for its line."""

    OK = "ok"  # 2xx: the result
    REJECTED = "rejected"  # a 4xx saying the request itself is bad: the final result, not retried
    UNAVAILABLE = "unavailable"  # "not now" (no connection, reset, 429, 502-504): wait for the endpoint, then resend
    FAILED = "failed"  # 500 and other 5xx, 408, 409, a timeout: retry this line a few times, then report it


# "Not now" answers: the endpoint (or a proxy or rate limiter before it) cannot take work at the moment.
UNAVAILABLE_STATUSES = frozenset({429, 502, 503, 504})
# 4xx that say nothing about the request itself.
RETRYABLE_CLIENT_STATUSES = frozenset({408, 409})


@dataclass
class Exchange:
    """The outcome of one attempt: an HTTP response, or a transport failure (`status == 0`)."""

    status: int
    body: bytes
    request_id: str
    latency: float
    retry_after: float | None = None
    failure: str | None = None  # when there was no response: "timeout" or "connection", then the error's type

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def code(self) -> str:
        """The status as a metric label: "429", "503", ..., or "timeout" / "connection" without an answer."""
        return str(self.status) if self.status else (self.failure or "connection").split(" ", 1)[0].rstrip(":")

    @property
    def timed_out(self) -> bool:
        return self.status == 0 and (self.failure or "").startswith("timeout")

    @property
    def outcome(self) -> Outcome:
        if self.ok:
            return Outcome.OK
        if self.status == 0:
            # A timeout may be this request's own doing (a very long generation); no connection at all is not.
            return Outcome.FAILED if self.timed_out else Outcome.UNAVAILABLE
        if self.status in UNAVAILABLE_STATUSES:
            return Outcome.UNAVAILABLE
        if self.status >= 500 or self.status in RETRYABLE_CLIENT_STATUSES:
            return Outcome.FAILED
        return Outcome.REJECTED


def _retry_after(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue  # an HTTP date: fall back to our own backoff
    return None


# Below the 5 s keep-alive of vLLM's (uvicorn's) server, so that we never reuse a connection the server is closing:
# a reset there reads as "not now" (`Outcome.UNAVAILABLE`), and the line is sent again for nothing.
KEEPALIVE_SECONDS = 4.0


class UpstreamClient:
    """One pool of keep-alive connections to every upstream endpoint. aiohttp, not httpx: at a few hundred requests
    in flight httpx's pool costs milliseconds of CPU per request (benchmarks/overhead.py measures both), enough to
    make the runner, not the engine, the bottleneck. No connection limit here: the per-endpoint limiters decide."""

    def __init__(self, *, api_key: str | None = None, tracing: UpstreamTracing | None = None) -> None:
        self.tracing = tracing  # None while tracing is off: then it costs one test per request
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> UpstreamClient:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS)
        self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use UpstreamClient as `async with UpstreamClient() as client:`")
        return self._session

    async def post(
        self, endpoint: str, path: str, body: bytes, timeout: float, *, headers: Mapping[str, str] | None = None
    ) -> Exchange:
        """One attempt. Never raises for HTTP or transport trouble: that is an Exchange with `status == 0`."""
        span = None
        if self.tracing is not None:  # off: this test is all tracing costs
            trace_headers, span = self.tracing.start(endpoint, path)
            headers = {**headers, **trace_headers} if headers else trace_headers
        exchange = await self._post(endpoint, path, body, timeout, headers)
        if not exchange.ok:
            runner_metrics.UPSTREAM_ERRORS.labels(exchange.code).inc()
        if span is not None:
            self.tracing.end(span, exchange)  # type: ignore[union-attr]
        return exchange

    async def _post(
        self, endpoint: str, path: str, body: bytes, timeout: float, headers: Mapping[str, str] | None
    ) -> Exchange:
        started = time.monotonic()
        try:
            async with self.session.post(
                endpoint + path, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                content = await response.read()
        except TimeoutError:
            return Exchange(
                0, b"", ids.new_request_id(), time.monotonic() - started, failure=f"timeout after {timeout:g} s"
            )
        except aiohttp.ClientError as exc:
            # The type only: the exception's text names the upstream's address, which tenants must never see.
            failure = f"connection: {type(exc).__name__}"
            return Exchange(0, b"", ids.new_request_id(), time.monotonic() - started, failure=failure)
        return Exchange(
            response.status,
            content,
            response.headers.get("x-request-id") or ids.new_request_id(),
            time.monotonic() - started,
            retry_after=_retry_after(response.headers),
        )

    async def get_text(self, url: str, timeout: float) -> str | None:
        """GET a small text document; None unless it answered 200 in time."""
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return await response.text() if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, UnicodeDecodeError):
            return None
