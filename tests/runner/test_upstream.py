"""Upstream routing and reading usage out of response bodies."""

import pytest

from batch_gateway.runner.upstream import endpoints_for, normalize_root, parse_upstreams, usage_of


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
    chat = b'{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}}'
    u = usage_of(chat)
    assert (u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.reasoning_tokens, u.total_tokens) == (10, 4, 5, 2, 15)
    responses = b'{"usage":{"input_tokens":7,"output_tokens":3,"total_tokens":10,"input_tokens_details":{"cached_tokens":1}}}'
    u = usage_of(responses)
    assert (u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.total_tokens) == (7, 1, 3, 10)
    assert usage_of(b"not json").total_tokens == 0
    assert usage_of(b'{"usage":null}').total_tokens == 0
