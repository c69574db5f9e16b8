"""Cold-prefix gating and endpoint affinity: which planned request goes out next, and where.

Sorting alone is not enough. Requests sharing a prefix that go out together all start cold, and each computes the
shared prefix: measured on llama.cpp, about 1 % cache hits, worse than random order. vLLM likewise reuses a block
only once a request has finished computing it. So a shared prefix is first computed by one request alone, and the
requests that reuse it follow once it has finished. Meanwhile other work keeps the engine busy.

**The prefix tree.** The plan is the requests in key order, plus each one's *depth*: how many leading key blocks it
shares with the request before it (`prefix.shared_depths`). The *parent* of request i (depth d > 0) is the first
request of the run of requests around i that share those d blocks. That is the one that computes them. Requests
with depth 0 have no parent; they are the heads of top-level groups. This is the general case: a shared system prompt
with distinct questions is a one-level tree, and few-shot prompts that branch at several points are deeper trees.

**Gating.** A request with no parent may go at any time. The children of a parent form a *pool*. The pool opens on an
endpoint (turns *warm* there) when its parent finishes successfully there; from then on its children go out back to
back. If the parent fails, the pool's first remaining child becomes a stand-in parent. It goes out alone, and the
pool opens when it succeeds. It is the child sharing the deepest prefix, so it computes what all the others reuse.
Children are themselves parents of their own pools, so every level of the tree is warmed once per endpoint.

**Endpoints.** A pool is warm on the endpoints where its parent, or a stand-in, succeeded; its children go there,
since their prefix sits in that engine's cache. Endpoints pull work when they have a free slot, so busy endpoints take
fewer new groups: groups balance by load. The order of preference for `next_ready(endpoint)` is:
1. a pool warm on this endpoint (drained front first, back to back);
2. a pool whose head failed on this endpoint (send a stand-in);
3. a new top-level request;
4. join: take over work from another endpoint's busiest pool by sending a stand-in head here. After it succeeds,
   both endpoints drain the pool. Without this, one huge group (every request sharing a system prompt) would keep
   all but one endpoint idle.

**Contract.** The dispatcher retries a request itself. The scheduler hands out each request exactly once and needs
exactly one `on_finished(line, success)` per handed-out request, whatever its final outcome.

**Memory.** For n requests: the lines (int64), the children index (int32) and its offsets (int64), about 20 bytes
per request. Only pools that are open or waiting for a stand-in, and requests in flight, are Python objects.
"""

from __future__ import annotations

from collections import deque

import numpy as np

ROOT = -1
JOIN_CANDIDATES = 4  # pools examined per other endpoint when joining: the fronts of their queues


class _Pool:
    """The children of one parent: children[cursor:end] are still to go out."""

    __slots__ = ("cursor", "end", "heading", "inflight", "parent", "warm")

    def __init__(self, parent: int, cursor: int, end: int, warm: int = 0) -> None:
        self.parent = parent
        self.cursor = cursor
        self.end = end
        self.warm = warm  # bit e: open on endpoint e
        self.heading = 0  # bit e: a stand-in head is in flight on endpoint e
        self.inflight = 0  # children handed out from the open pool and not finished

    @property
    def left(self) -> int:
        return self.end - self.cursor


