"""The simulator's HTTP face: vLLM's OpenAI-compatible API as a small raw ASGI app.

Raw ASGI (no framework) and msgspec keep the per-request overhead tiny, so the gateway's own overhead can be measured
against the simulator in zero-latency mode.

Routes: POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses (each with vLLM's optional integer
`priority`; chat and completions stream with `stream: true`, as vLLM's do); GET /v1/models, /health, /version,
/metrics; POST /reset_prefix_cache (as vLLM's). Test hooks: GET /sim/stats (JSON counters), POST /sim/load
(`{"sequences": N, "context_tokens": 512, "model": ...}`: N interactive sequences that take slots until set back to
0), POST /sim/pause and /sim/resume (hold the scheduler, so arrivals pile up and are admitted in one step).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from batch_gateway.sim import bodies, metrics
from batch_gateway.sim.config import SimConfig
from batch_gateway.sim.engine import Engine, Sequence
from batch_gateway.sim.requests import EMBEDDINGS, ENDPOINTS, MODERATIONS, Job, RequestError, decode_body, parse_job

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]

_json = msgspec.json.Encoder()
_JSON = b"application/json"
_TEXT = b"text/plain; version=0.0.4; charset=utf-8"
_EVENTS = b"text/event-stream"
_SIM_VERSION = "0.1.0-sim"


class SimApp:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engines = {model: Engine(config, model) for model in config.models}
        self.rng = random.Random(config.seed)
        self.injected = {"429": 0, "500": 0, "503": 0, "timeout": 0}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                for engine in self.engines.values():
                    engine.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for engine in self.engines.values():
                    await engine.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        message = await receive()
        raw = message.get("body", b"")
        while message.get("more_body"):
            message = await receive()
            raw += message.get("body", b"")
        method, path = scope["method"], scope["path"]
        content_type = _JSON
        try:
            if path in ENDPOINTS:
                if method != "POST":
                    raise RequestError(405, f"Method {method} not allowed on {path}; use POST.")
                answer = await self._generate(path, raw, scope, receive, send)
                if answer is None:
                    return  # streamed, or the client went away
            else:
                answer = self._control(method, path, raw)
                if path == "/metrics":
                    content_type = _TEXT
        except RequestError as exc:
            body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
            answer = (exc.status, _json.encode(body), exc.headers)
        status, payload, headers = answer
        await send(
            _start(
                status,
                scope,
                [(b"content-type", content_type), (b"content-length", str(len(payload)).encode()), *headers],
            )
        )
        await send({"type": "http.response.body", "body": payload})

    # --- the engine endpoints -----------------------------------------------------------------------

    async def _generate(
        self, path: str, raw: bytes, scope: dict[str, Any], receive: Receive, send: Send
    ) -> Answer | None:
        job = parse_job(path, decode_body(raw), self.config)
        injected = self._inject_failure()
        if injected == "timeout":
            finished, _ = await _unless_disconnected(asyncio.sleep(self.config.timeout_seconds), receive)
            if not finished:
                return None
            raise RequestError(504, "Injected timeout: the engine did not answer in time.", type="server_error")
        self._check_fits(job)
        if job.stream:
            await self._stream(job, scope, receive, send)
            return None
        if self.config.instant:  # nothing to wait for: skip the disconnect watch and its overhead
            result = await self._run(job)
        else:
            finished, result = await _unless_disconnected(self._run(job), receive)
            if not finished:
                return None
        return 200, _json.encode(result), []

    def _check_fits(self, job: Job) -> None:
        engine = self.engines[job.model]
        for prompt, tokens in zip(job.prompts, job.output_tokens, strict=True):
            if not engine.fits(prompt.tokens + tokens):
                raise RequestError(
                    400,
                    f"The request needs {prompt.tokens + tokens} tokens of KV cache; the engine "
                    f"holds {self.config.kv_blocks * self.config.block_size}.",
                    param="max_tokens",
                )

    def _runs(
        self, job: Job, on_token: Callable[[int], Callable[[Sequence], None]] | None = None
    ) -> list[Awaitable[Sequence]]:
        """The job's sequences (for each prompt, its `n`), each told of its tokens through `on_token(index)`."""
        engine = self.engines[job.model]
        finish = "length" if job.length_limited else "stop"
        pooling = job.endpoint in (EMBEDDINGS, MODERATIONS)
        pairs = [pair for pair in zip(job.prompts, job.output_tokens, strict=True) for _ in range(job.n)]
        return [
            engine.generate(
                prompt,
                tokens,
                pooling=pooling,
                finish_reason=finish,
                priority=job.priority,
                on_token=on_token(index) if on_token else None,
            )
            for index, (prompt, tokens) in enumerate(pairs)
        ]

    async def _run(self, job: Job) -> dict[str, Any]:
        runs = self._runs(job)
        sequences = [await runs[0]] if len(runs) == 1 else list(await asyncio.gather(*runs))
        return bodies.build(job, sequences)

    async def _stream(self, job: Job, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        """Answer in server-sent events as the tokens come, as vLLM does; a client that goes away aborts the job."""
        tokens: asyncio.Queue[tuple[int, Sequence, int]] = asyncio.Queue()  # a step's: (choice, sequence, upto)

        def told(index: int) -> Callable[[Sequence], None]:
            return lambda sequence: tokens.put_nowait((index, sequence, sequence.generated))

        runs = [asyncio.ensure_future(run) for run in self._runs(job, told)]
        watcher = asyncio.ensure_future(_disconnected(receive))
        sid, created = bodies.stream_id(job), int(time.time())
        try:
            await send(_start(200, scope, [(b"content-type", _EVENTS), (b"cache-control", b"no-cache")]))
            sent = [0] * len(runs)
            left = len(runs)
            while left:
                taking = asyncio.ensure_future(tokens.get())
                await asyncio.wait((taking, watcher), return_when=asyncio.FIRST_COMPLETED)
                if not taking.done():
                    taking.cancel()
                    return  # the client went away: `finally` aborts the sequences
                index, sequence, upto = taking.result()
                events = bodies.stream_chunks(job, sid, created, index, sequence, sent[index], upto)
                sent[index] = upto
                left -= upto >= sequence.output_tokens
                await send({"type": "http.response.body", "body": _events(events), "more_body": True})
            sequences = [await run for run in runs]
            last = [bodies.usage_chunk(job, sid, created, sequences)] if job.include_usage else []
            await send({"type": "http.response.body", "body": _events(last) + b"data: [DONE]\n\n"})
        finally:
            watcher.cancel()
            for run in runs:
                run.cancel()  # a finished one ignores it; an unfinished one is aborted in the engine

    def _inject_failure(self) -> str | None:
        config = self.config
        roll = self.rng.random()
        for kind, rate in (
            ("429", config.error_rate_429),
            ("500", config.error_rate_500),
            ("503", config.error_rate_503),
            ("timeout", config.timeout_rate),
        ):
            if roll < rate:
                self.injected[kind] += 1
                if kind == "timeout":
                    return kind
                retry = [(b"retry-after", str(config.retry_after_seconds).encode())] if kind != "500" else []
                if kind == "429":
                    raise RequestError(
                        429,
                        "Injected rate limit: too many requests.",
                        type="rate_limit_error",
                        code="rate_limit_exceeded",
                        headers=retry,
                    )
                if kind == "503":
                    raise RequestError(
                        503,
                        "Injected overload: the engine is unavailable.",
                        type="server_error",
                        code="service_unavailable",
                        headers=retry,
                    )
                raise RequestError(500, "Injected internal server error.", type="server_error")
            roll -= rate
        return None

    # --- everything else -----------------------------------------------------------------------------

    def _control(self, method: str, path: str, raw: bytes) -> Answer:
        routes: dict[tuple[str, str], Callable[[bytes], Any]] = {
            ("GET", "/health"): lambda _: b"",
            ("GET", "/version"): lambda _: {"version": _SIM_VERSION},
            ("GET", "/v1/models"): lambda _: self._models(),
            ("GET", "/metrics"): lambda _: metrics.render(self.engines.values()).encode(),
            ("GET", "/sim/stats"): lambda _: self.stats(),
            ("POST", "/sim/load"): self._set_load,
            ("POST", "/sim/pause"): lambda body: self._pause(body, True),
            ("POST", "/sim/resume"): lambda body: self._pause(body, False),
            ("POST", "/reset_prefix_cache"): lambda _: {
                "reset_blocks": sum(e.reset_prefix_cache() for e in self.engines.values())
            },
        }
        handler = routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in routes):
                raise RequestError(405, f"Method {method} not allowed on {path}.")
            raise RequestError(404, f"Not found: {path}", type="not_found_error")
        result = handler(raw)
        return 200, result if isinstance(result, bytes) else _json.encode(result), []

    def _models(self) -> dict[str, Any]:
        data = [
            {
                "id": m,
                "object": "model",
                "created": 0,
                "owned_by": "vllm",
                "root": m,
                "parent": None,
                "max_model_len": self.config.max_model_len,
            }
            for m in self.config.models
        ]
        return {"object": "list", "data": data}

    def _engines_named(self, body: dict[str, Any]) -> list[Engine]:
        model = body.get("model")
        if model is None:
            return list(self.engines.values())
        if model not in self.engines:
            raise RequestError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return [self.engines[model]]

    def _set_load(self, raw: bytes) -> dict[str, Any]:
        body = decode_body(raw or b"{}")
        count, context = body.get("sequences", 0), body.get("context_tokens", 512)
        for value, name in ((count, "sequences"), (context, "context_tokens")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RequestError(400, f"{name} must be a non-negative integer.", param=name)
        for engine in self._engines_named(body):
            engine.set_synthetic_load(count, context)
        return {"sequences": count, "context_tokens": context}

    def _pause(self, raw: bytes, paused: bool) -> dict[str, Any]:
        for engine in self._engines_named(decode_body(raw or b"{}")):
            engine.pause(paused)
        return {"paused": paused}

    def stats(self) -> dict[str, Any]:
        """Counters of every engine, their totals at the top level, and the injected failures."""
        per_model = {model: engine.snapshot() for model, engine in self.engines.items()}
        totals: dict[str, Any] = {}
        for snapshot in per_model.values():
            for key, value in snapshot.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals[key] = totals.get(key, 0) + value
                elif isinstance(value, dict):
                    merged = totals.setdefault(key, {})
                    for name, count in value.items():
                        merged[name] = merged.get(name, 0) + count
        queries = totals.get("prefix_cache_queries", 0)
        totals["prefix_cache_hit_rate"] = totals.get("prefix_cache_hits", 0) / queries if queries else 0.0
        totals["kv_cache_usage"] = max(s["kv_cache_usage"] for s in per_model.values())
        return {**totals, "injected": dict(self.injected), "models": per_model}


def _start(status: int, scope: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The response's start, with the caller's x-request-id echoed (or a new one)."""
    request_id = next((v for k, v in scope["headers"] if k == b"x-request-id"), None) or secrets.token_hex(16).encode()
    return {"type": "http.response.start", "status": status, "headers": [*headers, (b"x-request-id", request_id)]}


def _events(chunks: list[dict[str, Any]]) -> bytes:
    return b"".join(b"data: " + _json.encode(chunk) + b"\n\n" for chunk in chunks)


async def _unless_disconnected(work: Awaitable[Any], receive: Receive) -> tuple[bool, Any]:
    """Await `work` unless the client disconnects first; then cancel it (as vLLM aborts the request): (False, None)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return True, task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False, None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
