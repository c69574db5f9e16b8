"""What the upstreams serve, asked rather than assumed: their models and the batch endpoints they answer.

Validation must not depend on how the gateway was started. Whether the upstreams were given as `--upstream URL`
(every model), `MODEL=URL` or `--simulate`, the runner asks them (`GET /v1/models`) whether they serve the batch's
model, and the API asks whether any of them answers the batch's endpoint before it accepts a batch:

- Models: an upstream serves the models its `/v1/models` lists. A model that no upstream routed to it lists fails the
  batch at validation (`model_not_found`, with the line), as at OpenAI.
- Endpoints: OpenAI-compatible servers do not list the endpoints they serve, so each is probed once with an empty
  JSON object: 404, 405 or 501 means the route does not exist there (a 404 about a model means it does); any other
  answer (400 for the missing fields, typically) means it does. The empty body does no work anywhere.
- An upstream that does not answer (down, restarting, no `/v1/models`) is unknown, never a "no": waiting is not
  failing, so the batch is accepted and its lines wait for the upstream as usual.

Answers are cached for `ttl` seconds (unknown ones for a few), per process: the API asks once in a while, a runner
once per batch. Nothing here names an upstream's address in a message a tenant could see.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

import aiohttp
import msgspec
import structlog

from batch_gateway.upstreams.routes import DEFAULT_MODEL, endpoints_for, resolve_endpoints

TTL_SECONDS = 30.0
UNKNOWN_TTL_SECONDS = 5.0
TIMEOUT_SECONDS = 3.0
NOT_SERVED_STATUSES = frozenset({404, 405, 501})
MAX_NAMED_MODELS = 20

log = structlog.get_logger("upstreams.catalog")


class _Model(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_Model]


_models_decoder = msgspec.json.Decoder(_ModelList)

Resolver = Callable[[list[str]], Awaitable[list[str]]]


def _not_served(models: Iterable[str]) -> str:
    names = sorted(models)
    if not names:
        return "no upstream serves it."
    shown = ", ".join(f"'{name}'" for name in names[:MAX_NAMED_MODELS])
    more = f" and {len(names) - MAX_NAMED_MODELS} more" if len(names) > MAX_NAMED_MODELS else ""
    return f"no upstream serves it (the models served are {shown}{more})."


class UpstreamCatalog:
    def __init__(
        self,
        routes: dict[str, list[str]],
        *,
        api_key: str | None = None,
        ttl: float = TTL_SECONDS,
        timeout: float = TIMEOUT_SECONDS,
        resolve: Resolver = resolve_endpoints,
    ) -> None:
        self.routes = routes
        self.ttl = ttl
        self.timeout = timeout
        self._resolve = resolve
        self._headers = {"content-type": "application/json"}
        if api_key:
            self._headers["authorization"] = f"Bearer {api_key}"
        self._models: dict[str, tuple[float, frozenset[str] | None]] = {}
        self._served: dict[tuple[str, str], tuple[float, bool | None]] = {}

    # --- questions ---------------------------------------------------------------------------------------------

    async def model_problem(self, model: str, path: str) -> str | None:
        """Why a batch of `model` at `path` cannot run on the upstreams routed to it, or None when it can (or when
        they cannot tell now)."""
        roots = endpoints_for(self.routes, model)
        if not roots:
            return _not_served([name for name in self.routes if name != DEFAULT_MODEL])
        targets, complete = await self._targets(roots)
        listed = await asyncio.gather(*(self.models(url) for url in targets))
        answered = [models for models in listed if models is not None]
        if complete and answered and len(answered) == len(targets) and not any(model in models for models in answered):
            return _not_served(set().union(*answered))
        candidates = [url for url, models in zip(targets, listed, strict=True) if models is None or model in models]
        served = await asyncio.gather(*(self.serves(url, path) for url in candidates))
        if complete and served and all(answer is False for answer in served):
            return f"the upstream serving it does not serve {path}."
        return None

    async def endpoint_problem(self, path: str) -> str | None:
        """Why no batch at `path` can run on any upstream, or None when one serves it (or may). With no upstream
        configured at all there is nothing to ask: the runner then fails the batch with `model_not_found`."""
        roots = list(dict.fromkeys(url for urls in self.routes.values() for url in urls))
        targets, complete = await self._targets(roots)
        served = await asyncio.gather(*(self.serves(url, path) for url in targets))
        if complete and served and all(answer is False for answer in served):
            return f"none of this gateway's model servers serves {path}."
        return None

    async def usable(self, model: str, path: str, urls: list[str]) -> list[str]:
        """`urls` without those known not to serve `model` at `path` (all of them if that would leave none: the
        batch validated against them, so they were fine then)."""
        kept = []
        for url in urls:
            models = await self.models(url)
            if models is not None and model not in models:
                continue
            if await self.serves(url, path) is False:
                continue
            kept.append(url)
        return kept or urls

    # --- answers, cached ---------------------------------------------------------------------------------------

    async def models(self, url: str) -> frozenset[str] | None:
        """The model ids `url` lists at /v1/models; None when it does not answer with a list."""
        cached = self._models.get(url)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        found: frozenset[str] | None = None
        try:
            async with self._session() as session, session.get(url + "/v1/models") as response:
                if response.status == 200:
                    found = frozenset(model.id for model in _models_decoder.decode(await response.read()).data)
        except (TimeoutError, aiohttp.ClientError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.info("catalog.models_unknown", error=type(exc).__name__)
        self._models[url] = (time.monotonic() + (self.ttl if found is not None else UNKNOWN_TTL_SECONDS), found)
        return found

    async def serves(self, url: str, path: str) -> bool | None:
        """Whether `url` has a POST route `path` (see the module docstring); None when it does not answer."""
        cached = self._served.get((url, path))
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        answer: bool | None = None
        try:
            async with self._session() as session, session.post(url + path, data=b"{}") as response:
                body = await response.read()
                answer = response.status not in NOT_SERVED_STATUSES or (
                    response.status == 404 and b"model" in body.lower()
                )
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.info("catalog.endpoint_unknown", path=path, error=type(exc).__name__)
        self._served[(url, path)] = (
            time.monotonic() + (self.ttl if answer is not None else UNKNOWN_TTL_SECONDS),
            answer,
        )
        return answer

    def _session(self) -> aiohttp.ClientSession:
        # A session per question: questions are rare (cached), and this keeps the catalog free of a lifecycle.
        return aiohttp.ClientSession(headers=self._headers, timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def _targets(self, roots: list[str]) -> tuple[list[str], bool]:
        """The URLs to ask (`k8s://` upstreams as their ready pods), and whether every root could be resolved: one
        that cannot (discovery trouble) is unknown, so no "no" may be concluded without it."""
        targets: list[str] = []
        complete = True
        for root in roots:
            try:
                targets.extend(await self._resolve([root]))
            except Exception as exc:
                complete = False
                log.info("catalog.resolve_failed", error=type(exc).__name__)
        return targets, complete
