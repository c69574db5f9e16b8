"""The engine's knee while only batch runners use it: slow start doubles the batch's total once per service time
until the engine queues; its running count then is its capacity, and the total stays there, probed upward now and
then. Past the knee more requests only queue. What was given to interactive users is taken back at slow start's
pace. An engine that states how many requests it runs at once (llama.cpp's slots) has its knee there from the start,
and nothing probes past it. A pure object fed by the controller at each reading."""

from __future__ import annotations

import math
from collections import deque

from batch_gateway.runner.engine_reading import EngineReading

QUEUE_STEPS = 3.0  # admitted requests that waited this many steps on average mean a queue
QUEUE_ALLOWANCE = 1.0  # without queue times: waiting requests that may be only arrivals between two steps...
QUEUE_ALLOWANCE_SHARE = 0.01  # ...plus this share of the running batch
KV_FULL = 0.95  # KV-cache usage at which the engine starts preempting: as good as a queue
CAPACITY_MEMORY = 10.0  # seconds over which the largest running count stands for the engine's capacity
PROBE_SHARE = 0.05  # after the knee, the total is probed upward by this share of the capacity...
PROBE_HOLD = 10.0  # ...at most every this many seconds...
PROBE_SERVICE_TIMES = 3.0  # ...and every this many service times (an overshoot queues for a whole one)
UNSEEN_SHARE = 0.1  # our requests the gauges may not show yet (in transit) before growth waits for them


class Knee:
    def __init__(self) -> None:
        self._running_seen: deque[tuple[float, float]] = deque()  # (time, running), decreasing: head is the max
        self._queued_readings = 0
        self.capacity: float | None = None  # the engine's concurrency at its knee, once a queue has shown it
        self.slots: int | None = None  # the engine's concurrency as it states it
        self.slow_start = True
        self._probe_at = -math.inf
        self.increases = 0
        self.queue_cuts = 0

    def know_slots(self, slots: int) -> None:
        """The engine runs at most `slots` requests at once and says so: that is its knee (until a queue shows fewer:
        an engine restarted with fewer slots). A request past it waits in the engine and takes the next slot freed,
        whatever prefix that slot holds (llama.cpp keeps one per slot)."""
        self.slots = slots
        self.capacity = float(slots)

    def hold(self, now: float, service_time: float | None) -> float:
        """When the next probe may go: a queue or a probe holds the total for a while."""
        return now + max(PROBE_HOLD, PROBE_SERVICE_TIMES * (service_time or 0.0))

    def queued(self, now: float, reading: EngineReading, *, step: float | None, ours: bool, answered: bool) -> bool:
        """Whether the engine is at its knee, so that its running count is its capacity: the requests it admitted
        waited several steps for a place (vLLM's queue-time histogram), or, where the engine does not say, requests
        waited at three readings running (arrivals between two steps wait too, but rarely that often); or its KV
        cache is full. `ours`: only batch runners use the engine; `answered`: the batch has had answers (before
        them, a queue is someone else's doing)."""
        seen = self._running_seen
        while seen and seen[-1][1] <= reading.running:
            seen.pop()
        seen.append((now, reading.running))
        while now - seen[0][0] > CAPACITY_MEMORY:
            seen.popleft()
        if reading.queue_seconds is not None and step:
            waited = reading.queue_seconds > QUEUE_STEPS * step and reading.waiting > 0
            needed = 2
        else:
            # An engine whose waiting requests found every slot taken (llama.cpp) has no arrivals to allow for. There a
            # request held waiting takes the next slot freed, before the follower of the prefix that slot holds.
            allowance = 0.0 if reading.waiting_means_full else QUEUE_ALLOWANCE + QUEUE_ALLOWANCE_SHARE * reading.running
            waited = reading.waiting > allowance
            needed = 3
        kv_full = reading.kv_usage is not None and reading.kv_usage >= KV_FULL
        self._queued_readings = self._queued_readings + 1 if (waited and reading.running >= 1) or kv_full else 0
        if self._queued_readings < (1 if kv_full else needed):
            return False
        if ours:
            # Only the batch's own queue shows the knee: beside others, a burst of theirs queues at any running count.
            self.capacity = seen[0][1]
            if answered:
                self.slow_start = False
        # Beside others slow start goes on: it is the way to the knee once they leave, when the knee is not yet known
        # (else the batch would creep up one probe at a time).
        return True

    def total(
        self,
        now: float,
        reading: EngineReading,
        *,
        total: float,
        batch_inflight: float,
        queued: bool,
        interval: float | None,
        service_time: float | None,
    ) -> float:
        """What all batch runners together take, from `total` now, while the engine is theirs."""
        if queued:
            assert self.capacity is not None
            if total > self.capacity:
                self.queue_cuts += 1
            self._probe_at = self.hold(now, service_time)
            return self.capacity
        if self.slots is not None and self.capacity is not None and total >= self.capacity:
            return self.capacity  # the stated slots, or fewer if a queue has shown fewer since (a restarted engine)
        using = batch_inflight >= 0.9 * total
        unseen = batch_inflight - reading.running - reading.waiting > 1 + UNSEEN_SHARE * batch_inflight
        if not using or unseen:
            return total  # the last increase is not in use (or not in the engine's gauges) yet
        # Below a knee already known, the total refills up to it; otherwise slow start has no ceiling.
        ceiling = self.capacity if self.capacity is not None and total < self.capacity else math.inf
        if self.slow_start or ceiling < math.inf:
            # Double once per service time, as TCP does once per round trip: a request that overshoots the knee waits
            # a whole service time in the queue, and cannot be called back. Below a knee already known (what was
            # given to users who seem to have left), the same pace up to it, as TCP's slow start up to its
            # threshold: users who only paused come back to an engine that is not yet full, and are seen again.
            if service_time is None or interval is None:
                return total
            self.increases += 1
            # From one sequence at least: beside users the total may have come down to none (their room, or a pause),
            # while the runner still holds its minimum.
            grown = max(total, 1.0) * 2 ** (min(interval, service_time) / max(service_time, 1e-3))
            if ceiling == math.inf:
                # At least one more per reading, or a first slow start from one would wait on the dithering. Not in a
                # refill: on a CPU engine the batch may hold one sequence, and one more per reading doubles it at once.
                grown = max(total + 1, grown)
            return min(grown, ceiling)
        if now >= self._probe_at:
            self._probe_at = self.hold(now, service_time)
            self.increases += 1
            return total + max(1.0, PROBE_SHARE * (self.capacity or total))
        return total
