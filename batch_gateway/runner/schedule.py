"""Cold-group gating and endpoint affinity: which planned request goes out next, and where.

Sorting alone is not enough: requests of one prefix group sent together all start cold, and each computes the shared
prefix (measured on llama.cpp: ~1% cache hits, worse than random order). So the first request of a group (its head)
goes out alone; once it has finished — the prefix is now in the engine's cache — the group is *warm* and its other
requests go out back to back. Meanwhile other groups' heads keep the engine busy. A head that fails hands the role
to the group's next request.

With several endpoints, a group sticks to the endpoint that sent its head (its cache is warm there). Endpoints pull
work when they have a free slot, so busy endpoints take fewer new groups: groups balance by load.

Memory: the plan is numpy arrays (lines in planned order, group boundaries, a cursor per group); only groups that are
in flight or warm live in Python containers.
"""

from __future__ import annotations

from collections import deque

import numpy as np

COLD, HEAD_OUT, WARM = 0, 1, 2


class GroupScheduler:
    def __init__(self, lines: np.ndarray, groups: np.ndarray, endpoints: int = 1) -> None:
        """`lines`: request indices in planned order; `groups`: their group numbers (equal groups are contiguous)."""
        self.lines = np.asarray(lines, dtype=np.int64)
        groups = np.asarray(groups, dtype=np.int64)
        n = len(self.lines)
        if n:
            boundaries = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        else:
            boundaries = np.zeros(0, dtype=np.int64)
        self.starts = boundaries
        self.ends = np.r_[boundaries[1:], n].astype(np.int64)
        self.cursor = self.starts.copy()  # next position to hand out, per group
        self.state = np.zeros(len(boundaries), dtype=np.int8)
        # Where each request sits: its group, looked up when it finishes.
        self.group_of = np.empty(int(self.lines.max()) + 1 if n else 0, dtype=np.int32)
        self.group_of[self.lines] = np.repeat(np.arange(len(boundaries), dtype=np.int32), self.ends - self.starts)
        self.head_line: dict[int, int] = {}  # group → its head in flight
        self.affinity: dict[int, int] = {}  # group → endpoint
        self._warm: list[deque[int]] = [deque() for _ in range(endpoints)]  # warm groups with requests left
        self._orphan_heads: list[deque[int]] = [deque() for _ in range(endpoints)]  # cold groups whose head failed
        self._next_new = 0
        self.handed_out = 0

    @property
    def total(self) -> int:
        return len(self.lines)

    @property
    def done(self) -> bool:
        """Every request has been handed out."""
        return self.handed_out >= len(self.lines)

    @property
    def pending(self) -> int:
        return len(self.lines) - self.handed_out

    def next_ready(self, endpoint: int = 0) -> int | None:
        """The next request for `endpoint`, or None if nothing can go there right now."""
        warm = self._warm[endpoint]
        while warm:
            group = warm[0]
            position = self.cursor[group]
            if position < self.ends[group]:
                self.cursor[group] = position + 1
                if position + 1 >= self.ends[group]:
                    warm.popleft()
                return self._hand_out(position)
            warm.popleft()
        orphans = self._orphan_heads[endpoint]
        while orphans:
            group = orphans.popleft()
            if self.cursor[group] < self.ends[group]:
                return self._send_head(group, endpoint)
        if self._next_new < len(self.starts):
            group = self._next_new
            self._next_new += 1
            self.affinity[group] = endpoint
            return self._send_head(group, endpoint)
        return self._steal(endpoint)

    def on_finished(self, line: int, success: bool) -> None:
        """A request has its final result. If it was a cold group's head, warm the group or pick a new head."""
        group = int(self.group_of[line])
        if self.head_line.get(group) != line:
            return
        del self.head_line[group]
        endpoint = self.affinity[group]
        if self.cursor[group] >= self.ends[group]:
            self.state[group] = WARM
            return
        if success:
            self.state[group] = WARM
            self._warm[endpoint].append(group)
        else:
            self.state[group] = COLD
            self._orphan_heads[endpoint].append(group)

    def _steal(self, endpoint: int) -> int | None:
        """Near the end, an idle endpoint takes over another endpoint's longest warm group (cold here: head first)."""
        best, best_left = None, 1
        for other, warm in enumerate(self._warm):
            if other == endpoint:
                continue
            for group in warm:
                left = int(self.ends[group] - self.cursor[group])
                if left > best_left:
                    best, best_left = (other, group), left
        if best is None:
            return None
        other, group = best
        self._warm[other].remove(group)
        self.affinity[group] = endpoint
        return self._send_head(group, endpoint)

    def _send_head(self, group: int, endpoint: int) -> int:
        position = self.cursor[group]
        self.cursor[group] = position + 1
        self.state[group] = HEAD_OUT
        line = self._hand_out(position)
        self.head_line[group] = line
        return line

    def _hand_out(self, position: int) -> int:
        self.handed_out += 1
        return int(self.lines[position])
