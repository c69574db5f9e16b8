"""Every knob of the simulator, with defaults that resemble an 8B model on one 80 GB data-centre GPU.

Each field is a `batch-gateway sim` flag (`max_num_seqs` → `--max-num-seqs`); `HELP` holds the flag's text.
"""

from __future__ import annotations

from typing import Literal

import msgspec

SCHEDULING_POLICIES = ("fcfs", "priority")


class SimConfig(msgspec.Struct, kw_only=True):
    models: list[str] = msgspec.field(default_factory=lambda: ["sim-model"])
    # --- engine shape (vLLM's flags of the same names) ---
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    kv_blocks: int = 25_000
    cache_blocks: int = 0
    hide_cache_info: bool = False
    max_model_len: int = 32_768
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    # --- cost model, in milliseconds of engine time ---
    step_base_ms: float = 10.0
    per_seq_ms: float = 0.1
    context_ms_per_token: float = 0.00004
    prefill_ms_per_token: float = 0.05
    time_scale: float = 1.0
    # --- outputs ---
    default_output_tokens: int = 64
    max_output_tokens: int = 4096
    embedding_dim: int = 8
    # --- failure injection (a share of requests, 0..1) ---
    error_rate_429: float = 0.0
    error_rate_500: float = 0.0
    error_rate_503: float = 0.0
    timeout_rate: float = 0.0
    timeout_seconds: float = 3600.0
    retry_after_seconds: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not self.models or any(not isinstance(m, str) or not m for m in self.models):
            problems.append("models must be a non-empty list of names")
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "kv_blocks",
            "max_model_len",
            "default_output_tokens",
            "max_output_tokens",
            "embedding_dim",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in (
            "cache_blocks",
            "step_base_ms",
            "per_seq_ms",
            "context_ms_per_token",
            "prefill_ms_per_token",
            "time_scale",
            "timeout_seconds",
            "retry_after_seconds",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        rates = (self.error_rate_429, self.error_rate_500, self.error_rate_503, self.timeout_rate)
        if any(not 0 <= r <= 1 for r in rates) or sum(rates) > 1:
            problems.append("error and timeout rates must each be in 0..1 and add up to at most 1")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            problems.append(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            problems.append(
                "max_num_batched_tokens must be at least max_num_seqs (every running sequence decodes a token per step)"
            )
        if problems:
            raise ValueError("invalid simulator config: " + "; ".join(problems))

    @property
    def instant(self) -> bool:
        """Zero-latency mode: no step costs time, so a sequence runs to completion in the step that admits it."""
        return self.time_scale == 0 or (
            self.step_base_ms == 0
            and self.per_seq_ms == 0
            and self.prefill_ms_per_token == 0
            and self.context_ms_per_token == 0
        )


HELP: dict[str, str] = {
    "max_num_seqs": "Most sequences running at once; the rest wait in arrival order, or by priority with "
    "--scheduling-policy priority (vLLM --max-num-seqs).",
    "max_num_batched_tokens": "Token budget of one step: decode tokens plus prefill chunks (vLLM's chunked prefill).",
    "block_size": "Tokens per KV-cache block; the prefix cache works in whole blocks.",
    "kv_blocks": "KV-cache size in blocks; new sequences wait and running ones are preempted when it is full.",
    "cache_blocks": "Most blocks the prefix cache keeps; 0 = whatever of the KV cache is not in use (as vLLM). "
    "When set, /metrics reports it as vllm:cache_config_info's num_gpu_blocks.",
    "hide_cache_info": "Leave vllm:cache_config_info out of /metrics, as an engine that does not say its cache size "
    "(the runner then learns its prefix window from cached_tokens).",
    "max_model_len": "Longest prompt + output in tokens; longer requests get a 400.",
    "scheduling_policy": "fcfs: arrival order; a request's `priority` is ignored (as vLLM's V1). priority: lower "
    "`priority` first (ties by arrival), and a waiting request that does not fit preempts the running "
    "one of lowest priority if that is strictly lower (vLLM --scheduling-policy).",
    "step_base_ms": "Fixed cost of one engine step (reading the weights once).",
    "per_seq_ms": "Extra step cost per sequence in the step.",
    "context_ms_per_token": "Extra step cost per context token of the decoding sequences (attention reads the KV "
    "cache).",
    "prefill_ms_per_token": "Step cost per prompt token computed (tokens found in the prefix cache are free).",
    "time_scale": "Multiplies every engine duration: 0.1 runs the same model ten times faster; 0 = zero latency.",
    "default_output_tokens": "Mean output length when a request gives no max_tokens (the length is seeded by the "
    "prompt).",
    "max_output_tokens": "Cap on max_tokens: longer asks end early with finish_reason length.",
    "embedding_dim": "Length of embedding vectors (unless a request asks for `dimensions`).",
    "error_rate_429": "Share of requests answered 429 (with Retry-After).",
    "error_rate_500": "Share of requests answered 500.",
    "error_rate_503": "Share of requests answered 503 (with Retry-After).",
    "timeout_rate": "Share of requests that hang for --timeout-seconds (or until the client goes away), then get a "
    "504.",
    "timeout_seconds": "How long an injected timeout hangs (wall-clock seconds, not scaled).",
    "retry_after_seconds": "Retry-After value sent with injected 429s and 503s.",
    "seed": "Seed of the failure injection and of output lengths, for reproducible runs.",
}
