"""The simulator's HTTP face: an OpenAI-compatible API shaped like vLLM's, as a small raw ASGI app.

Raw ASGI (no framework) keeps the per-request overhead tiny, so the gateway's own overhead can be measured against
it with zero engine latency.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from typing import Any

import msgspec

from batch_gateway.sim.engine import Engine, SimConfig

_json = msgspec.json.Encoder()
_WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars watch quietly".split()


def _text(tokens: int, seed: int) -> str:
    return " ".join(_WORDS[(seed + i) % len(_WORDS)] for i in range(tokens))


def _error(status: int, message: str, err_type: str, code: str | None = None, param: str | None = None) -> tuple[int, bytes]:
    return status, _json.encode({"error": {"message": message, "type": err_type, "param": param, "code": code}})


def _prompt_text(path: str, body: dict[str, Any]) -> str:
    if path == "/v1/chat/completions":
        parts = []
        for message in body.get("messages") or ():
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"<|{message.get('role', '') if isinstance(message, dict) else ''}|>{content or ''}")
        return "".join(parts)
    prompt = body.get("prompt") if path == "/v1/completions" else body.get("input")
    if isinstance(prompt, list):
        return "\n".join(p if isinstance(p, str) else str(p) for p in prompt)
    return str(prompt or "")


class SimApp:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self.rng = random.Random(config.seed)
        self.started = False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.engine.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.engine.stop()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        status, payload, headers = await self.handle(scope["method"], scope["path"], body)
        request_id = "req_" + secrets.token_hex(8)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; version=0.0.4" if scope["path"] == "/metrics" else b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-request-id", request_id.encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def handle(self, method: str, path: str, raw: bytes) -> tuple[int, bytes, list]:
        if method == "GET":
            if path == "/health":
                return 200, b"{}", []
            if path == "/v1/models":
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "batch-gateway-sim"} for m in self.config.models]
                return 200, _json.encode({"object": "list", "data": data}), []
            if path == "/metrics":
                return 200, self.metrics().encode(), []
            if path == "/sim/stats":
                return 200, _json.encode(self.stats()), []
            return (*_error(404, f"Not found: {path}", "not_found_error"), [])
        if method != "POST":
            return (*_error(405, "Method not allowed", "invalid_request_error"), [])
        if path == "/sim/load":
            count = int(msgspec.json.decode(raw or b"{}").get("sequences", 0))
            self.engine.set_synthetic_load(count)
            return 200, _json.encode({"sequences": count}), []
        if path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            return (*_error(404, f"Not found: {path}", "not_found_error"), [])
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return (*_error(400, "The request body is not valid JSON.", "invalid_request_error"), [])
        if not isinstance(body, dict):
            return (*_error(400, "The request body must be a JSON object.", "invalid_request_error"), [])
        model = body.get("model")
        if model not in self.config.models:
            return (*_error(404, f"The model `{model}` does not exist.", "invalid_request_error", "model_not_found", "model"), [])
        if body.get("stream"):
            return (*_error(400, "The simulator does not stream.", "invalid_request_error", param="stream"), [])
        injected = self._inject_failure()
        if injected == "timeout":
            await asyncio.sleep(self.config.timeout_seconds)
            return (*_error(504, "Injected timeout.", "server_error"), [])
        if injected is not None:
            return injected
        return await self._complete(path, body, model)

    def _inject_failure(self) -> tuple[int, bytes, list] | str | None:
        config = self.config
        roll = self.rng.random()
        for rate, status, kind in (
            (config.error_rate_429, 429, "rate_limit_error"),
            (config.error_rate_500, 500, "server_error"),
            (config.error_rate_503, 503, "server_error"),
        ):
            if roll < rate:
                self.engine.stats.errors[str(status)] = self.engine.stats.errors.get(str(status), 0) + 1
                retry = [(b"retry-after", b"1")] if status in (429, 503) else []
                return (*_error(status, f"Injected {status}.", kind), retry)
            roll -= rate
        if roll < config.timeout_rate:
            self.engine.stats.errors["timeout"] = self.engine.stats.errors.get("timeout", 0) + 1
            return "timeout"
        return None

    async def _complete(self, path: str, body: dict[str, Any], model: str) -> tuple[int, bytes, list]:
        config = self.config
        if path == "/v1/embeddings":
            output_tokens = 1
        else:
            requested = body.get("max_completion_tokens") or body.get("max_tokens") or config.default_output_tokens
            if not isinstance(requested, int) or requested < 1:
                return (*_error(400, "max_tokens must be a positive integer.", "invalid_request_error", param="max_tokens"), [])
            output_tokens = min(requested, config.max_output_tokens)
        text = _prompt_text(path, body)
        sequence = await self.engine.generate(text, output_tokens)
        usage = {
            "prompt_tokens": sequence.prompt_tokens,
            "total_tokens": sequence.prompt_tokens + (0 if path == "/v1/embeddings" else output_tokens),
            "completion_tokens": 0 if path == "/v1/embeddings" else output_tokens,
            "prompt_tokens_details": {"cached_tokens": sequence.cached_tokens},
        }
        created = int(time.time())
        seed = len(text)
        finish = "length" if output_tokens == (body.get("max_completion_tokens") or body.get("max_tokens")) else "stop"
        if path == "/v1/chat/completions":
            response = {
                "id": "chatcmpl-" + secrets.token_hex(12),
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": _text(output_tokens, seed)},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage,
            }
        elif path == "/v1/completions":
            response = {
                "id": "cmpl-" + secrets.token_hex(12),
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": _text(output_tokens, seed), "logprobs": None, "finish_reason": finish}],
                "usage": usage,
            }
        else:
            inputs = body.get("input")
            count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
            rng = random.Random(seed)
            data = [{"object": "embedding", "index": i, "embedding": [round(rng.uniform(-1, 1), 6) for _ in range(config.embedding_dim)]}
                    for i in range(count)]
            response = {"object": "list", "data": data, "model": model, "usage": usage}
        return 200, _json.encode(response), []

    def stats(self) -> dict[str, Any]:
        s = self.engine.stats
        return {
            "requests": s.requests,
            "completed": s.completed,
            "prompt_tokens": s.prompt_tokens,
            "generation_tokens": s.generation_tokens,
            "prefix_cache_queries": s.prefix_queries,
            "prefix_cache_hits": s.prefix_hits,
            "prefix_cache_hit_rate": s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
            "steps": s.steps,
            "busy_seconds": s.busy_seconds,
            "running": len(self.engine.running),
            "waiting": len(self.engine.waiting),
            "kv_cache_usage": self.engine.kv_usage,
            "errors": s.errors,
        }

    def metrics(self) -> str:
        s = self.engine.stats
        lines = []
        for model in self.config.models:
            label = f'{{model_name="{model}"}}'
            for name, kind, value in (
                ("vllm:num_requests_running", "gauge", len(self.engine.running)),
                ("vllm:num_requests_waiting", "gauge", len(self.engine.waiting)),
                ("vllm:kv_cache_usage_perc", "gauge", self.engine.kv_usage),
                ("vllm:prefix_cache_queries", "counter", s.prefix_queries),
                ("vllm:prefix_cache_hits", "counter", s.prefix_hits),
                ("vllm:num_preemptions", "counter", 0),
                ("vllm:prompt_tokens", "counter", s.prompt_tokens),
                ("vllm:generation_tokens", "counter", s.generation_tokens),
                ("vllm:request_success", "counter", s.completed),
            ):
                suffix = "_total" if kind == "counter" else ""
                lines += [f"# TYPE {name} {kind}", f"{name}{suffix}{label} {value}"]
            # Only the first model carries the engine-wide figures; one engine serves every alias.
            break
        return "\n".join(lines) + "\n"
