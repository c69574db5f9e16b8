"""The admission order both executors follow (batch_gateway/admission.py): pure functions, no I/O."""

from __future__ import annotations

import pytest

from batch_gateway.admission import Running, SlotUsage, Waiting, plan
from batch_gateway.store.metadata import TenantPolicy

NOW = 1_000_000.0


def waiting(name: str, tenant: str, deadline: float, arrived: float = 0.0) -> Waiting:
    return Waiting(name, tenant, NOW + deadline, NOW + arrived)


def names(batches) -> list[str]:
    return [getattr(b, "batch", b).batch_id for b in batches]


def test_earliest_deadline_first_across_tenants_while_each_is_within_its_part():
    queue = [waiting("a-loose", "a", 7200, 0), waiting("b-mid", "b", 3600, 1), waiting("a-tight", "a", 600, 2)]
    result = plan(queue, [], slots=2, policies={}, now=NOW)
    assert names(result.start) == ["a-tight", "b-mid"]  # FIFO would start a-loose and b-mid
    assert names(result.queue) == ["a-loose"]


def test_a_flooding_tenant_gets_its_fair_part_and_another_tenants_single_batch_goes_next():
    flood = [waiting(f"a{i}", "a", 3600, i) for i in range(10)]
    single = waiting("b", "b", 3600 * 24, 100)  # arrives last, with the loosest deadline
    result = plan([*flood, single], [Running("a"), Running("a")], slots=2, policies={}, now=NOW)
    assert result.start == []
    assert names(result.queue)[0] == "b"  # FIFO: eleventh
    # With free slots, the fair part is one each: b starts beside a0 although a's deadlines are earlier.
    result = plan([*flood, single], [], slots=2, policies={}, now=NOW)
    assert names(result.start) == ["a0", "b"]


def test_weights_share_the_slots_and_caps_hold_a_tenant_back():
    queue = [waiting(f"a{i}", "a", 7200, i) for i in range(6)] + [waiting(f"b{i}", "b", 3600, i) for i in range(6)]
    weighted = plan(queue, [], slots=4, policies={"a": TenantPolicy(weight=3.0)}, now=NOW)
    assert sorted(names(weighted.start)) == ["a0", "a1", "a2", "b0"]
    capped = plan(queue, [], slots=4, policies={"b": TenantPolicy(max_running=1)}, now=NOW)
    assert sorted(names(capped.start)) == ["a0", "a1", "a2", "b0"]
    # A capped tenant's batches wait for its own runs even when slots are free.
    alone = plan(queue[6:], [], slots=4, policies={"b": TenantPolicy(max_running=2)}, now=NOW)
    assert names(alone.start) == ["b0", "b1"] and names(alone.queue) == ["b2", "b3", "b4", "b5"]


def test_a_tenant_alone_takes_every_slot():
    queue = [waiting(f"a{i}", "a", 3600, i) for i in range(5)]
    assert names(plan(queue, [Running("a")], slots=4, policies={}, now=NOW).start) == ["a0", "a1", "a2"]


def test_with_fewer_slots_than_tenants_the_tenants_take_turns():
    usage = SlotUsage(window=600)
    usage.observe({"a": 1}, NOW - 600)  # a held the only slot for the last ten minutes
    recent = usage.observe({}, NOW)
    assert recent["a"] == pytest.approx(1 - 2.718281828**-1, rel=1e-6)
    queue = [waiting("a1", "a", 3600, 0), waiting("b1", "b", 7200, 1)]
    assert names(plan(queue, [], slots=1, policies={}, now=NOW, usage=recent).start) == ["b1"]
    # Shares of what was held lately, not amounts: a run far shorter than the window counts as much.
    short = SlotUsage(window=600)
    short.observe({"a": 1}, NOW - 2)
    assert names(plan(queue, [], slots=1, policies={}, now=NOW, usage=short.observe({}, NOW)).start) == ["b1"]
    assert names(plan(queue, [], slots=1, policies={}, now=NOW).start) == ["a1"]  # no memory: deadline first


