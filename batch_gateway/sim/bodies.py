"""Response bodies shaped like vLLM's OpenAI server: ids, objects, choices, deterministic text and vectors, usage."""

from __future__ import annotations

import base64
import math
import random
import secrets
import struct
import time
from typing import Any

from batch_gateway.sim.engine import Sequence
from batch_gateway.sim.requests import CHAT, COMPLETIONS, EMBEDDINGS, MODERATIONS, Job
from batch_gateway.sim.tokens import output_text


def build(job: Job, sequences: list[Sequence]) -> dict[str, Any]:
    """`sequences` are in the job's order: for each prompt, its `n` sequences."""
    if job.endpoint == EMBEDDINGS:
        return _embeddings(job, sequences)
    if job.endpoint == MODERATIONS:
        return _moderations(job)
    finish = "length" if job.length_limited else "stop"
    prompt_tokens, completion_tokens, cached = _counts(job, sequences)
    texts = [output_text(s.prompt.key + i % job.n, s.generated) for i, s in enumerate(sequences)]
    created = int(time.time())
    if job.endpoint == CHAT:
        return {
            "id": "chatcmpl-" + secrets.token_hex(16),
            "object": "chat.completion",
            "created": created,
            "model": job.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
                for i, text in enumerate(texts)
            ],
            "usage": _usage(prompt_tokens, completion_tokens, cached),
        }
    if job.endpoint == COMPLETIONS:
        return {
            "id": "cmpl-" + secrets.token_hex(16),
            "object": "text_completion",
            "created": created,
            "model": job.model,
            "choices": [
                {"index": i, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
                for i, text in enumerate(texts)
            ],
            "usage": _usage(prompt_tokens, completion_tokens, cached),
        }
    return {  # /v1/responses
        "id": "resp_" + secrets.token_hex(16),
        "object": "response",
        "created_at": created,
        "model": job.model,
        "status": "incomplete" if job.length_limited else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if job.length_limited else None,
        "error": None,
        "output": [
            {
                "type": "message",
                "id": "msg_" + secrets.token_hex(16),
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": texts[0], "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _counts(job: Job, sequences: list[Sequence]) -> tuple[int, int, int]:
    """The answer's prompt, completion and cached tokens (the cache hit of each prompt's first sequence)."""
    prompt_tokens = sum(p.tokens for p in job.prompts)
    cached = sum(sequences[i * job.n].cached_tokens or 0 for i in range(len(job.prompts)))
    return prompt_tokens, sum(s.generated for s in sequences), cached


_CHUNK_OBJECTS = {CHAT: "chat.completion.chunk", COMPLETIONS: "text_completion"}


def stream_id(job: Job) -> str:
    return ("chatcmpl-" if job.endpoint == CHAT else "cmpl-") + secrets.token_hex(16)


def stream_chunks(
    job: Job, sid: str, created: int, index: int, sequence: Sequence, sent: int, upto: int
) -> list[dict[str, Any]]:
    """The chunks for output tokens `sent` to `upto` of `sequence` (choice `index`), made in one step: on its first
    token a chat answer starts with the role (as vLLM's does), then the new text, with the finish reason on its
    last token."""
    key = sequence.prompt.key + index % job.n
    text = output_text(key, upto)[len(output_text(key, sent)) :]
    finish = None
    if upto >= sequence.output_tokens:
        finish = "length" if job.length_limited else "stop"
    usage = _usage(sequence.prompt.tokens, upto, None) if job.continuous_usage else None
    choices: list[dict[str, Any]]
    if job.endpoint == CHAT:
        deltas = [{"role": "assistant", "content": ""}] if sent == 0 else []
        deltas.append({"content": text})
        choices = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None} for delta in deltas]
        choices[-1]["finish_reason"] = finish
    else:
        choices = [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]
    chunks = []
    for choice in choices:
        chunk = {
            "id": sid,
            "object": _CHUNK_OBJECTS[job.endpoint],
            "created": created,
            "model": job.model,
            "choices": [choice],
        }
        if usage is not None:
            chunk["usage"] = usage
        chunks.append(chunk)
    return chunks


def usage_chunk(job: Job, sid: str, created: int, sequences: list[Sequence]) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the whole answer's usage."""
    usage = _usage(*_counts(job, sequences))
    return {
        "id": sid,
        "object": _CHUNK_OBJECTS[job.endpoint],
        "created": created,
        "model": job.model,
        "choices": [],
        "usage": usage,
    }


def _usage(prompt_tokens: int, completion_tokens: int, cached: int | None) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # vLLM's continuous usage (in every chunk of a stream) leaves the details out
        **({"prompt_tokens_details": {"cached_tokens": cached}} if cached is not None else {}),
    }


def _embeddings(job: Job, sequences: list[Sequence]) -> dict[str, Any]:
    data = []
    for index, prompt in enumerate(job.prompts):
        vector = embedding_vector(prompt.key, job.dimensions)
        encoded: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if job.base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(p.tokens for p in job.prompts)
    return {
        "id": "embd-" + secrets.token_hex(16),
        "object": "list",
        "created": int(time.time()),
        "model": job.model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


def _moderations(job: Job) -> dict[str, Any]:
    """OpenAI's moderation object, with scores fixed by the input (mostly harmless, now and then flagged)."""
    results = []
    for prompt in job.prompts:
        rng = random.Random(prompt.key)
        scores = {category: round(rng.random() ** 12, 6) for category in MODERATION_CATEGORIES}
        results.append(
            {
                "flagged": any(score > 0.5 for score in scores.values()),
                "categories": {category: score > 0.5 for category, score in scores.items()},
                "category_scores": scores,
                "category_applied_input_types": {category: ["text"] for category in MODERATION_CATEGORIES},
            }
        )
    return {"id": "modr-" + secrets.token_hex(16), "model": job.model, "results": results}


def embedding_vector(key: int, dimensions: int) -> list[float]:
    """A unit vector fixed by the input: the same text always embeds the same."""
    rng = random.Random(key)
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]
