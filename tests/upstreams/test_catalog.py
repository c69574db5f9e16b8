"""What the upstreams serve, asked over real HTTP: the simulator, an aiohttp server playing other engines' answers, and
a port nobody listens on."""

from __future__ import annotations

import pytest
from aiohttp import web

from batch_gateway.sim import SimConfig, SimServer
from batch_gateway.upstreams.catalog import UpstreamCatalog
from batch_gateway.upstreams.routes import parse_upstreams
from tests.helpers import free_port


@pytest.fixture(scope="module")
def sim():
    with SimServer(SimConfig(time_scale=0, models=["llama", "qwen"])) as server:
        yield server


@pytest.fixture
async def other_engine():
    """An engine that lists `other-model`, answers 404 with a model error on chat, 501 on embeddings (llama.cpp
    without --embeddings) and FastAPI's plain 404 elsewhere; every request is counted."""
    asked: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        asked.append(f"{request.method} {request.path}")
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "other-model", "object": "model"}]})
        if request.path == "/v1/chat/completions":
            return web.json_response({"error": {"message": "The model `None` does not exist."}}, status=404)
        if request.path == "/v1/embeddings":
            return web.json_response({"error": {"message": "This server does not support embeddings."}}, status=501)
        return web.json_response({"detail": "Not Found"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", asked
    await runner.cleanup()


def catalog(*upstreams: str) -> UpstreamCatalog:
    return UpstreamCatalog(parse_upstreams(list(upstreams)), timeout=2.0)


DOWN = "http://127.0.0.1:9"  # the discard port: nothing listens


async def test_models_are_asked_in_every_upstream_mode(sim):
    for upstreams in ([sim.url], [f"llama={sim.url}"], [f"llama={sim.url}", f"qwen={sim.url}"]):
        assert await catalog(*upstreams).model_problem("llama", "/v1/chat/completions") is None, upstreams
    problem = await catalog(sim.url).model_problem("gpt-4o", "/v1/chat/completions")
    assert problem == "no upstream serves it (the models served are 'llama', 'qwen')."
    # A route naming a model its upstream does not serve is caught too (vLLM would answer every line 404).
    assert (await catalog(f"gpt-4o={sim.url}").model_problem("gpt-4o", "/v1/chat/completions")).startswith(
        "no upstream serves it"
    )
    assert await catalog(f"llama={sim.url}").model_problem("qwen", "/v1/chat/completions") == (
        "no upstream serves it (the models served are 'llama')."
    )
    assert await catalog().model_problem("llama", "/v1/chat/completions") == "no upstream serves it."


async def test_an_upstream_that_does_not_answer_is_unknown_never_a_no(sim):
    assert await catalog(DOWN).model_problem("anything", "/v1/chat/completions") is None
    assert await catalog(DOWN).endpoint_problem("/v1/images/generations") is None
    # One upstream answers without the model, another is down: it may be the down one's, so no verdict.
    assert await catalog(sim.url, DOWN).model_problem("gpt-4o", "/v1/chat/completions") is None


async def test_endpoints_are_probed(sim, other_engine):
    other, _ = other_engine
    sims = catalog(sim.url)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations"):
        assert await sims.endpoint_problem(path) is None, path
    assert await sims.endpoint_problem("/v1/images/generations") == (
        "none of this gateway's model servers serves /v1/images/generations."
    )
    assert await sims.model_problem("llama", "/v1/videos") == "the upstream serving it does not serve /v1/videos."

    engine = catalog(other)
    assert await engine.endpoint_problem("/v1/chat/completions") is None  # a 404 about a model: the route exists
    assert await engine.endpoint_problem("/v1/embeddings") is not None  # 501
    assert await engine.endpoint_problem("/v1/moderations") is not None  # plain 404
    both = catalog(sim.url, other)
    assert await both.endpoint_problem("/v1/moderations") is None  # one of them serves it
    assert await both.model_problem("other-model", "/v1/moderations") is not None  # but not the one with the model


async def test_answers_are_cached_briefly(other_engine):
    other, asked = other_engine
    engine = catalog(other)
    for _ in range(3):
        await engine.model_problem("other-model", "/v1/chat/completions")
    assert asked.count("GET /v1/models") == 1 and asked.count("POST /v1/chat/completions") == 1
    fresh = UpstreamCatalog(parse_upstreams([other]), ttl=0)
    await fresh.models(other)
    await fresh.models(other)
    assert asked.count("GET /v1/models") == 3


async def test_dispatch_keeps_only_upstreams_that_serve_the_model(sim, other_engine):
    other, _ = other_engine
    both = catalog(sim.url, other, DOWN)
    assert await both.usable("llama", "/v1/chat/completions", [sim.url, other, DOWN]) == [sim.url, DOWN]
    assert await both.usable("gone", "/v1/chat/completions", [sim.url, other]) == [sim.url, other]  # never none


async def test_k8s_upstreams_are_asked_pod_by_pod_and_unresolvable_ones_are_unknown(sim):
    async def resolve(urls: list[str]) -> list[str]:
        if urls == ["k8s://inference/vllm:8000"]:
            return [sim.url]
        if urls[0].startswith("k8s://"):
            raise RuntimeError("no ready pod")
        return urls

    pods = UpstreamCatalog(parse_upstreams(["k8s://inference/vllm:8000"]), resolve=resolve)
    assert await pods.model_problem("llama", "/v1/chat/completions") is None
    assert (await pods.model_problem("gpt-4o", "/v1/chat/completions")).startswith("no upstream serves it")
    broken = UpstreamCatalog(parse_upstreams(["k8s://inference/gone:8000"]), resolve=resolve)
    assert await broken.model_problem("gpt-4o", "/v1/chat/completions") is None
    assert await broken.endpoint_problem("/v1/images/edits") is None
