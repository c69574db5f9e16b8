"""Prefix warm-ups: before a group's head goes out, a copy of it that generates one token.

A group's followers may go only once its shared prefix is in the engine's cache. Without a warm-up that is when the
head finishes, after all its output tokens, so a group is open (its prefix held in a cache that may be small) for
about two service times while its followers run in one. vLLM caches a prompt's blocks as soon as they are computed:
a copy of the head that stops after its first token caches the prefix in about one step, and the followers go out
beside the head itself, which then finds the prefix cached too. The copy costs one request and one output token
per group; its answer is thrown away.

A copy that streams, opens the group at its first chunk and generates a few tokens more (so that the prefix stays
held, not idle, while the followers are admitted) was measured against this one with the simulator's streaming
(benchmarks/prefix.py's cache of a tenth of the prompts, size read): no gain in throughput or hits. Five runs each,
alternating: 115-121 requests/s against 120-127; a later set: 121-126 (four runs) against 120-126 (eight, just
before). It was not taken up.

The copy changes the generation limits only: `max_tokens` (and `max_completion_tokens`, `max_output_tokens`) of 1, one
choice, no streaming, no minimum length (and a Responses copy is not stored). The prompt, model, tools and chat template
stay, so its prefix is the head's. Embeddings need none: their answer comes right after the prompt is computed.
"""

from __future__ import annotations

import msgspec

# Per endpoint: the limit field(s) set to one token, and the fields dropped (a minimum above one, several choices
# or a stream would make the copy longer or fail).
_LIMITS = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
}
_DROPPED = ("n", "best_of", "min_tokens", "stream", "stream_options", "background", "use_beam_search")
_decoder = msgspec.json.Decoder(dict)


def warm_up_body(path: str, body: bytes) -> bytes | None:
    """The warm-up copy of the request `body` for `path`, or None when that endpoint needs none or the body is not
    a JSON object."""
    limits = _LIMITS.get(path)
    if limits is None:
        return None
    try:
        fields = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None
    for name in _DROPPED:
        fields.pop(name, None)
    present = [name for name in limits if name in fields] or [limits[0]]
    for name in present:
        fields[name] = 1
    if path == "/v1/responses":
        fields["store"] = False  # nobody will read it back
    return msgspec.json.encode(fields)
