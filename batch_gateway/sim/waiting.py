"""The engine's waiting queue in the order of its scheduling policy, as vLLM's request_queue.py.

- `ArrivalQueue` (fcfs): arrival order; a preempted sequence goes back to the head.
- `PriorityQueue` (priority): lowest `priority` value first, ties by arrival time; a preempted sequence keeps its
  place by that order (its arrival time is unchanged, so it goes ahead of later arrivals of its priority).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from batch_gateway.sim.engine import Sequence


class WaitingQueue(Protocol):
    def add(self, sequence: Sequence) -> None:
        """A new arrival."""

    def add_front(self, sequence: Sequence) -> None:
        """A preempted sequence, or interactive load from /sim/load: ahead of new arrivals."""

    def peek(self) -> Sequence: ...

    def take(self) -> Sequence:
        """Remove and return the head (the sequence `peek` returned)."""

    def remove(self, sequence: Sequence) -> None: ...

    def clear(self) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Sequence]: ...


class ArrivalQueue(deque):
    add = deque.append
    add_front = deque.appendleft
    take = deque.popleft

    def peek(self) -> Sequence:
        return self[0]


class PriorityQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Sequence]] = []
        self._order = itertools.count()  # breaks exact ties, so sequences themselves are never compared

    def add(self, sequence: Sequence) -> None:
        heapq.heappush(self._heap, (sequence.priority, sequence.arrived, next(self._order), sequence))

    add_front = add  # the order is the policy's, whoever comes back

    def peek(self) -> Sequence:
        return self._heap[0][3]

    def take(self) -> Sequence:
        return heapq.heappop(self._heap)[3]

    def remove(self, sequence: Sequence) -> None:
        index = next(i for i, entry in enumerate(self._heap) if entry[3] is sequence)
        self._heap[index] = self._heap[-1]
        self._heap.pop()
        heapq.heapify(self._heap)

    def clear(self) -> None:
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Sequence]:
        return (entry[3] for entry in self._heap)


def waiting_queue(policy: str) -> WaitingQueue:
    return PriorityQueue() if policy == "priority" else ArrivalQueue()
