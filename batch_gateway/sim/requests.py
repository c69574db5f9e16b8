"""Read an OpenAI request body into the sequences the engine runs, with the errors vLLM and OpenAI would give."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from batch_gateway.sim.config import SimConfig
from batch_gateway.sim.tokens import Prompt, prompt_from_text, prompt_from_token_ids, unbounded_output_length

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
MODERATIONS = "/v1/moderations"  # not vLLM's: served so that batches of it can be tested end to end
ENDPOINTS = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MODERATIONS)
MAX_N = 128
MAX_EMBEDDING_DIM = 8192
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for the legacy completions endpoint


class RequestError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or []


@dataclass
class Job:
    endpoint: str
    model: str
    prompts: list[Prompt]  # one per input; each runs as `n` sequences
    output_tokens: list[int]  # per prompt
    n: int = 1
    length_limited: bool = True  # the output ends at max_tokens (finish_reason "length"), else it "stops" by itself
    dimensions: int = 0
    base64: bool = False
    priority: int = 0  # vLLM's extension: lower is scheduled first under --scheduling-policy priority
    stream: bool = False  # answer in server-sent events as the steps give tokens (chat and completions)
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (vLLM's): usage in every chunk


def decode_body(raw: bytes) -> dict[str, Any]:
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise RequestError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    return body


def parse_job(endpoint: str, body: dict[str, Any], config: SimConfig) -> Job:
    if endpoint == MODERATIONS:
        return _moderation_job(body, config)
    model = body.get("model", config.models[0])  # vLLM serves its one model when none is named
    if model not in config.models:
        raise RequestError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    stream, include_usage, continuous_usage = _streaming(endpoint, body)
    priority = _priority(body, config)
    block = config.block_size
    if endpoint == CHAT:
        prompts = [prompt_from_text(_chat_text(body.get("messages")), block)]
    elif endpoint == RESPONSES:
        prompts = [prompt_from_text(_responses_text(body.get("input"), body.get("instructions"), body), block)]
    else:
        field = "prompt" if endpoint == COMPLETIONS else "input"
        prompts = _prompts(body.get(field), field, block)
    if endpoint == EMBEDDINGS:
        return _embedding_job(model, prompts, body, config, priority)
    n = body.get("n", 1) if endpoint != RESPONSES else 1
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise RequestError(400, f"n must be an integer from 1 to {MAX_N}.", param="n")
    asked = _max_tokens(endpoint, body)
    outputs = []
    for prompt in prompts:
        if asked is None:
            wanted = unbounded_output_length(prompt.key, config.seed, config.default_output_tokens)
            wanted = min(wanted, config.max_output_tokens, config.max_model_len - prompt.tokens)
        else:
            wanted = min(asked, config.max_output_tokens)
        if prompt.tokens + (asked or 1) > config.max_model_len:
            if asked is None:
                detail = f"your messages resulted in {prompt.tokens} tokens"
            else:
                detail = (
                    f"you requested {prompt.tokens + asked} tokens ({prompt.tokens} in the messages, {asked} in "
                    "the completion)"
                )
            raise RequestError(
                400,
                f"This model's maximum context length is {config.max_model_len} tokens. However, {detail}. Please "
                "reduce the length of the messages or completion.",
                param="messages" if endpoint == CHAT else "input" if endpoint == RESPONSES else "prompt",
                code="context_length_exceeded",
            )
        outputs.append(wanted)
    return Job(
        endpoint,
        model,
        prompts,
        outputs,
        n=n,
        length_limited=asked is not None,
        priority=priority,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
    )


def _streaming(endpoint: str, body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """`stream` and its `stream_options`, as vLLM reads them: (stream, include_usage, continuous_usage_stats)."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream not in (None, False, True):
        raise RequestError(400, "stream must be a boolean.", param="stream")
    if stream and endpoint not in (CHAT, COMPLETIONS):
        raise RequestError(
            400,
            "The simulator streams /v1/chat/completions and /v1/completions only; send stream: false.",
            param="stream",
        )
    if options is None:
        return bool(stream), False, False
    if not stream:
        raise RequestError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
    if not isinstance(options, dict):
        raise RequestError(400, "stream_options must be an object.", param="stream_options")
    include, continuous = options.get("include_usage"), options.get("continuous_usage_stats")
    if include not in (None, False, True) or continuous not in (None, False, True):
        raise RequestError(400, "stream_options' fields must be booleans.", param="stream_options")
    return True, bool(include), bool(include and continuous)


def _priority(body: dict[str, Any], config: SimConfig) -> int:
    priority = body.get("priority", 0)
    if not _is_int(priority):
        raise RequestError(400, "priority must be an integer.", param="priority")
    if config.scheduling_policy != "priority":
        return 0  # as vLLM's V1 engines: ignored without the priority policy (V0 engines answered a 400)
    return priority


