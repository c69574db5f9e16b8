"""A continuous-batching engine in scaled real time: the cost model behind the simulator.

One engine serves one model, as one vLLM process does. It runs **steps** back to back while there is work:

- Each step first schedules the running sequences (in admission order): a decoding sequence takes one token of the
  step's budget (`max_num_batched_tokens`), a sequence still in prefill takes the next chunk of its prompt. Then it
  admits waiting sequences, in the scheduling policy's order (waiting.py), while fewer than `max_num_seqs` run, budget
  is left and the KV cache has room for the chunk. This is vLLM's V1 scheduler with chunked prefill: a long prompt is
  spread over several steps, and prefill is charged in the steps that compute it.
- A step costs `step_base_ms + per_seq_ms * sequences_in_step + prefill_ms_per_token * prompt_tokens_computed
  + context_ms_per_token * context_tokens_of_decoding_sequences`, times `time_scale`, in wall-clock time. The loop
  keeps a schedule, so small sleep overshoots do not add up; when it falls far behind (a busy CPU) it starts afresh.
- At the end of the step every scheduled sequence gains its tokens: a decoding one gains one output token, one whose
  prefill completes samples its first output token. Past `max_num_seqs` only the queue grows: that is the knee.
- **Prefix cache** (see kv.py): on admission, the prompt's leading blocks found in the cache are not computed; they
  are the response's `cached_tokens` and the `prefix_cache_hits`. At least one prompt token is always computed, so a
  fully cached prompt still recomputes its last block, as vLLM does. Blocks are registered in the cache at the **end**
  of the step that computed them: two requests with the same prefix admitted in the same step both compute it.
- **KV cache**: a sequence holds blocks for the tokens computed so far and grows as it decodes. A new sequence waits
  while its first chunk does not fit; a running sequence that cannot grow preempts the most recently admitted one
  (under the priority policy: the lowest priority, the latest arrival among equals), which returns to the queue and
  later recomputes its prompt and output so far. A step in which a running sequence had to preempt admits nobody.
- **Priority policy** (`scheduling_policy="priority"`, vLLM's `--scheduling-policy priority`): the queue is ordered by
  the request's `priority` (lower first), then arrival. A waiting sequence that finds no free slot or no KV room
  preempts the running sequence of lowest priority if that priority is strictly lower than its own, as often as it
  needs, and is admitted in the same step (alone: nobody else is admitted in that step). This is what vLLM's V0
  scheduler did (to 0.10) and what vLLM issue #40004 asks of V1; V1 as released to date orders the queue and picks
  KV-pressure victims by priority, but does not preempt for a waiting request.
- Embedding requests are prefill-only ("pooling") sequences and skip the prefix cache.

Latency metrics are kept as vLLM's output processor keeps them, in scaled (wall-clock) seconds: time to first token
when the prefill completes; an inter-token latency for every later token, the time since the sequence's previous
token (one step for a sequence decoding without a break; counted per step in aggregate, so it stays cheap at full
batch); queue time, end-to-end latency and mean time per output token when a request finishes.

Zero-latency mode (`SimConfig.instant`): steps cost nothing, and a sequence produces all its output in the step that
completes its prefill, so a request is answered after one pass of the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from batch_gateway.sim.config import SimConfig
from batch_gateway.sim.kv import BlockPool
from batch_gateway.sim.metrics import REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, TTFT_BUCKETS, Histogram
from batch_gateway.sim.tokens import Prompt
from batch_gateway.sim.waiting import waiting_queue

MAX_LAG_SECONDS = 0.05  # behind schedule by more than this (a starved CPU): drop the debt instead of bursting


class State(Enum):
    WAITING = 1
    RUNNING = 2
    FINISHED = 3
    ABORTED = 4


@dataclass(eq=False)
class Sequence:
    prompt: Prompt
    output_tokens: int
    arrived: float
    done: asyncio.Future | None = None
    pooling: bool = False  # an embedding: prefill only
    synthetic: bool = False  # interactive load from /sim/load: decodes until removed, holds a fixed KV
    priority: int = 0  # with the priority policy: lower is scheduled first
    state: State = State.WAITING
    prefill_target: int = 0  # tokens to compute before decoding: the prompt, plus the output so far after a preemption
    computed: int = 0
    generated: int = 0
    cached_tokens: int | None = None  # prefix-cache hit at the first admission, as vLLM reports it
    finish_reason: str = "length"
    hashes: list[bytes] = field(default_factory=list)  # cached blocks this sequence holds
    registered: int = 0  # prompt blocks [0, registered) are cached (or were computed as duplicates)
    private: int = 0  # blocks held without reusable content
    first_token_at: float | None = None
    last_token_at: float = 0.0
    queued: float = 0.0  # seconds from arrival to the first admission
    on_token: Callable[[Sequence], None] | None = None  # told of every output token (a streamed answer)

    def __post_init__(self) -> None:
        self.prefill_target = self.prompt.tokens


@dataclass
class Stats:
    requests: int = 0  # sequences that arrived
    completed: int = 0
    aborted: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefill_tokens: int = (
        0  # prompt tokens actually computed: cache hits excluded, recomputation after preemption included
    )
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found
    preemptions: int = 0
    steps: int = 0
    busy_seconds: float = 0.0  # engine time spent in steps (unscaled model time)
    finished: dict[str, int] = field(default_factory=dict)  # by finish_reason
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(REQUEST_LATENCY_BUCKETS))
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(TOKEN_LATENCY_BUCKETS))  # per token after the first
    tpot: Histogram = field(default_factory=lambda: Histogram(TOKEN_LATENCY_BUCKETS))  # per finished request


@dataclass
class _Work:
    sequence: Sequence
    tokens: int
    prefill: bool


def _rank(sequence: Sequence) -> tuple[int, float]:
    """Under the priority policy the running sequence with the greatest rank is the first to be preempted."""
    return sequence.priority, sequence.arrived


class Engine:
    def __init__(self, config: SimConfig, model: str) -> None:
        self.config = config
        self.model = model
        self.pool = BlockPool(config.kv_blocks, config.cache_blocks)
        self.waiting = waiting_queue(config.scheduling_policy)
        self.running: list[Sequence] = []
        self.stats = Stats()
        self.paused = False
        self._by_priority = config.scheduling_policy == "priority"
        self._step_end = (
            0.0  # when the last step ended: every sequence it gave a token to has last_token_at equal to it
        )
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop the engine runs on, once started

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and self.loop is loop and not self._task.done():
            return
        if self.loop is not None and self.loop is not loop:  # the app is served again on a new loop: start afresh
            self.waiting.clear()
            self.running.clear()
            self.pool = BlockPool(self.config.kv_blocks, self.config.cache_blocks)
            self._wake = asyncio.Event()
        self.loop = loop
        self._task = loop.create_task(self._run(), name=f"sim-engine-{self.model}")

    async def stop(self) -> None:
        if self._task is not None and self.loop is asyncio.get_running_loop():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # --- requests ----------------------------------------------------------------------------------

    def fits(self, tokens: int) -> bool:
        """Whether a sequence of `tokens` (prompt + output) could ever be held by the KV cache."""
        return math.ceil(tokens / self.config.block_size) <= self.config.kv_blocks

    async def generate(
        self,
        prompt: Prompt,
        output_tokens: int,
        *,
        pooling: bool = False,
        finish_reason: str = "length",
        priority: int = 0,
        on_token: Callable[[Sequence], None] | None = None,
    ) -> Sequence:
        """Run one sequence to completion. Cancelling the caller aborts it and frees its slot, as vLLM does.

        `finish_reason` is what its end will be reported as: "length" when it ends at max_tokens, "stop" when the
        simulated model ends by itself. `priority` orders it under the priority policy (lower first). `on_token`
        is called at the end of every step that gives it output tokens (a streamed answer).
        """
        self.start()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        sequence = Sequence(
            prompt,
            max(1, output_tokens),
            loop.time(),
            done,
            pooling=pooling,
            finish_reason=finish_reason,
            priority=priority,
            on_token=on_token,
        )
        self.waiting.add(sequence)
        self.stats.requests += 1
        self._wake.set()
        try:
            await done
        except asyncio.CancelledError:
            self.abort(sequence)
            raise
        return sequence

    def abort(self, sequence: Sequence) -> None:
        if sequence.state is State.WAITING:
            self.waiting.remove(sequence)
        elif sequence.state is State.RUNNING:
            self._release(sequence)
            self.running.remove(sequence)
        else:
            return
        sequence.state = State.ABORTED
        if not sequence.synthetic:
            self.stats.aborted += 1
        self._wake.set()

    def set_synthetic_load(self, count: int, context_tokens: int) -> None:
        """Keep `count` interactive sequences in the engine: they take slots, KV and step time until removed."""
        current = [s for s in (*self.running, *self.waiting) if s.synthetic]
        for sequence in current[count:]:
            self.abort(sequence)
        loop = asyncio.get_running_loop()
        for _ in range(count - len(current)):
            prompt = Prompt(max(1, context_tokens), [], 0)
            # Interactive goes first (under the priority policy: in its place as a priority-0 arrival).
            self.waiting.add_front(Sequence(prompt, 1 << 62, loop.time(), synthetic=True))
        self._wake.set()

    def pause(self, paused: bool) -> None:
        """Hold (or release) the scheduler before its next step; arrivals pile up in the queue meanwhile."""
        self.paused = paused
        self._wake.set()

    def reset_prefix_cache(self) -> int:
        return self.pool.reset()

    # --- the step loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        scale = self.config.time_scale
        next_at = loop.time()
        while True:
            work = [] if self.paused else self._schedule()
            if not work:  # idle, paused, or nothing fits: sleep until something changes
                self._wake.clear()
                await self._wake.wait()
                next_at = loop.time()
                continue
            cost = self._cost_seconds(work)
            self.stats.steps += 1
            self.stats.busy_seconds += cost
            next_at += cost * scale
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)  # let arrivals in between back-to-back steps
                if delay < -MAX_LAG_SECONDS:
                    next_at = loop.time()
            self._complete(work, loop.time())

    def _schedule(self) -> list[_Work]:
        while True:
            work, preempted = self._plan()
            if work or not preempted:
                return work
            # Every sequence that could run was preempted (under the priority policy the first one can be the victim):
            # vLLM runs an empty step and plans again; plan again at once, with the room they freed.

    def _plan(self) -> tuple[list[_Work], bool]:
        config = self.config
        budget = config.max_num_batched_tokens
        work: list[_Work] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            sequence = self.running[index]
            prefill = sequence.computed < sequence.prefill_target
            tokens = min(sequence.prefill_target - sequence.computed, budget) if prefill else 1
            grow = 0 if sequence.synthetic and not prefill else self._blocks_short(sequence, sequence.computed + tokens)
            while grow > self.pool.available:  # KV full: preempt the last admitted (or lowest priority) until it fits
                victim = max(self.running, key=_rank) if self._by_priority else self.running[-1]
                freed = self._unschedule(victim, work)
                if freed is not None:  # it was ahead of this sequence in `running` and already scheduled
                    budget += freed
                    index -= 1
                self._preempt(victim)
                preempted = True
                if victim is sequence:
                    break
            if sequence.state is not State.RUNNING:
                break  # it preempted itself: it was the one to go
            self.pool.take(grow)
            sequence.private += grow
            work.append(_Work(sequence, tokens, prefill))
            budget -= tokens
            index += 1
        if preempted:
            return work, True  # like vLLM: no admissions in a step that had to preempt
        while self.waiting and budget > 0:
            sequence = self.waiting.peek()
            admitted = None
            while True:
                if len(self.running) < config.max_num_seqs:
                    admitted = self._admit(sequence, budget)
                if admitted is not None:
                    break
                lower = self._victim_for(sequence)  # no slot or no KV room: a lower priority may have to yield
                if lower is None:
                    break
                budget += self._unschedule(lower, work) or 0
                self._preempt(lower)
                preempted = True
            if admitted is None:
                break  # the head does not fit: everyone behind it waits too
            work.append(admitted)
            budget -= admitted.tokens
            if preempted:
                break  # a step that preempts admits only the sequence it preempted for, as in the running phase
        return work, preempted

    def _victim_for(self, sequence: Sequence) -> Sequence | None:
        """Priority policy: the running sequence a waiting one may preempt (the lowest priority, the latest arrival
        among equals), if its priority is strictly lower, so that equals never preempt each other back and forth."""
        if not self._by_priority or not self.running:
            return None
        victim = max(self.running, key=_rank)
        return victim if victim.priority > sequence.priority else None

    @staticmethod
    def _unschedule(sequence: Sequence, work: list[_Work]) -> int | None:
        """Take `sequence` out of this step's work: the token budget it held, or None when it was not scheduled."""
        for i, item in enumerate(work):
            if item.sequence is sequence:
                del work[i]
                return item.tokens
        return None

    def _admit(self, sequence: Sequence, budget: int) -> _Work | None:
        block = self.config.block_size
        cacheable = not sequence.pooling and not sequence.synthetic
        # At least one token must be computed (it yields the first output token), so a full hit drops its last block.
        hits = (
            self.pool.longest_hit(sequence.prompt.block_hashes, (sequence.prefill_target - 1) // block)
            if cacheable
            else []
        )
        cached = len(hits) * block
        tokens = min(sequence.prefill_target - cached, budget)
        need = math.ceil((cached + tokens) / block) - len(hits)
        if need + self.pool.idle_count(hits) > self.pool.available:
            return None
        self.waiting.take()
        for h in hits:
            self.pool.acquire(h)
        self.pool.take(need)
        sequence.hashes = list(hits)
        sequence.registered = len(hits)
        sequence.private = need
        sequence.computed = cached
        sequence.state = State.RUNNING
        self.running.append(sequence)
        if sequence.cached_tokens is None:  # the first admission: vLLM counts re-admissions apart
            sequence.cached_tokens = cached
            sequence.queued = self._now() - sequence.arrived
            if cacheable:
                self.stats.prefix_queries += sequence.prefill_target
                self.stats.prefix_hits += cached
        return _Work(sequence, tokens, True)

    def _cost_seconds(self, work: list[_Work]) -> float:
        config = self.config
        prefill = sum(w.tokens for w in work if w.prefill)
        context = sum(w.sequence.computed for w in work if not w.prefill)
        self.stats.prefill_tokens += prefill
        ms = (
            config.step_base_ms
            + config.per_seq_ms * len(work)
            + config.prefill_ms_per_token * prefill
            + config.context_ms_per_token * context
        )
        return ms / 1000

    def _complete(self, work: list[_Work], now: float) -> None:
        instant = self.config.instant
        finished = False
        previous, self._step_end = self._step_end, now
        followed = 0  # sequences that also got a token in the previous step: all see the same inter-token latency
        for item in work:
            sequence = item.sequence
            if sequence.state is not State.RUNNING:
                continue  # aborted while the step ran
            if sequence.synthetic and not item.prefill:
                continue  # interactive load holds a fixed context
            sequence.computed += item.tokens
            first = False
            if item.prefill:
                self._register(sequence)
                if sequence.computed < sequence.prefill_target:
                    continue  # more chunks to go
                if sequence.first_token_at is None:
                    sequence.first_token_at = now
                    first = True
                    if not sequence.synthetic:
                        self.stats.prompt_tokens += sequence.prompt.tokens
                        self.stats.ttft.observe(now - sequence.arrived)
                if sequence.pooling:
                    self._finish(sequence, "stop", now)
                    finished = True
                    continue
            if sequence.synthetic:
                continue
            if not first:
                if sequence.last_token_at == previous:
                    followed += 1
                else:  # it sat out steps (no budget, or preempted and recomputed): its own gap
                    self.stats.itl.observe(now - sequence.last_token_at)
            sequence.last_token_at = now
            new = sequence.output_tokens - sequence.generated if instant else 1
            sequence.generated += new
            self.stats.generation_tokens += new
            if sequence.on_token is not None:
                sequence.on_token(sequence)
            if sequence.generated >= sequence.output_tokens:
                self._finish(sequence, sequence.finish_reason, now)
                finished = True
        if followed:
            self.stats.itl.observe(now - previous, followed)
        if finished:
            self.running = [s for s in self.running if s.state is State.RUNNING]

    # --- blocks --------------------------------------------------------------------------------------

    def _blocks_short(self, sequence: Sequence, tokens: int) -> int:
        held = len(sequence.hashes) + sequence.private
        return max(0, math.ceil(tokens / self.config.block_size) - held)

    def _register(self, sequence: Sequence) -> None:
        """Cache the prompt blocks this sequence has now computed in full: reusable from the next step on."""
        if sequence.pooling or sequence.synthetic:
            return
        hashes = sequence.prompt.block_hashes
        full = min(len(hashes), sequence.computed // self.config.block_size)
        while sequence.registered < full:
            h = hashes[sequence.registered]
            if self.pool.register(h):
                sequence.private -= 1
                sequence.hashes.append(h)
            sequence.registered += 1

    def _release(self, sequence: Sequence) -> None:
        for h in reversed(sequence.hashes):  # the tail is released first, so it is evicted first
            self.pool.release(h)
        self.pool.give_back(sequence.private)
        sequence.hashes = []
        sequence.private = 0
        sequence.registered = 0

    def _preempt(self, sequence: Sequence) -> None:
        self._release(sequence)
        self.running.remove(sequence)
        sequence.computed = 0
        sequence.prefill_target = sequence.prompt.tokens + (0 if sequence.synthetic else sequence.generated)
        sequence.state = State.WAITING
        self.waiting.add_front(sequence)
        self.stats.preemptions += 1

    def _finish(self, sequence: Sequence, reason: str, now: float) -> None:
        self._release(sequence)
        sequence.state = State.FINISHED
        sequence.finish_reason = reason
        self.stats.completed += 1
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self.stats.e2e.observe(now - sequence.arrived)
        self.stats.queue.observe(sequence.queued)
        decoded = sequence.generated - 1  # tokens after the first
        first = sequence.first_token_at
        tpot = (sequence.last_token_at - first) / decoded if decoded > 0 and first is not None else 0.0
        self.stats.tpot.observe(tpot)
        if sequence.done is not None and not sequence.done.done():
            sequence.done.set_result(None)

    def _now(self) -> float:
        return self.loop.time() if self.loop else 0.0

    # --- views ---------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_usage(self) -> float:
        return self.pool.usage

    def snapshot(self) -> dict:
        s = self.stats
        return {
            "requests": s.requests,
            "completed": s.completed,
            "aborted": s.aborted,
            "running": self.num_running,
            "waiting": self.num_waiting,
            "kv_cache_usage": self.kv_usage,
            "prompt_tokens": s.prompt_tokens,
            "generation_tokens": s.generation_tokens,
            "prefill_tokens": s.prefill_tokens,
            "prefix_cache_queries": s.prefix_queries,
            "prefix_cache_hits": s.prefix_hits,
            "prefix_cache_hit_rate": s.prefix_hits / s.prefix_queries if s.prefix_queries else 0.0,
            "preemptions": s.preemptions,
            "steps": s.steps,
            "busy_seconds": s.busy_seconds,
            "finished": dict(s.finished),
            "paused": self.paused,
        }
