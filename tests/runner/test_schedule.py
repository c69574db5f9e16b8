"""Cold-group gating, exactly-once hand-out, endpoint affinity and stealing."""

import numpy as np

from batch_gateway.runner.schedule import GroupScheduler


def drain(scheduler: GroupScheduler, endpoint: int = 0) -> list[int]:
    out = []
    while (line := scheduler.next_ready(endpoint)) is not None:
        out.append(line)
    return out


def test_cold_group_sends_its_head_alone_then_flows():
    # Two groups: lines 10,11,12 (group 0) and 20,21 (group 1).
    s = GroupScheduler(np.array([10, 11, 12, 20, 21]), np.array([0, 0, 0, 1, 1]))
    assert drain(s) == [10, 20]  # one head per group; followers wait
    s.on_finished(20, success=True)
    assert drain(s) == [21]  # group 1 is warm now
    s.on_finished(10, success=True)
    assert drain(s) == [11, 12]
    assert s.done


def test_failed_head_passes_the_role_on():
    s = GroupScheduler(np.array([1, 2, 3]), np.array([0, 0, 0]))
    assert drain(s) == [1]
    s.on_finished(1, success=False)
    assert drain(s) == [2]  # the next request becomes the head, still alone
    s.on_finished(2, success=True)
    assert drain(s) == [3]


def test_every_line_handed_out_exactly_once_with_random_completions():
    rng = np.random.default_rng(1)
    groups = np.sort(rng.integers(0, 50, size=2000))
    lines = rng.permutation(2000)
    s = GroupScheduler(lines, groups, endpoints=3)
    handed: list[int] = []
    in_flight: list[int] = []
    while not s.done or in_flight:
        progressed = False
        for endpoint in range(3):
            line = s.next_ready(endpoint)
            if line is not None:
                handed.append(line)
                in_flight.append(line)
                progressed = True
        assert progressed or in_flight, "deadlock: nothing in flight and nothing handed out"
        if in_flight and (not progressed or rng.random() < 0.5):
            done = in_flight.pop(int(rng.integers(len(in_flight))))
            s.on_finished(done, success=bool(rng.random() < 0.9))
    assert sorted(handed) == sorted(lines.tolist())


def test_groups_stick_to_their_endpoint_and_idle_endpoints_steal():
    s = GroupScheduler(np.arange(6), np.array([0, 0, 0, 0, 0, 0]), endpoints=2)
    assert s.next_ready(0) == 0
    assert s.next_ready(1) is None  # the only group's head is out on endpoint 0
    s.on_finished(0, success=True)
    assert s.next_ready(1) == 1  # endpoint 1 steals the warm group, its request goes as a head there
    assert s.next_ready(1) is None
    assert s.next_ready(0) is None  # the group moved to endpoint 1
    s.on_finished(1, success=True)
    assert drain(s, 1) == [2, 3, 4, 5]


def test_empty_plan_is_done():
    s = GroupScheduler(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    assert s.done and s.next_ready() is None
