"""Every endpoint's shape as the openai SDK and a plain HTTP client see it, and the OpenAI error envelope."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from batch_gateway.sim import SimConfig, SimServer
from tests.sim.conftest import chat


@pytest.fixture(scope="module")
def sim():
    with SimServer(SimConfig(time_scale=0.02, seed=1)) as server:
        yield server


@pytest.fixture
def client(sim) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url + "/v1", api_key="sk-anything", max_retries=0)


def test_chat_completion(client):
    completion = client.chat.completions.create(**chat("there", max_tokens=6))
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == "sim-model" and completion.created > 1_600_000_000
    choice = completion.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.message.role == "assistant"
    assert len(choice.message.content.split()) == 6
    usage = completion.usage
    assert usage.completion_tokens == 6 and usage.prompt_tokens > 250
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    # The same prompt gets the same text; without max_tokens the model "stops" by itself after a seeded length.
    again = client.chat.completions.create(**chat("there", max_tokens=6))
    assert again.choices[0].message.content == choice.message.content
    free = client.chat.completions.create(**chat("there", max_tokens=None))
    assert free.choices[0].finish_reason == "stop" and 32 <= free.usage.completion_tokens <= 96


def test_max_completion_tokens_and_n(client):
    completion = client.chat.completions.create(**chat("x", max_tokens=None), max_completion_tokens=3, n=3)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert completion.usage.completion_tokens == 9


def test_text_completion_with_several_prompts(client):
    single = client.completions.create(model="sim-model", prompt="Once upon a time")
    assert single.id.startswith("cmpl-") and single.object == "text_completion"
    assert single.usage.completion_tokens == 16 and single.choices[0].finish_reason == "length"  # vLLM's default
    several = client.completions.create(model="sim-model", prompt=["one prompt", "another prompt"], max_tokens=2)
    assert [c.index for c in several.choices] == [0, 1] and several.usage.completion_tokens == 4
    tokens = client.completions.create(model="sim-model", prompt=list(range(100)), max_tokens=1)
    assert tokens.usage.prompt_tokens == 100


def test_embeddings_float_and_base64(client, sim):
    # The SDK asks for base64 and decodes it; a plain client gets floats. Both must agree.
    embedded = client.embeddings.create(model="sim-model", input=["alpha", "beta"])
    assert [d.index for d in embedded.data] == [
        0,
        1,
    ] and embedded.usage.prompt_tokens == 3  # 4 bytes per token, rounded up
    vector = embedded.data[0].embedding
    assert len(vector) == 8 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-5)
    raw = httpx.post(sim.url + "/v1/embeddings", json={"model": "sim-model", "input": "alpha", "dimensions": 8}).json()
    assert raw["object"] == "list" and raw["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(raw["data"][0]["embedding"], vector, strict=True))
    assert embedded.data[0].embedding != embedded.data[1].embedding
    assert len(client.embeddings.create(model="sim-model", input="x", dimensions=32).data[0].embedding) == 32


def test_responses(client):
    response = client.responses.create(
        model="sim-model", input="Tell me a story", instructions="Be brief.", max_output_tokens=5
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert len(response.output_text.split()) == 5
    assert response.usage.output_tokens == 5 and response.usage.input_tokens_details.cached_tokens == 0


def test_models_health_version(client, sim):
    assert [m.id for m in client.models.list()] == ["sim-model"]
    assert httpx.get(sim.url + "/health").status_code == 200
    assert httpx.get(sim.url + "/version").json()["version"]


def test_request_id_header_and_any_authorization(sim):
    response = httpx.post(sim.url + "/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer whatever"})
    assert response.status_code == 200 and len(response.headers["x-request-id"]) == 32
    echoed = httpx.post(sim.url + "/v1/chat/completions", json=chat(), headers={"x-request-id": "mine-1"})
    assert echoed.headers["x-request-id"] == "mine-1"


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_is_404_model_not_found(client, sim):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(**chat(model="nope"))
    assert caught.value.code == "model_not_found"
    error = _error(httpx.post(sim.url + "/v1/embeddings", json={"model": "nope", "input": "x"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model" and "nope" in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/responses", {"model": "sim-model", "input": "hi", "stream": True}, "stream"),
        ("/v1/chat/completions", {**chat(), "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {**chat(), "stream": True, "stream_options": []}, "stream_options"),
        ("/v1/chat/completions", {"model": "sim-model", "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": "sim-model", "messages": [{"content": "no role"}]}, "messages"),
        ("/v1/chat/completions", {**chat(), "max_tokens": 0}, "max_tokens"),
        ("/v1/chat/completions", {**chat(), "max_tokens": "ten"}, "max_tokens"),
        ("/v1/chat/completions", {**chat(), "n": 0}, "n"),
        ("/v1/completions", {"model": "sim-model", "prompt": [1, "mixed"]}, "prompt"),
        ("/v1/embeddings", {"model": "sim-model", "input": ""}, "input"),
        ("/v1/embeddings", {"model": "sim-model", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ("/v1/responses", {"model": "sim-model", "input": 3}, "input"),
    ],
)
def test_bad_requests_are_400_with_the_param(sim, path, body, param):
    assert _error(httpx.post(sim.url + path, json=body), 400)["param"] == param


def test_context_length_exceeded(start_sim):
    server = start_sim(time_scale=0, max_model_len=100)
    error = _error(
        httpx.post(server.url + "/v1/completions", json={"model": "sim-model", "prompt": "x" * 360, "max_tokens": 20}),
        400,
    )
    assert error["code"] == "context_length_exceeded" and "maximum context length is 100 tokens" in error["message"]


def test_not_json_unknown_path_and_wrong_method(sim):
    assert (
        _error(httpx.post(sim.url + "/v1/chat/completions", content=b"{nope"), 400)["type"] == "invalid_request_error"
    )
    assert _error(httpx.post(sim.url + "/v1/chat/completions", json=[1]), 400)
    assert _error(httpx.get(sim.url + "/v1/nothing"), 404)
    assert _error(httpx.get(sim.url + "/v1/chat/completions"), 405)
    assert _error(httpx.post(sim.url + "/v1/models"), 405)


def test_moderations_answer_openais_shape_deterministically(client, sim):
    first = client.moderations.create(model="sim-model", input=["a calm sentence", "another one"])
    assert first.id.startswith("modr-") and first.model == "sim-model" and len(first.results) == 2
    result = first.results[0]
    assert set(result.categories.model_dump(by_alias=True)) >= {"hate", "violence", "self-harm/intent"}
    assert all(0 <= score <= 1 for score in result.category_scores.model_dump().values())
    assert result.flagged == any(result.categories.model_dump().values())
    again = client.moderations.create(model="sim-model", input="a calm sentence")
    assert again.results[0].category_scores == result.category_scores  # the same text, the same scores
    parts = client.moderations.create(model="sim-model", input=[{"type": "text", "text": "hello"}])
    assert len(parts.results) == 1
    assert _error(httpx.post(sim.url + "/v1/moderations", json={"model": "sim-model"}), 400)["param"] == "input"
    assert _error(httpx.post(sim.url + "/v1/moderations", json={"model": "nope", "input": "x"}), 404)


def test_responses_take_a_prompt_template_or_a_conversation_instead_of_input(client, sim):
    for extra in ({"prompt": {"id": "pmpt_1", "variables": {"city": "Oslo"}}}, {"conversation": "conv_1"}):
        response = client.responses.create(model="sim-model", max_output_tokens=4, **extra)
        assert response.object == "response" and response.usage.input_tokens > 0
    assert _error(httpx.post(sim.url + "/v1/responses", json={"model": "sim-model"}), 400)["param"] == "input"


def test_chat_streams_its_tokens_with_usage_at_the_end(client):
    whole = client.chat.completions.create(**chat("streamed", max_tokens=5))
    chunks = list(
        client.chat.completions.create(
            **chat("streamed", max_tokens=5), stream=True, stream_options={"include_usage": True}
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert len(finishes) == 1 + 5  # the role, then a chunk per token
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its blocks were cached
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_with_vllms_continuous_usage(sim):
    body = {
        "model": "sim-model",
        "prompt": "count with me",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", sim.url + "/v1/completions", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    tokens = chunks[:-1]
    assert [c["usage"]["completion_tokens"] for c in tokens] == [1, 2, 3]
    assert all("prompt_tokens_details" not in c["usage"] for c in tokens)  # as vLLM's continuous usage
    whole = httpx.post(sim.url + "/v1/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert "".join(c["choices"][0]["text"] for c in tokens) == whole["choices"][0]["text"]
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