class GroupScheduler:
    def __init__(
        self,
        lines: np.ndarray,
        groups: np.ndarray | None = None,
        endpoints: int = 1,
        *,
        depths: np.ndarray | None = None,
    ) -> None:
        """`lines`: request indices in planned order. Then either `depths` (shared leading key blocks with the
        previous planned request, see `prefix.shared_depths`: gating at every level of the prefix tree), or
        `groups` (a top-level group number per position, equal numbers contiguous: one level, each group's first
        request warms it)."""
        self.lines = np.asarray(lines, dtype=np.int64)
        n = len(self.lines)
        if endpoints < 1:
            raise ValueError("endpoints must be at least 1")
        if depths is None:
            if groups is None:
                raise ValueError("give either groups or depths")
            groups = np.asarray(groups)
            if len(groups) != n:
                raise ValueError(f"groups has {len(groups)} entries for {n} lines")
            depths = np.zeros(n, dtype=np.uint8)
            if n > 1:
                depths[1:] = groups[1:] == groups[:-1]
        else:
            depths = np.asarray(depths)
            if len(depths) != n:
                raise ValueError(f"depths has {len(depths)} entries for {n} lines")
        if n and (int(depths[0]) != 0 or int(depths.min()) < 0):
            raise ValueError("depths must be non-negative and the first must be 0")
        self.endpoints = endpoints
        self._children, self._offsets = _tree(depths)
        # Root pool: requests with no parent, open everywhere.
        self._root = _Pool(ROOT, int(self._offsets[0]), int(self._offsets[1]), warm=(1 << endpoints) - 1)
        self._ready: list[deque[_Pool]] = [deque() for _ in range(endpoints)]  # pools open on the endpoint
        self._retry: list[deque[_Pool]] = [deque() for _ in range(endpoints)]  # pools needing a stand-in here
        # line → (position, endpoint, pool it heads, open pool it came from)
        self._inflight: dict[int, tuple[int, int, _Pool | None, _Pool | None]] = {}
        self._pool_cap: list[int | None] = [None] * endpoints  # most children of one pool in flight, per endpoint
        self.handed_out = 0
        self.joins = 0

    @property
    def total(self) -> int:
        return len(self.lines)

    @property
    def pending(self) -> int:
        """Requests not handed out yet."""
        return len(self.lines) - self.handed_out

    @property
    def done(self) -> bool:
        """Every request has been handed out."""
        return self.handed_out >= len(self.lines)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def limit_pool_inflight(self, endpoint: int, cap: int | None) -> None:
        """At most `cap` children of one pool in flight on `endpoint` (None: no limit). For engines with a prefix
        cache per slot (llama.cpp): parallel followers land in other slots, which hold other prefixes, and each
        computes the prefix again; one at a time, each follower finds the slot its predecessor just left."""
        self._pool_cap[endpoint] = cap

    def next_ready(self, endpoint: int = 0) -> int | None:
        """The next request (line index) for `endpoint`, or None if nothing may go there right now. When None and
        not `done`, work is waiting for a cold prefix to finish: ask again after the next `on_finished`."""
        bit = 1 << endpoint
        ready = self._ready[endpoint]
        cap = self._pool_cap[endpoint]
        while ready and not ready[0].left:
            ready.popleft()
        for pool in ready if cap is not None else (ready[0],) if ready else ():
            if pool.left and (cap is None or pool.inflight < cap):
                position = int(self._children[pool.cursor])
                pool.cursor += 1
                pool.inflight += 1
                if not pool.left:
                    ready.remove(pool)
                return self._hand_out(position, endpoint, None, pool)
        retry = self._retry[endpoint]
        while retry:
            pool = retry.popleft()
            if pool.left and not (pool.warm | pool.heading) & bit:
                return self._send_head(pool, endpoint)
        root = self._root
        if root.cursor < root.end:
            position = int(self._children[root.cursor])
            root.cursor += 1
            return self._hand_out(position, endpoint, None)
        return self._join(endpoint)

    def on_finished(self, line: int, success: bool) -> None:
        """A handed-out request has its final result."""
        try:
            position, endpoint, heads, source = self._inflight.pop(line)
        except KeyError:
            raise ValueError(f"line {line} is not in flight") from None
        if source is not None:
            source.inflight -= 1
        if heads is not None:  # a stand-in for its pool's parent
            heads.heading &= ~(1 << endpoint)
            self._settle(heads, endpoint, success)
        begin, end = int(self._offsets[position + 1]), int(self._offsets[position + 2])
        if end > begin:  # it is a parent itself: its own pool opens here, or needs a stand-in
            self._settle(_Pool(position, begin, end), endpoint, success)

    # ------------------------------------------------------------------------------------------

    def _settle(self, pool: _Pool, endpoint: int, success: bool) -> None:
        bit = 1 << endpoint
        if not pool.left:
            return
        if success:
            if not pool.warm & bit:
                pool.warm |= bit
                self._ready[endpoint].append(pool)
        elif not pool.warm:
            self._retry[endpoint].append(pool)  # nobody has this prefix: the next child tries, here
        # else: warm on another endpoint, which carries on with it

    def _join(self, endpoint: int) -> int | None:
        """Nothing of its own: send a stand-in head for the pool with the most requests left elsewhere."""
        bit = 1 << endpoint
        best: _Pool | None = None
        for other in range(self.endpoints):
            if other == endpoint:
                continue
            for queue in (self._ready[other], self._retry[other]):
                for i, pool in enumerate(queue):
                    if i >= JOIN_CANDIDATES:
                        break
                    if pool.left and not (pool.warm | pool.heading) & bit and (best is None or pool.left > best.left):
                        best = pool
        if best is None:
            return None
        self.joins += 1
        return self._send_head(best, endpoint)

    def _send_head(self, pool: _Pool, endpoint: int) -> int:
        position = int(self._children[pool.cursor])
        pool.cursor += 1
        pool.heading |= 1 << endpoint
        return self._hand_out(position, endpoint, pool)

    def _hand_out(self, position: int, endpoint: int, heads: _Pool | None, source: _Pool | None = None) -> int:
        line = int(self.lines[position])
        self._inflight[line] = (position, endpoint, heads, source)
        self.handed_out += 1
        return line


def _tree(depths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Children index of the prefix tree: children[offsets[p + 1]:offsets[p + 2]] are the positions whose parent
    is p, in order; children[offsets[0]:offsets[1]] are the positions with no parent."""
    # Temporaries are freed as soon as they are used, in place where possible: at a million requests each n-long
    # int64 is 8 MB, and this runs while the ingest index is held.
    n = len(depths)
    parent = np.full(n, ROOT, dtype=np.int64)
    for depth in range(1, int(depths.max()) + 1 if n else 1):
        # The run of depth `depth` around i starts at the last position j <= i that shares fewer blocks with its
        # predecessor; for i with exactly this depth, that j is its parent.
        run_start = np.where(depths < depth, np.arange(n, dtype=np.int64), 0)
        np.maximum.accumulate(run_start, out=run_start)
        mine = depths == depth
        parent[mine] = run_start[mine]
        del run_start, mine
    children = np.argsort(parent, kind="stable").astype(np.int32)
    parent += 1  # ROOT counts in slot 0
    counts = np.bincount(parent, minlength=n + 1)
    del parent
    offsets = np.zeros(n + 2, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return children, offsets
