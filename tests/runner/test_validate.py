"""Per-line validation: every OpenAI error code, with its line and param."""

import msgspec
import pytest

from batch_gateway.runner.validate import ValidLine, validate_line

CHAT = "/v1/chat/completions"


def line(**overrides) -> bytes:
    obj = {
        "custom_id": "r1",
        "method": "POST",
        "url": CHAT,
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    obj.update(overrides)
    return msgspec.json.encode({k: v for k, v in obj.items() if v is not ...})


def codes(result) -> list[tuple[str, str | None, int | None]]:
    assert isinstance(result, list), result
    return [(e.code, e.param, e.line) for e in result]


def test_valid_line_is_parsed():
    result = validate_line(line(), 1, CHAT)
    assert isinstance(result, ValidLine)
    assert (result.custom_id, result.model) == ("r1", "m")


def test_not_json():
    assert codes(validate_line(b"{not json", 7, CHAT)) == [("invalid_json_line", None, 7)]
    assert codes(validate_line(b"[1,2]", 8, CHAT)) == [("invalid_json_line", None, 8)]


def test_deeply_nested_json_is_an_invalid_line_not_a_crash():
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000):
        assert codes(validate_line(raw, 9, CHAT)) == [("invalid_json_line", None, 9)]


@pytest.mark.parametrize("missing", ["custom_id", "method", "url", "body"])
def test_missing_required_parameter(missing):
    result = validate_line(line(**{missing: ...}), 3, CHAT)
    assert codes(result) == [("missing_required_parameter", missing, 3)]
    assert result[0].message == f"Missing required parameter: '{missing}'."


@pytest.mark.parametrize("url", ["/v1/completions", "http://evil.example/v1/chat/completions", "v1/chat/completions"])
def test_url_must_be_the_batch_endpoint(url):
    assert codes(validate_line(line(url=url), 2, CHAT)) == [("invalid_url", "url", 2)]


def test_method_must_be_post():
    assert codes(validate_line(line(method="GET"), 4, CHAT)) == [("invalid_value", "method", 4)]


def test_streaming_unsupported():
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    result = validate_line(line(body=body), 5, CHAT)
    assert codes(result) == [("streaming_unsupported", "body.stream", 5)]
    assert "Streaming is not supported" in result[0].message


def test_model_and_messages_required():
    assert codes(validate_line(line(body={"messages": [{"role": "user", "content": "x"}]}), 6, CHAT)) == [
        ("invalid_request", "body.model", 6)
    ]
    assert codes(validate_line(line(body={"model": "m"}), 6, CHAT)) == [("invalid_request", "body.messages", 6)]


def test_body_must_be_object():
    assert codes(validate_line(line(body="text"), 9, CHAT)) == [("invalid_type", "body", 9)]


def test_embeddings_needs_input():
    embed = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}
    assert codes(validate_line(msgspec.json.encode(embed), 1, "/v1/embeddings")) == [
        ("invalid_request", "body.input", 1)
    ]


def test_method_must_be_exactly_post():
    for method in ("post", "Post", " POST"):
        result = validate_line(line(method=method), 4, CHAT)
        assert codes(result) == [("invalid_value", "method", 4)], method
        assert "Only 'POST' is supported" in result[0].message


def test_responses_lines_take_input_prompt_or_conversation():
    responses = "/v1/responses"

    def responses_line(body: dict) -> bytes:
        return msgspec.json.encode(
            {"custom_id": "r", "method": "POST", "url": responses, "body": {"model": "m", **body}}
        )

    for body in (
        {"input": "hi"},
        {"prompt": {"id": "pmpt_123", "variables": {"city": "Paris"}}},
        {"conversation": "conv_123"},
        {"conversation": {"id": "conv_123"}, "input": []},
    ):
        assert isinstance(validate_line(responses_line(body), 1, responses), ValidLine), body
    result = validate_line(responses_line({}), 2, responses)
    assert codes(result) == [("invalid_request", "body.input", 2)]
    assert "'prompt' or 'conversation'" in result[0].message


@pytest.mark.parametrize(
    ("endpoint", "good", "missing"),
    [
        ("/v1/moderations", {"input": "some text"}, [("invalid_request", "body.input")]),
        ("/v1/images/generations", {"prompt": "a red fox"}, [("invalid_request", "body.prompt")]),
        (
            "/v1/images/edits",
            {"prompt": "add a hat", "images": [{"file_id": "file-1"}]},
            [("invalid_request", "body.prompt"), ("invalid_request", "body.image")],
        ),
        ("/v1/videos", {"prompt": "a wave"}, [("invalid_request", "body.prompt")]),
    ],
)
def test_every_batch_endpoint_of_the_spec_is_validated(endpoint, good, missing):
    def endpoint_line(body: dict) -> bytes:
        return msgspec.json.encode(
            {"custom_id": "x", "method": "POST", "url": endpoint, "body": {"model": "m", **body}}
        )

    assert isinstance(validate_line(endpoint_line(good), 1, endpoint), ValidLine)
    assert [(c, p) for c, p, _ in codes(validate_line(endpoint_line({}), 3, endpoint))] == missing
    streamed = validate_line(endpoint_line({**good, "stream": True}), 4, endpoint)
    assert codes(streamed) == [("streaming_unsupported", "body.stream", 4)]
    assert validate_line(endpoint_line(good), 5, CHAT)[0].code == "invalid_url"  # the url must be the batch's
