"""The prefix window: how many prefix groups may be open on one endpoint at once, so that each group's prefix is still
in the engine's cache when its followers arrive.

A group *opens* on an endpoint when its head (the request that computes the shared prefix) is handed out there, and
*closes* there once nothing of it is left to send and none of its requests is in flight there. While it is open its
prefix must stay cached. Without a window, every free slot goes to a new group's head while no group is warm, the
heads of many groups run together, and under a small cache their prefixes evict each other before the followers come.

**Known cache.** vLLM publishes its KV cache's size (`vllm:cache_config_info`: `num_gpu_blocks` × `block_size`
tokens) and its use (`vllm:kv_cache_usage_perc`). A new group is admitted while

    prefixes of open groups that no request holds + max(what the engine holds, what our in-flight requests hold)
        + the new group's prefix  ≤  MARGIN × cache size

vLLM counts cached blocks that no sequence holds as free, so the prefixes waiting for their followers are added to
its usage; prefixes held by running requests are inside it, or inside our own estimate of what our requests hold
(their group's prefix once, plus each one's own tokens), which also covers an engine whose usage leaves the prefix
cache out (the simulator's capped cache). A group counts only the blocks it adds to its parent's prefix, so the
shared blocks of the prefix tree count once; and once its followers and its head are answered, a group whose
subtrees are still to come counts only the part of its prefix they share (its head opened a few-shot block under a
system prompt: that block's questions are done, the system prompt's other blocks still need it).

**Learnt.** Without the cache's size, the window is a number of open groups, learnt from the answers: a follower's
`usage.prompt_tokens_details.cached_tokens` against the prefix it shares with its group. A follower that found less
(its prefix was evicted, or most of it) cuts the window by DECREASE, once per round (only groups opened after the
last cut can cut again); a group whose first judged follower found its whole prefix grows it by SLOW_START_GROWTH
(slow start, until the first miss) or by 1/window (after: one group per round). A follower tells of a miss only
with its whole answer, and an engine busy recomputing evicted prefixes takes seconds over that while slow start keeps
opening groups; vLLM's prefix-cache counters tell as it happens: while only batch work uses the engine (others'
prompts would dilute the ratio), a reading whose hit ratio falls under EVICTING times the usual one cuts the window as
a miss does. An engine that never reports a cached token (vLLM without `--enable-prompt-tokens-details`, no prefix
caching, no usage at all) gives no signal: after SILENT_FOLLOWERS followers without one, the window stops counting.

The learnt window counts groups, a subtree (a few-shot block under a system prompt, say) as one of its own; the
cache-size window counts every group's own blocks. Small groups (a prefix under SMALL_PREFIX_TOKENS) are never held
back: their blocks matter little, and hits on them are too coarse to judge. A group's prefix is estimated from the
bytes of its shared key blocks (prefix.py), and set to the tokens its head computed (`prompt_tokens -
cached_tokens`) once the head's answer says. A follower of a subtree that finds its system prompt but not the
subtree's own blocks may pass for a full hit: the key blocks cannot tell how far the subtree extends.

The window holds back nothing while no open group has a request in flight on the endpoint (work must go on), and
never holds back other work: the scheduler hands out followers, small groups and requests without a group whatever
the window says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from batch_gateway.runner.prefix import BLOCK_SIZES

# Share of the cache the working set may fill. Eviction is least recently freed first, so a prefix waiting for its
# followers goes before the blocks freed after it: the rest of the cache has to absorb that churn. With prefix
# warm-ups a prefix waits about one engine step (32 ms at the median, 120-135 ms at the 90th percentile, and the
# prefixes lost are in that tail). Against the simulator with a cache holding a tenth of the prompts
# (benchmarks/prefix.py): 0.5 kept every hit at 90-91% of the unbounded cache's throughput; 0.7 kept 98-100% of the
# hits at 91-94%; 0.85 lost 6-10% of the hits and fell to 78-86%. Measured again on 6219330 (two runs each, nothing
# else running): 0.7 kept 97.0-99.2% of the hits, 0.85 95.5-97.0%, at throughputs that overlapped.
MARGIN = 0.7
BYTES_PER_TOKEN = 4.0  # estimate of a prefix's tokens from its bytes, until its head's answer says
LOWER_BYTES_PER_TOKEN = 6.0  # a safe lower bound of a shared prefix's tokens (judging hits)
SMALL_PREFIX_TOKENS = 64
INITIAL_GROUPS = 8  # learnt window at the start
SLOW_START_GROWTH = 0.5  # per group that fully hit: 1.5 times the window per round (doubling overshot by too much)
DECREASE = 0.5
FULL_HIT = 0.9  # share of the expected prefix a follower must find to count as a full hit...
HIT_SLACK_TOKENS = 32  # ...less about two blocks (engines cache whole blocks and compute a prompt's last token)
SILENT_FOLLOWERS = 16
# The engine's prefix-cache counters over a reading: a hit ratio under EVICTING times the usual one says prefixes are
# being evicted. Against the simulator (groups of 10, benchmarks/prefix.py), readings without a miss fell to 0.75 of
# the usual ratio with the mix of heads and followers; while prefixes were evicted, to 0.1-0.55. Readings with fewer
# prompt tokens looked up than COUNTED_QUERIES say too little.
EVICTING = 0.6
USUAL_MEMORY = 0.2  # weight of each reading in the usual hit ratio
COUNTED_QUERIES = 2000.0
PRIVATE_MEMORY = 0.1  # weight of each answer in the mean of a follower's own tokens

_CUMULATIVE = [sum(BLOCK_SIZES[:d]) for d in range(len(BLOCK_SIZES) + 1)]


def shared_bytes(depth: int) -> float:
    """Bytes a prefix of `depth` shared key blocks most likely has: it covers those blocks and stops somewhere in the
    next one (its middle)."""
    if depth >= len(BLOCK_SIZES):
        return float(_CUMULATIVE[-1])
    return _CUMULATIVE[depth] + BLOCK_SIZES[depth] / 2 if depth else 0.0


def prefix_tokens(depth: int) -> float:
    """Estimated tokens of a prefix of `depth` shared key blocks."""
    return shared_bytes(depth) / BYTES_PER_TOKEN


def least_tokens(depth: int) -> float:
    """Tokens a prefix of `depth` shared key blocks has at the least (whatever the tokenizer)."""
    return _CUMULATIVE[min(depth, len(BLOCK_SIZES))] / LOWER_BYTES_PER_TOKEN


@dataclass
class _Group:
    tokens: float
    opened: int  # the window's count of groups opened, when this one opened
    inflight: int = 0  # its requests in flight on this endpoint (its head, its followers)


class PrefixWindow:
    """One endpoint's window. A pure object, driven by the scheduler (groups, hand-outs, answers) and by the
    dispatcher's readings of the engine's /metrics (`observe`). Its sums are kept as groups change, so a question
    costs the same however many groups are open."""

    def __init__(self) -> None:
        self.enabled = True  # False: an engine with a prefix cache per slot (llama.cpp): one follower per group
        self.capacity: float | None = None  # cache size in tokens, when the engine says
        self.held = 0.0  # tokens the engine's running sequences hold (usage × size)
        self.groups = float(INITIAL_GROUPS)  # learnt: open groups allowed
        self.threshold = math.inf  # learnt: slow start below this
        self.private_tokens = 0.0  # mean tokens a follower holds beyond its group's prefix
        self._open: dict[int, _Group] = {}
        self._idle_tokens = 0.0  # prefixes of open groups with nothing in flight here
        self._busy_tokens = 0.0  # prefixes of open groups with requests in flight here
        self._busy = 0  # open groups with requests in flight here
        self._counted = 0  # open groups large enough to count
        self._followers = 0  # followers in flight (their own tokens; their prefixes count with their group)
        self._opened = 0
        self._cut_at = 0  # groups opened up to the last cut (their misses cannot cut again)
        self._seen_cached = False
        self._usual_ratio: float | None = None  # the engine's usual prefix-cache hit ratio while nobody else uses it
        self.judged = 0
        self.full_hits = 0
        self.misses = 0
        self.cuts = 0
        self.evicting = 0  # readings whose hit ratio said prefixes were being evicted
        self.held_back = 0  # times a group could not open

    # --- what the engine says ------------------------------------------------------------------

    def observe(self, capacity: float | None, held: float | None) -> None:
        self.capacity = capacity if capacity else None
        self.held = held or 0.0

    def observe_hits(self, queried: float | None, found: float | None, *, alone: bool) -> None:
        """The prompt tokens the engine looked up in its prefix cache since the last reading, and found there. While
        only batch work uses the engine, a reading whose hit ratio falls well under the usual one cuts the learnt
        window, once per round, as a follower's miss does, but as the misses happen."""
        if not (self.learning and alone and queried and found is not None and queried >= COUNTED_QUERIES):
            return
        ratio = found / queried
        usual = self._usual_ratio
        if usual is not None and ratio < EVICTING * usual:
            self.evicting += 1
            if self._opened > self._cut_at:
                self._cut()
            return
        self._usual_ratio = ratio if usual is None else usual + USUAL_MEMORY * (ratio - usual)

    @property
    def learning(self) -> bool:
        """Counting groups, learnt from cached tokens (no cache size, and the engine reports cached tokens)."""
        return self.capacity is None and (self._seen_cached or self.judged < SILENT_FOLLOWERS)

    # --- groups --------------------------------------------------------------------------------

    def fits(self, tokens: float) -> bool:
        """Whether a new group with a prefix of `tokens` may open now. Always, when no open group has anything in
        flight here: work must go on (the open groups may be waiting for exactly this one, a subtree of theirs)."""
        if not self.enabled or tokens < SMALL_PREFIX_TOKENS or not self._busy:
            return True
        if self.capacity is not None:
            admitted = self.working() + tokens <= MARGIN * self.capacity
        elif self.learning:
            admitted = self._counted + 1 <= max(1.0, self.groups)
        else:
            return True
        if not admitted:
            self.held_back += 1
        return admitted

    def working(self) -> float:
        """Tokens the open groups and the running requests need in the cache now."""
        return self._idle_tokens + max(self.held, self._busy_tokens + self._followers * self.private_tokens)

    def open(self, key: int, tokens: float) -> None:
        if key in self._open:
            return
        self._opened += 1
        self._open[key] = _Group(tokens, self._opened)
        self._idle_tokens += tokens
        self._counted += tokens >= SMALL_PREFIX_TOKENS

    def is_open(self, key: int) -> bool:
        return key in self._open

    def hold(self, key: int) -> None:
        group = self._open.get(key)
        if group is None:
            return
        if not group.inflight:
            self._move(group.tokens, busy=True)
        group.inflight += 1

    def release(self, key: int) -> None:
        """One of the group's requests finished here."""
        group = self._open.get(key)
        if group is None:
            return
        group.inflight -= 1
        if not group.inflight:
            self._move(group.tokens, busy=False)

    def inflight(self, key: int) -> int:
        group = self._open.get(key)
        return group.inflight if group else 0

    def close(self, key: int) -> None:
        group = self._open.pop(key, None)
        if group is None:
            return
        if group.inflight:
            self._busy_tokens -= group.tokens
            self._busy -= 1
        else:
            self._idle_tokens -= group.tokens
        self._counted -= group.tokens >= SMALL_PREFIX_TOKENS

    def resize(self, key: int, tokens: float) -> None:
        """The tokens the group's head actually computed (its answer's prompt_tokens - cached_tokens)."""
        group = self._open.get(key)
        if group is None or tokens <= 0:
            return
        self.close(key)
        group.tokens = float(tokens)
        self._open[key] = group
        if group.inflight:
            self._busy_tokens += group.tokens
            self._busy += 1
        else:
            self._idle_tokens += group.tokens
        self._counted += group.tokens >= SMALL_PREFIX_TOKENS

    def shrink(self, key: int, tokens: float, estimated: float) -> None:
        """What is left of the group needs only part of its prefix in the cache: `tokens` of the `estimated` whole,
        both estimates from the key blocks. The group's size may have been measured since (its head's answer): the
        part keeps its share of that measure."""
        group = self._open.get(key)
        if group is None or estimated <= 0:
            return
        part = tokens * group.tokens / estimated
        if 0 < part < group.tokens:
            self.resize(key, part)

    def _move(self, tokens: float, busy: bool) -> None:
        sign = 1 if busy else -1
        self._busy_tokens += sign * tokens
        self._idle_tokens -= sign * tokens
        self._busy += sign

    # --- followers -----------------------------------------------------------------------------

    def follower_sent(self) -> None:
        self._followers += 1

    def follower_done(self, prompt_tokens: int, cached_tokens: int) -> None:
        self._followers -= 1
        if prompt_tokens:
            own = max(0, prompt_tokens - cached_tokens)
            self.private_tokens += PRIVATE_MEMORY * (own - self.private_tokens)

    def judge(self, key: int, least: float, best: float, cached_tokens: int) -> bool:
        """A follower of group `key` found `cached_tokens` in the cache; it shares at least `least` tokens with its
        group, and the most a follower of the same depth found is `best`. True for a full hit. A miss (less than the
        least it shares, or less than half of what its siblings found: its prefix was evicted, or most of it) cuts
        the learnt window, once per round: only groups opened after the last cut can cut again. In between (siblings
        of one depth may share more or less of the prompt) says nothing."""
        self.judged += 1
        if cached_tokens > 0:
            self._seen_cached = True
        found = cached_tokens + HIT_SLACK_TOKENS
        if found >= FULL_HIT * max(least, best):
            self.full_hits += 1
            return True
        if found >= FULL_HIT * least and cached_tokens >= best / 2:
            return False
        self.misses += 1
        group = self._open.get(key)
        if self.learning and group is not None and group.opened > self._cut_at:
            self._cut()
        return False

    def _cut(self) -> None:
        self.groups = max(1.0, min(self.groups, float(self._counted)) * DECREASE)
        self.threshold = self.groups
        self._cut_at = self._opened
        self.cuts += 1

    def unheard(self) -> None:
        """A follower's answer said nothing of its tokens (no usage): as silent as one without cached tokens."""
        self.judged += 1

    def group_hit(self) -> None:
        """A group's first judged follower found its whole prefix: the window grows, if it was what held groups back."""
        if not self.learning or self._counted + 1 < self.groups:
            return
        self.groups += SLOW_START_GROWTH if self.groups < self.threshold else 1.0 / self.groups

    def snapshot(self) -> dict:
        return {
            "mode": "off"
            if not self.enabled
            else "cache_size"
            if self.capacity is not None
            else "learnt"
            if self.learning
            else "no_signal",
            "cache_tokens": self.capacity,
            "working_tokens": round(self.working()),
            "open_groups": len(self._open),
            "learnt_groups": round(self.groups, 2),
            "followers_judged": self.judged,
            "full_hits": self.full_hits,
            "misses": self.misses,
            "cuts": self.cuts,
            "evicting_readings": self.evicting,
            "held_back": self.held_back,
        }
