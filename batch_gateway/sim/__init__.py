"""An OpenAI-compatible stand-in for a vLLM server (`batch-gateway sim`), for demos, tests and benchmarks without a GPU.

It simulates vLLM's continuous batching in scaled real time (engine.py): steps of `step_base_ms` (10) +
`per_seq_ms` (0.1) per sequence + `context_ms_per_token` (0.00004) per context token read +
`prefill_ms_per_token` (0.05) per prompt token computed, at most `max_num_seqs` (128) running and the rest waiting
in FIFO order (or by the request's `priority`, preempting lower priorities, with `scheduling_policy="priority"`),
chunked prefill within `max_num_batched_tokens` (8192) per step, a prefix cache of 16-token blocks hashed chained
inside a KV cache of `kv_blocks` (25 000 blocks = 400k tokens) with preemption when it is full. `GET /metrics` has
vLLM's metric names, labels and buckets (metrics.py).
Those defaults resemble an 8B model in bf16 on one 80 GB H100-class GPU: about 10 ms per step at batch 1 (100
tokens/s for a lone sequence), about 4 500 output tokens/s at full batch with 1k-token contexts (28 ms steps), and
prefill at 20 000 tokens/s. `time_scale` runs the same
model faster (0.1 = ten times) and 0 answers at once (zero-latency mode, for measuring the gateway's own overhead).
Tokens are approximated as 4 bytes of UTF-8 text each (tokens.py).

Python API: `SimConfig`, `create_sim_app(config)` (an ASGI app), `SimServer(config)` (started on 127.0.0.1 in a
background thread, `.url`, `.stop()`, `.stats()`).
"""

from typing import TYPE_CHECKING, Any

from batch_gateway.sim.config import SimConfig

if TYPE_CHECKING:
    from batch_gateway.sim.server import SimServer, create_sim_app

__all__ = ["SimConfig", "SimServer", "create_sim_app"]


def __getattr__(name: str) -> Any:
    # The server (uvicorn, ~15 MB) loads on first use: every `batch-gateway` command, the runner included, imports
    # `sim.config` for its argument parser.
    if name in ("SimServer", "create_sim_app"):
        from batch_gateway.sim import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