def _embedding_job(model: str, prompts: list[Prompt], body: dict[str, Any], config: SimConfig, priority: int) -> Job:
    for prompt in prompts:
        if prompt.tokens > config.max_model_len:
            raise RequestError(
                400,
                f"This model's maximum context length is {config.max_model_len} tokens. However, you requested "
                f"{prompt.tokens} tokens in the input for embedding generation. Please reduce the length of the input.",
                param="input",
                code="context_length_exceeded",
            )
    dimensions = body.get("dimensions")
    if dimensions is None:
        dimensions = config.embedding_dim
    if not _is_int(dimensions) or not 1 <= dimensions <= MAX_EMBEDDING_DIM:
        raise RequestError(400, f"dimensions must be an integer from 1 to {MAX_EMBEDDING_DIM}.", param="dimensions")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise RequestError(400, "encoding_format must be 'float' or 'base64'.", param="encoding_format")
    return Job(
        EMBEDDINGS,
        model,
        prompts,
        [1] * len(prompts),
        dimensions=dimensions,
        base64=encoding == "base64",
        priority=priority,
    )


def _max_tokens(endpoint: str, body: dict[str, Any]) -> int | None:
    names: tuple[str, ...]
    if endpoint == CHAT:
        names = ("max_completion_tokens", "max_tokens")
    elif endpoint == RESPONSES:
        names = ("max_output_tokens",)
    else:
        names = ("max_tokens",)
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise RequestError(400, f"{name} must be a positive integer.", param=name)
        return value
    return COMPLETIONS_DEFAULT_MAX_TOKENS if endpoint == COMPLETIONS else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _content_text(content: object, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict):
                raise RequestError(400, "Each content part must be an object.", param=param)
            text = part.get("text")
            # Images, audio and files count by their JSON size: crude, but deterministic.
            parts.append(text if isinstance(text, str) else msgspec.json.encode(part).decode())
        return "".join(parts)
    raise RequestError(400, "Message content must be a string or a list of content parts.", param=param)


def _chat_text(messages: object) -> str:
    """The prompt as a chat template would lay it out: role markers, contents, and the assistant's turn."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of messages.", param="messages")
    parts = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(400, f"messages[{index}] must be an object with a string `role`.", param="messages")
        text = _content_text(message.get("content"), "messages")
        if message.get("tool_calls"):
            text += msgspec.json.encode(message["tool_calls"]).decode()
        parts.append(f"<|{message['role']}|>{text}")
    parts.append("<|assistant|>")
    return "".join(parts)


def _responses_text(items: object, instructions: object, body: dict[str, Any]) -> str:
    parts = [f"<|system|>{instructions}"] if isinstance(instructions, str) and instructions else []
    # A stored prompt template or a conversation stands in for (or adds to) the input; the simulator stores
    # neither, so their references count by their JSON.
    references = [name for name in ("prompt", "conversation") if body.get(name)]
    parts += [f"<|{name}|>" + msgspec.json.encode(body[name]).decode() for name in references]
    if isinstance(items, str) and items:
        parts.append(f"<|user|>{items}")
    elif isinstance(items, list) and items:
        for item in items:
            if not isinstance(item, dict):
                raise RequestError(400, "Each input item must be an object.", param="input")
            if isinstance(item.get("role"), str):
                parts.append(f"<|{item['role']}|>{_content_text(item.get('content'), 'input')}")
            else:  # tool calls, their outputs, reasoning items: their JSON counts
                parts.append(msgspec.json.encode(item).decode())
    elif items is not None or not references:
        raise RequestError(400, "input must be a non-empty string or list of input items.", param="input")
    parts.append("<|assistant|>")
    return "".join(parts)


def _prompts(value: object, field: str, block: int) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(value, str) and value:
        return [prompt_from_text(value, block)]
    if isinstance(value, list) and value:
        if all(_is_int(v) for v in value):
            return [prompt_from_token_ids(value, block)]
        if all(isinstance(v, str) and v for v in value):
            return [prompt_from_text(v, block) for v in value]
        if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
            return [prompt_from_token_ids(v, block) for v in value]
    raise RequestError(
        400,
        f"{field} must be a non-empty string, list of strings, list of token ids or list of token-id lists.",
        param=field,
    )


def _moderation_job(body: dict[str, Any], config: SimConfig) -> Job:
    """OpenAI's moderations request: `input` is a string, a list of strings, or a list of text and image parts
    (classified as one input); it runs as a pooling request, like an embedding."""
    model = body.get("model", config.models[0])
    if model not in config.models:
        raise RequestError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
    value = body.get("input")
    if isinstance(value, list) and value and all(isinstance(part, dict) for part in value):
        prompts = [prompt_from_text(_content_text(value, "input"), config.block_size)]
    else:
        prompts = _prompts(value, "input", config.block_size)
    return Job(MODERATIONS, model, prompts, [1] * len(prompts))
