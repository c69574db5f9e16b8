"""Upstream routing, reading usage out of response bodies, and one exchange over real HTTP."""

import asyncio
import socket

import pytest
from aiohttp import web

from batch_gateway.runner.engine_metrics import stated_slots
from batch_gateway.runner.upstream import Exchange, Outcome, UpstreamClient, usage_of
from batch_gateway.upstreams.routes import endpoints_for, normalize_root, parse_upstreams


def test_parse_default_and_per_model_routes():
    routes = parse_upstreams(["http://a:8000/v1/", "llama=http://b:8000,http://c:8000/v1", "qwen=http://d:1"])
    assert routes == {"*": ["http://a:8000"], "llama": ["http://b:8000", "http://c:8000"], "qwen": ["http://d:1"]}
    assert endpoints_for(routes, "llama") == ["http://b:8000", "http://c:8000"]
    assert endpoints_for(routes, "other") == ["http://a:8000"]
    assert endpoints_for(parse_upstreams(["m=http://x"]), "other") == []


def test_empty_route_is_an_error():
    with pytest.raises(ValueError):
        parse_upstreams(["m="])


def test_normalize_root():
    assert normalize_root(" http://h:1/v1 ") == "http://h:1"
    assert normalize_root("http://h:1/") == "http://h:1"


def test_usage_from_chat_and_responses_shapes():
    chat = (
        b'{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,'
        b'"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}}'
    )
    u = usage_of(chat)
    assert (u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.reasoning_tokens, u.total_tokens) == (
        10,
        4,
        5,
        2,
        15,
    )
    responses = (
        b'{"usage":{"input_tokens":7,"output_tokens":3,"total_tokens":10,"input_tokens_details":{"cached_tokens":1}}}'
    )
    u = usage_of(responses)
    assert (u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.total_tokens) == (7, 1, 3, 10)
    assert usage_of(b"not json").total_tokens == 0
    assert usage_of(b'{"usage":null}').total_tokens == 0


@pytest.fixture
async def upstream():
    """A loopback HTTP server; handlers by path. Yields (url, the headers of the last request)."""
    seen: dict[str, str] = {}

    async def answer(request: web.Request) -> web.StreamResponse:
        seen.update(request.headers)
        if request.path == "/slow":
            await asyncio.sleep(1)
        if request.path == "/llama/props":
            return web.json_response({"total_slots": 8, "model_path": "/models/x.gguf"})
        if request.path == "/busy":
            return web.Response(status=429, headers={"retry-after-ms": "1500"}, text="busy")
        body = await request.read()
        return web.Response(body=body, content_type="application/json", headers={"x-request-id": "req_upstream"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_an_exchange_forwards_the_body_and_reads_status_id_and_retry_after(upstream):
    url, seen = upstream
    async with UpstreamClient(api_key="secret") as client:
        ok = await client.post(url, "/v1/chat/completions", b'{"n": 12345678901234567890}', timeout=5)
        busy = await client.post(url, "/busy", b"{}", timeout=5)
    assert (ok.status, ok.body, ok.request_id, ok.ok) == (200, b'{"n": 12345678901234567890}', "req_upstream", True)
    assert seen["Content-Type"] == "application/json" and seen["Authorization"] == "Bearer secret"
    assert (busy.status, busy.retry_after, busy.outcome) == (429, 1.5, Outcome.UNAVAILABLE)


async def test_no_answer_is_an_exchange_with_status_zero_not_an_exception(upstream):
    url, _ = upstream
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with UpstreamClient() as client:
        refused = await client.post(closed, "/v1/completions", b"{}", timeout=5)
        slow = await client.post(url, "/slow", b"{}", timeout=0.2)
        metrics = await client.get_text(closed + "/metrics", timeout=1)
    assert refused.status == 0 and refused.failure.startswith("connection") and refused.outcome is Outcome.UNAVAILABLE
    assert "127.0.0.1" not in refused.failure  # error lines reach tenants: never an internal address
    assert slow.status == 0 and slow.failure.startswith("timeout") and slow.outcome is Outcome.FAILED
    assert metrics is None


async def test_a_llama_cpp_server_states_its_slots_in_its_props(upstream):
    url, _ = upstream
    async with UpstreamClient() as client:
        assert await stated_slots(client, url + "/llama") == 8
        assert await stated_slots(client, url) is None  # not llama.cpp's props


def test_what_each_answer_means_for_its_line():
    def outcome(status: int, failure: str | None = None) -> Outcome:
        return Exchange(status, b"", "req", 0.1, failure=failure).outcome

    assert outcome(200) is Outcome.OK
    assert [outcome(s) for s in (400, 401, 404, 413, 422)] == [Outcome.REJECTED] * 5
    assert [outcome(s) for s in (429, 502, 503, 504)] == [Outcome.UNAVAILABLE] * 4
    assert outcome(0, "connection: ClientConnectorError") is Outcome.UNAVAILABLE
    assert [outcome(s) for s in (500, 501, 408, 409)] == [Outcome.FAILED] * 4
    assert outcome(0, "timeout after 600 s") is Outcome.FAILED


def test_an_answer_nested_too_deep_is_not_a_crash():
    deep = b'{"usage": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert usage_of(deep) == usage_of(b"{}")


def test_a_result_body_nested_too_deep_is_wrapped_not_a_crash():
    from batch_gateway.runner.dispatch import json_object_or_none

    assert json_object_or_none(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}") is None
    assert json_object_or_none(b' {"a": 1} ') == b'{"a": 1}'