def test_queue_positions_and_projected_starts_follow_the_runs_projected_ends():
    running = [Running("a", started=NOW - 100, projected_end=NOW + 100), Running("b", NOW - 50, NOW + 250)]
    queue = [waiting("c1", "c", 3600, 0), waiting("c2", "c", 3600, 1), waiting("c3", "c", 3600, 2)]
    result = plan(queue, running, slots=2, policies={}, now=NOW)
    assert [(p.batch.batch_id, p.position) for p in result.queue] == [("c1", 1), ("c2", 2), ("c3", 3)]
    # Slots free at the projected ends; a queued batch then runs about as long as the running ones (250 s).
    assert [p.projected_start - NOW for p in result.queue] == [100, 250, 350]
    unknown = plan(queue, [Running("a"), Running("b")], slots=2, policies={}, now=NOW)
    assert [p.projected_start for p in unknown.queue] == [None, None, None]


def test_fifo_admission_is_arrival_order_whatever_the_deadlines_and_tenants():
    queue = [waiting("a-loose", "a", 7200, 0), waiting("a2", "a", 7200, 1), waiting("b-tight", "b", 60, 2)]
    result = plan(queue, [Running("a")], slots=2, policies={"a": TenantPolicy(max_running=1)}, now=NOW, fifo=True)
    assert names(result.start) == ["a-loose"] and names(result.queue) == ["a2", "b-tight"]


def test_a_batch_in_the_last_half_of_its_window_goes_first_by_one_slot_beyond_its_tenants_part():
    # b holds its part (one of two slots); its batch has waited 35 s of a 60 s window: it goes before a's.
    near = waiting("b-near", "b", 25, -35)
    result = plan([waiting("a-loose", "a", 7200, -10), near], [Running("b")], slots=2, policies={}, now=NOW)
    assert names(result.start) == ["b-near"]
    fresh = waiting("b-fresh", "b", 60, 0)  # the same tenant's batch with most of its window left waits its turn
    result = plan([waiting("a-loose", "a", 7200, -10), fresh], [Running("b")], slots=2, policies={}, now=NOW)
    assert names(result.start) == ["a-loose"]
    # One slot beyond its part at most: holding two of three (its part is one), b's urgent batch waits.
    queue = [waiting("a-loose", "a", 7200, -10), waiting("c-loose", "c", 7200, -5), near]
    result = plan(queue, [Running("b"), Running("b")], slots=3, policies={}, now=NOW)
    assert names(result.start) == ["a-loose"]


def test_no_slots_start_nothing():
    queue = [waiting("a", "a", 7200, 0), waiting("b", "b", 60, 1)]
    result = plan(queue, [], slots=0, policies={}, now=NOW)
    assert result.start == [] and names(result.queue) == ["b", "a"]


def test_parts_of_a_slot_are_taken_in_turn():
    # Weights 2, 1, 1 over three slots: parts of 1.5, 0.75 and 0.75. A takes one; then B and C, who miss all of
    # theirs, go before A's second, whatever the deadlines (an engine then splits 2:1:1 between the three runners).
    queue = [waiting(f"a{i}", "a", 600, i) for i in range(3)] + [waiting("b", "b", 7200, 5), waiting("c", "c", 7200, 6)]
    result = plan(queue, [], slots=3, policies={"a": TenantPolicy(weight=2.0)}, now=NOW)
    assert names(result.start) == ["a0", "b", "c"]


def test_fair_parts_are_the_runners_split():
    from batch_gateway.admission import fair_parts
    from batch_gateway.runner.share import allocate

    for total, demands, weights in ((3, [3, 2, 1], [2, 1, 1]), (1, [4, 0], [1, 1]), (10, [1, 20, 20], [1, 3, 1])):
        assert fair_parts(total, demands, weights) == pytest.approx(allocate(total, demands, weights))
