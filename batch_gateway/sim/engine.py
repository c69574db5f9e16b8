"""A continuous-batching engine in (scaled) real time: the cost model behind the simulator.

Default cost model — a mid-size model (about 8B parameters) on one modern data-centre GPU, as vLLM runs it:
- a decode **step** costs `step_base_ms` (10 ms: reading the weights once per step) plus `per_seq_ms` (0.05 ms) per
  running sequence — decode is memory-bound, so a bigger batch costs little more per step;
- every running sequence gains one token per step; at most `max_num_seqs` (128) run at once and the rest **wait**
  in FIFO order — past that knee, more concurrency only adds queueing;
- **prefill**: the uncached prompt tokens of the sequences admitted in a step cost `prefill_ms_per_token` (0.02 ms,
  i.e. 50k tokens/s) in that step — long prompts slow everyone's step, as in a real engine;
- a **prefix cache** of `block_size`-token blocks (16), hashed chained like vLLM's (a block's hash covers all
  blocks before it), LRU with room for `cache_blocks` blocks. A request's leading blocks found in the cache are not
  prefilled and are reported as `cached_tokens`. Blocks computed in a step become reusable only **after** that step:
  two requests with the same prefix admitted in the same step both compute it;
- the KV cache holds `kv_blocks` blocks; a sequence holds the blocks of its prompt and output so far. New sequences
  wait while the KV cache is full (`kv_cache_usage_perc` shows it).

Tokens are approximated as 4 bytes of UTF-8 text each, so the same text always costs the same. `time_scale`
multiplies every duration (0.1 = ten times faster), for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import msgspec

CHARS_PER_TOKEN = 4


class SimConfig(msgspec.Struct, kw_only=True):
    models: list[str] = msgspec.field(default_factory=lambda: ["sim-model"])
    max_num_seqs: int = 128
    step_base_ms: float = 10.0
    per_seq_ms: float = 0.05
    prefill_ms_per_token: float = 0.02
    block_size: int = 16
    cache_blocks: int = 65536
    kv_blocks: int = 65536
    default_output_tokens: int = 64
    max_output_tokens: int = 4096
    time_scale: float = 1.0
    error_rate_429: float = 0.0
    error_rate_500: float = 0.0
    error_rate_503: float = 0.0
    timeout_rate: float = 0.0
    timeout_seconds: float = 3600.0
    embedding_dim: int = 8
    seed: int = 0


def prompt_blocks(text: str, block_size: int) -> tuple[int, list[bytes]]:
    """(prompt tokens, chained hashes of its full blocks)."""
    data = text.encode()
    tokens = max(1, math.ceil(len(data) / CHARS_PER_TOKEN))
    block_bytes = block_size * CHARS_PER_TOKEN
    hasher = hashlib.blake2b(digest_size=16)
    hashes = []
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        hasher.update(data[start : start + block_bytes])
        hashes.append(hasher.copy().digest())
    return tokens, hashes


@dataclass
class Sequence:
    prompt_tokens: int
    blocks: list[bytes]
    output_tokens: int
    done: asyncio.Future
    generated: int = 0
    cached_tokens: int = 0
    kv_held: int = 0
    synthetic: bool = False  # "interactive" load added through /sim/load: runs until removed


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found
    steps: int = 0
    busy_seconds: float = 0.0  # unscaled engine time spent stepping
    errors: dict[str, int] = field(default_factory=dict)


class Engine:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache: OrderedDict[bytes, None] = OrderedDict()
        self.kv_used = 0
        self.stats = Stats()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    @property
    def kv_usage(self) -> float:
        return min(1.0, self.kv_used / self.config.kv_blocks)

    async def generate(self, text: str, output_tokens: int) -> Sequence:
        tokens, blocks = prompt_blocks(text, self.config.block_size)
        sequence = Sequence(tokens, blocks, max(1, output_tokens), asyncio.get_running_loop().create_future())
        self.stats.requests += 1
        self.waiting.append(sequence)
        self._wake.set()
        try:
            await sequence.done
        except asyncio.CancelledError:  # the client went away: free its slot, as vLLM aborts the request
            if sequence in self.waiting:
                self.waiting.remove(sequence)
            else:
                sequence.output_tokens = sequence.generated
            raise
        return sequence

    def set_synthetic_load(self, count: int) -> None:
        """Hold `count` extra sequences in the running batch (interactive users the batch must make room for)."""
        current = [s for s in self.running if s.synthetic]
        for sequence in current[count:]:
            self.running.remove(sequence)
        loop = asyncio.get_running_loop()
        for _ in range(count - len(current)):
            self.running.append(Sequence(1, [], 1 << 60, loop.create_future(), synthetic=True))
        self._wake.set()

    # --- the step loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        config = self.config
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            admitted, new_blocks, prefill_tokens = self._admit()
            cost_ms = config.step_base_ms + config.per_seq_ms * len(self.running) + config.prefill_ms_per_token * prefill_tokens
            started = time.monotonic()
            await asyncio.sleep(cost_ms / 1000 * config.time_scale)
            self.stats.busy_seconds += (time.monotonic() - started) / max(config.time_scale, 1e-9)
            self.stats.steps += 1
            for block in new_blocks:  # reusable only now that the step that computed them is over
                self._cache_put(block)
            self._decode()

    def _admit(self) -> tuple[list[Sequence], list[bytes], int]:
        config = self.config
        admitted: list[Sequence] = []
        new_blocks: list[bytes] = []
        prefill = 0
        while self.waiting and len(self.running) < config.max_num_seqs:
            sequence = self.waiting[0]
            need = math.ceil((sequence.prompt_tokens + sequence.output_tokens) / config.block_size)
            if self.kv_used + need > config.kv_blocks and self.running:
                break  # KV cache full: wait for sequences to finish
            self.waiting.popleft()
            hits = 0
            for block in sequence.blocks:
                if block not in self.cache:
                    break
                self.cache.move_to_end(block)
                hits += 1
            # At least one token is always computed (vLLM recomputes the last token even on a full hit).
            cached = min(hits * config.block_size, sequence.prompt_tokens - 1)
            sequence.cached_tokens = cached
            new_blocks.extend(sequence.blocks[hits:])
            prefill += sequence.prompt_tokens - cached
            sequence.kv_held = need
            self.kv_used += need
            self.stats.prefix_queries += sequence.prompt_tokens
            self.stats.prefix_hits += cached
            self.stats.prompt_tokens += sequence.prompt_tokens
            self.running.append(sequence)
            admitted.append(sequence)
        return admitted, new_blocks, prefill

    def _decode(self) -> None:
        still = []
        for sequence in self.running:
            sequence.generated += 1
            if sequence.synthetic or sequence.generated < sequence.output_tokens:
                still.append(sequence)
                continue
            self.kv_used -= sequence.kv_held
            self.stats.completed += 1
            self.stats.generation_tokens += sequence.output_tokens
            if not sequence.done.done():
                sequence.done.set_result(None)
        self.running = still

    def _cache_put(self, block: bytes) -> None:
        self.cache[block] = None
        self.cache.move_to_end(block)
        while len(self.cache) > self.config.cache_blocks:
            self.cache.popitem(last=False)
