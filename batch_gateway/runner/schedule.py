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

**The window** (`prefix_window.py`). Each endpoint opens only as many groups (requests with children: a top-level
group's head, or a child that heads a subtree) as its cache can hold with their followers; a group closes there when
nothing of it is left to send and none of it is in flight. Within a pool the children without children of their own
(followers) go first, then those that open subtrees; among top-level requests, group heads in planned order (largest
groups first), then requests that share nothing with any other. So when the window is full, followers of open groups
and requests without a group still go: slots stay busy while any work that fits is left.

**Endpoints.** A pool is warm on the endpoints where its parent, or a stand-in, succeeded; its children go there,
since their prefix sits in that engine's cache. Endpoints pull work when they have a free slot, so busy endpoints take
fewer new groups: groups balance by load. Each endpoint has its own window. The order of preference for
`next_ready(endpoint)` is:
1. a pool warm on this endpoint (drained front first, back to back; a child that opens a subtree only if the window
   lets it);
2. a pool whose head failed on this endpoint (send a stand-in);
3. a new top-level group, if the window lets it open;
4. a top-level request without followers;
5. join: take over work from another endpoint's busiest pool by sending a stand-in head here, if the window lets it
   open here. After it succeeds, both endpoints drain the pool. Without this, one huge group (every request sharing a
   system prompt) would keep all but one endpoint idle.

**Warm-ups** (`warm_up_heads`, on engines with one shared prefix cache). A request that opens pools (a group's head,
a stand-in) is handed out `warming`: the dispatcher first sends a one-token copy of it (`warm_up.py`) and reports
`on_warmed`. Once the copy is answered, the prefix is cached, so the pools open at once and the children go out beside
the request itself; if the copy failed, they wait for the request as without one.

**Contract.** The dispatcher retries a request itself. The scheduler hands out each request exactly once and needs
exactly one `on_finished(line, success, ...)` per handed-out request, whatever its final outcome, with the answer's
prompt and cached tokens when it has them (the window learns from them); before it, one `on_warmed` if it was handed
out `warming`.

**Memory.** For n requests: the lines (int64), the children index (int32) and its offsets (int64), the depths
(uint8), about 21 bytes per request. Only pools that are open or waiting for a stand-in, and requests in flight, are
Python objects.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from batch_gateway.runner.prefix_window import SMALL_PREFIX_TOKENS, PrefixWindow, least_tokens, prefix_tokens

ROOT = -1
JOIN_CANDIDATES = 4  # pools examined per other endpoint when joining: the fronts of their queues


class _Pool:
    """The children of one parent: children[cursor:end] are still to go out."""

    __slots__ = ("best", "cursor", "deep", "end", "heading", "inflight", "judged", "parent", "subtrees", "warm")

    def __init__(self, parent: int, cursor: int, end: int, warm: int = 0) -> None:
        self.parent = parent
        self.cursor = cursor
        self.end = end
        self.subtrees = end  # children[subtrees:end] open subtrees of their own (set by the scheduler)
        self.deep = 0  # requests in flight that need the group's whole prefix: its followers, its warmed head
        self.warm = warm  # bit e: open on endpoint e
        self.heading = 0  # bit e: a stand-in head is in flight on endpoint e
        self.inflight = 0  # children handed out from the open pool and not finished
        self.best = (0, 0)  # (depth, cached tokens): the most a follower of that depth found in the cache
        self.judged = False  # a follower's full hit has counted for the group already

    @property
    def left(self) -> int:
        return self.end - self.cursor


class _Flight:
    """A request handed out and not finished."""

    __slots__ = ("endpoint", "follower", "heads", "opened", "position", "source", "warmed", "warming")

    def __init__(self, position: int, endpoint: int, heads: _Pool | None, source: _Pool | None, follower: bool) -> None:
        self.position = position
        self.endpoint = endpoint
        self.heads = heads  # the pool it stands in for as head
        self.source = source  # the open pool it came from (a follower, or a child that opens a subtree)
        self.follower = follower  # from an open pool, without children of its own
        self.warming = False  # a head whose warm-up goes first
        self.warmed = False  # its warm-up succeeded: the pools it heads are open already...
        self.opened: _Pool | None = None  # ...its own among them, if it has children


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
        self._depths = depths.astype(np.uint8, copy=False)
        self._children, self._offsets, split = _tree(self._depths)
        # Top-level requests: group heads (open everywhere), then those without followers.
        everywhere = (1 << endpoints) - 1
        self._root = _Pool(ROOT, int(self._offsets[0]), split, warm=everywhere)
        self._loose = _Pool(ROOT, split, int(self._offsets[1]), warm=everywhere)
        self._ready: list[deque[_Pool]] = [deque() for _ in range(endpoints)]  # pools open on the endpoint
        self._retry: list[deque[_Pool]] = [deque() for _ in range(endpoints)]  # pools needing a stand-in here
        self._inflight: dict[int, _Flight] = {}  # by line
        self._pool_cap: list[int | None] = [None] * endpoints  # most children of one pool in flight, per endpoint
        self._warm_ups = [False] * endpoints  # heads on the endpoint go out as a warm-up first
        self.windows = [PrefixWindow() for _ in range(endpoints)]
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
        computes the prefix again; one at a time, each follower finds the slot its predecessor just left. Such an
        engine keeps one prefix per slot, so this rule takes the place of the window there."""
        self._pool_cap[endpoint] = cap
        self.windows[endpoint].enabled = cap is None

    def warm_up_heads(self, endpoint: int, on: bool = True) -> None:
        """Heads handed out for `endpoint` from now on are `warming`: the dispatcher first sends a copy that generates
        one token, which computes and caches the prefix, then calls `on_warmed`, and then sends the head itself."""
        self._warm_ups[endpoint] = on

    def warming(self, line: int) -> bool:
        """Whether the handed-out `line` heads groups and wants its warm-up sent first."""
        flight = self._inflight.get(line)
        return flight is not None and flight.warming

    def on_warmed(self, line: int, success: bool, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """The warm-up of a `warming` line has its result (with its answer's usage). On success the prefix the line
        heads is cached on its endpoint, so the pools it heads open now, while the line itself, still in flight, goes
        out; otherwise they open when the line finishes, as without a warm-up."""
        flight = self._inflight.get(line)
        if flight is None or not flight.warming:
            raise ValueError(f"line {line} is not warming")
        flight.warming = False
        if not success:
            return
        flight.warmed = True
        endpoint, position, heads = flight.endpoint, flight.position, flight.heads
        window = self.windows[endpoint]
        if heads is not None:
            heads.heading &= ~(1 << endpoint)
            if prompt_tokens:
                window.resize(heads.parent, prompt_tokens - cached_tokens)
            self._settle(heads, endpoint, True)
        begin, end = int(self._offsets[position + 1]), int(self._offsets[position + 2])
        if end > begin:
            if prompt_tokens:
                window.resize(position, prompt_tokens - cached_tokens)
            flight.opened = self._pool(position, begin, end)
            flight.opened.deep = 1  # the head itself, still in flight
            self._settle(flight.opened, endpoint, True)

    def next_ready(self, endpoint: int = 0) -> int | None:
        """The next request (line index) for `endpoint`, or None if nothing may go there right now. When None and
        not `done`, work is waiting for a cold prefix to finish or for the window: ask again after the next
        `on_finished`."""
        bit = 1 << endpoint
        ready = self._ready[endpoint]
        cap = self._pool_cap[endpoint]
        window = self.windows[endpoint]
        while ready and not ready[0].left:
            ready.popleft()
        for pool in ready:
            if not pool.left or (cap is not None and pool.inflight >= cap):
                continue
            position = int(self._children[pool.cursor])
            opens = self._opens(position)
            if opens is not None and not window.fits(opens):
                continue  # its remaining children all open subtrees: they wait for room
            pool.cursor += 1
            pool.inflight += 1
            if not pool.left:
                ready.remove(pool)
                self._exhausted(pool)
            return self._hand_out(position, endpoint, None, pool, opens)
        retry = self._retry[endpoint]
        while retry:
            pool = retry.popleft()
            if pool.left and not (pool.warm | pool.heading) & bit:
                return self._send_head(pool, endpoint)
        root = self._root
        if root.left:
            position = int(self._children[root.cursor])
            opens = self._opens(position)
            if opens is None or window.fits(opens):
                root.cursor += 1
                return self._hand_out(position, endpoint, None, None, opens)
        loose = self._loose
        if loose.left:
            position = int(self._children[loose.cursor])
            loose.cursor += 1
            return self._hand_out(position, endpoint, None, None, None)
        return self._join(endpoint)

    def on_finished(self, line: int, success: bool, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """A handed-out request has its final result; with the answer's usage when it has one."""
        try:
            flight = self._inflight.pop(line)
        except KeyError:
            raise ValueError(f"line {line} is not in flight") from None
        position, endpoint = flight.position, flight.endpoint
        window = self.windows[endpoint]
        bit = 1 << endpoint
        source, heads = flight.source, flight.heads
        if source is not None:
            source.inflight -= 1
            window.release(source.parent)
            if flight.follower:
                window.follower_done(prompt_tokens, cached_tokens)
                if success:
                    self._judge(source, position, window, prompt_tokens, cached_tokens)
                source.deep -= 1
                self._shrink_if_shallow(source)
            self._close_if_idle(source, endpoint)
        if flight.warmed:  # its pools opened with its warm-up, which sized them: they close once all is done
            if heads is not None:
                window.release(heads.parent)
                self._close_if_idle(heads, endpoint)
            if flight.opened is not None:
                window.release(position)
                flight.opened.deep -= 1
                self._shrink_if_shallow(flight.opened)
                self._close_if_idle(flight.opened, endpoint)
            return
        if heads is not None:  # a stand-in for its pool's parent
            heads.heading &= ~bit
            window.release(heads.parent)
            if success and prompt_tokens:
                window.resize(heads.parent, prompt_tokens - cached_tokens)
            self._settle(heads, endpoint, success)
        begin, end = int(self._offsets[position + 1]), int(self._offsets[position + 2])
        if end > begin:  # it is a parent itself: its own pool opens here, or needs a stand-in
            window.release(position)
            if success and prompt_tokens:
                window.resize(position, prompt_tokens - cached_tokens)
            self._settle(self._pool(position, begin, end), endpoint, success)

    # ------------------------------------------------------------------------------------------

    def _opens(self, position: int) -> float | None:
        """The tokens `position` adds to the cache for its children, if it has any (None: it opens no group). It
        has children exactly when the next planned request shares more blocks with it than it does with its own
        parent (see `_tree`), and that next request shares the most."""
        if position + 1 >= len(self._depths):
            return None
        below, own = int(self._depths[position + 1]), int(self._depths[position])
        if below <= own:
            return None
        return prefix_tokens(below) - prefix_tokens(own)

    def _pool(self, parent: int, begin: int, end: int) -> _Pool:
        """The open pool of `parent`'s children, knowing where its children that open subtrees begin (they come
        after its followers)."""
        pool = _Pool(parent, begin, end)
        children, offsets = self._children, self._offsets
        low, high = begin, end
        while low < high:
            middle = (low + high) // 2
            child = int(children[middle])
            if offsets[child + 2] > offsets[child + 1]:
                high = middle
            else:
                low = middle + 1
        pool.subtrees = low
        return pool

    def _shrink_if_shallow(self, pool: _Pool) -> None:
        """Once a group's followers are all answered, and its head too, what is left of it (heads of subtrees) needs
        only the part of its prefix they share: the rest (a few-shot block whose questions are done, under a system
        prompt that other few-shot blocks share) no longer counts against the cache."""
        if pool.deep or pool.cursor < pool.subtrees or pool.subtrees >= pool.end:
            return
        deepest = int(self._depths[self._children[pool.subtrees : pool.end]].max())
        own = prefix_tokens(int(self._depths[pool.parent]))
        whole = self._opens(pool.parent)  # the estimate the group was opened with
        if whole is None:
            return
        for window in self.windows:
            window.shrink(pool.parent, prefix_tokens(deepest) - own, whole)

    def _judge(self, pool: _Pool, position: int, window: PrefixWindow, prompt: int, cached: int) -> None:
        """Did a follower find its group's prefix in the cache? Prefixes too small to tell are not judged."""
        depth = int(self._depths[position])
        least = least_tokens(depth)
        if least < SMALL_PREFIX_TOKENS:
            return
        if not prompt:
            window.unheard()
            return
        best_depth, best = pool.best
        if window.judge(pool.parent, least, best if best_depth == depth else 0, cached):
            if cached > best or best_depth != depth:
                pool.best = (depth, cached)
            if not pool.judged:
                pool.judged = True
                window.group_hit()

    def _settle(self, pool: _Pool, endpoint: int, success: bool) -> None:
        bit = 1 << endpoint
        if pool.left and success:
            if not pool.warm & bit:
                pool.warm |= bit
                self._ready[endpoint].append(pool)
        elif pool.left and not pool.warm:
            self._retry[endpoint].append(pool)  # nobody has this prefix: the next child tries, here
            return
        # else: done, or warm on another endpoint, which carries on with it
        self._close_if_idle(pool, endpoint)

    def _close_if_idle(self, pool: _Pool, endpoint: int) -> None:
        """The group closes on `endpoint` once nothing of it is left for it there and nothing is in flight there."""
        bit = 1 << endpoint
        window = self.windows[endpoint]
        if window.inflight(pool.parent) or pool.heading & bit:
            return
        if not pool.left or (not pool.warm & bit and pool.warm):
            window.close(pool.parent)

    def _exhausted(self, pool: _Pool) -> None:
        """Nothing of the pool is left to send: it closes wherever nothing of it is in flight."""
        for endpoint in range(self.endpoints):
            self._close_if_idle(pool, endpoint)

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
        if best is None or not self.windows[endpoint].fits(self._opens(best.parent) or 0.0):
            return None
        self.joins += 1
        return self._send_head(best, endpoint)

    def _send_head(self, pool: _Pool, endpoint: int) -> int:
        position = int(self._children[pool.cursor])
        pool.cursor += 1
        pool.heading |= 1 << endpoint
        window = self.windows[endpoint]
        if not window.is_open(pool.parent):  # a join: the group opens here
            window.open(pool.parent, self._opens(pool.parent) or 0.0)
        window.hold(pool.parent)
        line = self._hand_out(position, endpoint, pool, None, self._opens(position))
        if not pool.left:
            self._exhausted(pool)
        return line

    def _hand_out(
        self, position: int, endpoint: int, heads: _Pool | None, source: _Pool | None, opens: float | None
    ) -> int:
        line = int(self.lines[position])
        window = self.windows[endpoint]
        follower = source is not None and opens is None
        if source is not None:
            window.hold(source.parent)
            if follower:
                window.follower_sent()
                source.deep += 1
        if opens is not None:  # it heads a group of its own: the group opens here
            window.open(position, opens)
            window.hold(position)
        flight = _Flight(position, endpoint, heads, source, follower)
        flight.warming = self._warm_ups[endpoint] and (heads is not None or opens is not None)
        self._inflight[line] = flight
        self.handed_out += 1
        return line


def _tree(depths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Children index of the prefix tree: children[offsets[p + 1]:offsets[p + 2]] are the positions whose parent
    is p, and children[offsets[0]:offsets[1]] those with no parent. Within a parent, children without children come
    first (followers before heads of subtrees); at the top, group heads come first, and the third value is where the
    top-level requests without children begin. Both keep planned order within."""
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
    parent += 1  # ROOT counts in slot 0
    counts = np.bincount(parent, minlength=n + 1)
    offsets = np.zeros(n + 2, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    # p has children exactly when the next request shares more with it than p does with its own parent.
    heads = np.zeros(n, dtype=bool)
    if n > 1:
        np.greater(depths[1:], depths[:-1], out=heads[:-1])
    split = int(offsets[0]) + int(np.count_nonzero(heads[parent == 0]))
    # Sort key: parent slot, then (at the top) heads first, (below) heads last.
    parent *= 2
    parent += np.where(parent == 0, ~heads, heads)
    del heads, counts
    children = np.argsort(parent, kind="stable").astype(np.int32)
    del parent
    return children, offsets, split
