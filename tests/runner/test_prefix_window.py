"""The prefix window: how many prefix groups an endpoint opens at once, from the cache's size or learnt from
cached_tokens; the scheduler keeps followers and ungrouped work going while it is full."""

from __future__ import annotations

import numpy as np
import pytest

from batch_gateway.runner.prefix_window import (
    COUNTED_QUERIES,
    DECREASE,
    EVICTING,
    INITIAL_GROUPS,
    MARGIN,
    SILENT_FOLLOWERS,
    SLOW_START_GROWTH,
    PrefixWindow,
    prefix_tokens,
)
from batch_gateway.runner.schedule import GroupScheduler

DEEP = 5  # shared key blocks of a ~750-token system prompt (prefix_window.prefix_tokens)
PREFIX = prefix_tokens(DEEP)


def drain(s: GroupScheduler, endpoint: int = 0) -> list[int]:
    out = []
    while (line := s.next_ready(endpoint)) is not None:
        out.append(line)
    return out


def groups_plan(groups: int, size: int, singletons: int = 0) -> GroupScheduler:
    """`groups` groups of `size` requests sharing a DEEP-block prefix, then `singletons` requests sharing nothing.
    Lines are numbered by position: group g holds g*size .. g*size+size-1, its head first."""
    depths = [0 if i % size == 0 else DEEP for i in range(groups * size)] + [0] * singletons
    return GroupScheduler(np.arange(len(depths)), depths=np.array(depths, dtype=np.uint8))


def test_a_small_cache_opens_only_the_groups_whose_prefixes_fit_and_keeps_the_slots_busy():
    s = groups_plan(groups=4, size=3, singletons=2)
    s.windows[0].observe(capacity=2.2 * PREFIX / MARGIN, held=0.0)  # room for two prefixes, not three
    # Two heads; the other groups wait; the requests without a group go meanwhile.
    assert drain(s) == [0, 3, 12, 13]
    s.on_finished(0, True, prompt_tokens=760, cached_tokens=0)
    assert drain(s) == [1, 2]  # the warm group's followers go although the window is full
    for line in (1, 2, 12, 13):
        s.on_finished(line, True, prompt_tokens=770, cached_tokens=752)
    assert drain(s) == [6]  # group 0 closed: the next group opens
    assert s.windows[0].snapshot()["held_back"] > 0


def test_what_the_engine_holds_for_others_leaves_less_room():
    s = groups_plan(groups=3, size=3)
    window = s.windows[0]
    window.observe(capacity=10 * PREFIX, held=0.0)
    assert drain(s) == [0, 3, 6]  # all fit
    s = groups_plan(groups=3, size=3)
    s.windows[0].observe(capacity=10 * PREFIX, held=8 * PREFIX)  # others fill the engine
    assert drain(s) == [0]  # one group always goes


def test_shared_blocks_of_the_prefix_tree_count_once():
    # A system prompt (5 shared blocks) with three few-shot branches (6 blocks), each with a question or two.
    depths = np.array([0, 6, 6, 5, 6, 5, 6], dtype=np.uint8)
    s = GroupScheduler(np.arange(7), depths=depths)
    window = s.windows[0]
    whole, branch = prefix_tokens(6), prefix_tokens(6) - prefix_tokens(5)
    window.observe(capacity=(whole + 2 * branch) / MARGIN + 1, held=0.0)
    assert drain(s) == [0]
    s.on_finished(0, True)  # no usage: estimates stay
    # The head's followers, then both other branches' heads: each adds only its own blocks to the system prompt.
    assert drain(s) == [1, 2, 3, 5]
    assert window.working() == pytest.approx(whole + 2 * branch)
    s.on_finished(3, True, prompt_tokens=1600, cached_tokens=900)
    assert window.working() == pytest.approx(whole + 700 + branch)  # the branch's head said what it computed


TREE = np.array([0, 6, 6, 5, 6, 5, 6], dtype=np.uint8)  # a system prompt (5 blocks), three few-shot branches (6)


def test_once_a_branch_is_answered_its_group_counts_only_what_the_other_branches_share():
    s = GroupScheduler(np.arange(7), depths=TREE)
    window = s.windows[0]
    whole, system, branch = prefix_tokens(6), prefix_tokens(5), prefix_tokens(6) - prefix_tokens(5)
    window.observe(capacity=(whole + branch) / MARGIN + 1, held=0.0)  # the head's branch and one other
    assert drain(s) == [0]
    s.on_finished(0, True)
    assert drain(s) == [1, 2, 3]  # the third branch's head waits for room
    s.on_finished(1, True)
    assert drain(s) == []  # one of the head's questions still runs: its branch stays
    s.on_finished(2, True)
    # The head's branch is done; its group now holds the system prompt only, and the third branch fits.
    assert window.working() == pytest.approx(system + branch)
    assert drain(s) == [5]
    for line in (3, 4, 5, 6):
        s.on_finished(line, True)
        drain(s)
    assert s.done and window.working() == pytest.approx(0, abs=1e-6)


WHOLE, SYSTEM = prefix_tokens(6), prefix_tokens(5)  # TREE's first branch: its whole prefix, its system prompt
BRANCHES = 2 * (WHOLE - SYSTEM)  # the other two branches' own parts


def warmed_tree(measured: int = 0) -> tuple[GroupScheduler, PrefixWindow]:
    """TREE with its first head warmed (its warm-up's answer measuring `measured` tokens, if any) and everything it
    opened handed out: its two questions and the other branches' heads."""
    s = GroupScheduler(np.arange(7), depths=TREE)
    s.warm_up_heads(0)
    window = s.windows[0]
    window.observe(capacity=100 * WHOLE, held=0.0)
    assert drain(s) == [0]
    s.on_warmed(0, True, prompt_tokens=measured, cached_tokens=0)
    assert drain(s) == [1, 2, 3, 5]
    return s, window


def test_a_warmed_head_still_running_keeps_its_whole_branch_counted():
    s, window = warmed_tree()
    s.on_finished(1, True)
    s.on_finished(2, True)
    assert window.working() == pytest.approx(WHOLE + BRANCHES)  # the head itself still computes on the whole prefix
    s.on_finished(0, True)
    assert window.working() == pytest.approx(SYSTEM + BRANCHES)


def test_a_branch_measured_larger_than_its_estimate_keeps_that_scale_when_it_shrinks():
    # The head's warm-up computed half as much again as the key blocks suggested: the system prompt the group keeps
    # once its branch is done is scaled alike, not taken back to the estimate.
    measured = round(1.5 * WHOLE)
    s, window = warmed_tree(measured)
    assert window.working() == pytest.approx(measured + BRANCHES)
    for line in (1, 2, 0):
        s.on_finished(line, True)
    assert window.working() == pytest.approx(SYSTEM * measured / WHOLE + BRANCHES)


def test_the_learnt_window_halves_on_a_miss_once_per_round_and_grows_on_full_hits():
    s = groups_plan(groups=30, size=3)
    window = s.windows[0]
    heads = drain(s)
    assert heads == [3 * g for g in range(INITIAL_GROUPS)]  # it starts with a few groups
    for head in heads:
        s.on_finished(head, True, prompt_tokens=780, cached_tokens=0)
    followers = drain(s)
    assert len(followers) == 2 * INITIAL_GROUPS
    for line in followers[:2]:  # group 0's followers: full hits; the window grows (slow start)
        s.on_finished(line, True, prompt_tokens=780, cached_tokens=752)
    assert window.groups == INITIAL_GROUPS + SLOW_START_GROWTH
    for line in followers[2:]:  # the others' prefixes were evicted: one cut, not one per follower
        s.on_finished(line, True, prompt_tokens=780, cached_tokens=0)
    assert window.cuts == 1 and window.groups == pytest.approx((INITIAL_GROUPS - 1) * DECREASE)
    # Only groups opened after the cut can cut again.
    fresh = drain(s)
    assert len(fresh) == int(window.groups)
    for head in fresh:
        s.on_finished(head, True, prompt_tokens=780, cached_tokens=0)
    assert {fresh[0] + 1, fresh[1] + 1} <= set(drain(s))  # their followers
    s.on_finished(fresh[0] + 1, True, prompt_tokens=780, cached_tokens=0)
    assert window.cuts == 2 and window.groups == pytest.approx(len(fresh) * DECREASE)
    # After the first miss, a group's full hit grows the window by 1/window: one group per round.
    before = window.groups
    s.on_finished(fresh[1] + 1, True, prompt_tokens=780, cached_tokens=752)
    assert window.groups == pytest.approx(before + 1 / before)


def test_a_reading_whose_hit_ratio_collapses_cuts_the_learnt_window_before_any_follower_answers():
    s = groups_plan(groups=30, size=3)
    window = s.windows[0]
    heads = drain(s)
    for head in heads:
        s.on_finished(head, True, prompt_tokens=780, cached_tokens=0)
    assert len(drain(s)) == 2 * INITIAL_GROUPS  # the followers are in flight; none has answered
    queried = 20 * COUNTED_QUERIES
    for ratio in (0.85, 0.8, 0.9):  # the usual ratio; readings differ with the mix of heads and followers
        window.observe_hits(queried, ratio * queried, alone=True)
    window.observe_hits(queried, 0.85 * (EVICTING + 0.05) * queried, alone=True)  # a dip within the noise
    assert window.cuts == 0
    window.observe_hits(COUNTED_QUERIES / 2, 0.0, alone=True)  # too few lookups to judge
    window.observe_hits(queried, 0.1 * queried, alone=False)  # others use the engine: their prompts dilute it
    assert window.cuts == 0 and window.evicting == 0
    window.observe_hits(queried, 0.1 * queried, alone=True)  # prefixes are being evicted
    assert window.cuts == 1 and window.groups == pytest.approx(INITIAL_GROUPS * DECREASE)
    window.observe_hits(queried, 0.2 * queried, alone=True)  # the same episode: no group opened since
    assert window.cuts == 1 and window.evicting == 2
    for line in range(1, 3 * INITIAL_GROUPS, 3):  # the followers' misses arrive later: same round, no second cut
        s.on_finished(line, True, prompt_tokens=780, cached_tokens=0)
    assert window.cuts == 1 and window.misses == INITIAL_GROUPS


def test_a_known_cache_size_ignores_the_hit_ratio():
    window = PrefixWindow()
    window.observe(capacity=10 * PREFIX, held=0.0)
    for ratio in (0.85, 0.0):
        window.observe_hits(20 * COUNTED_QUERIES, ratio * 20 * COUNTED_QUERIES, alone=True)
    assert window.evicting == 0 and window.cuts == 0


@pytest.mark.parametrize("prompt_tokens", [780, 0], ids=["no_cached_tokens", "no_usage"])
def test_an_engine_that_reports_no_cached_tokens_gives_no_signal_and_the_window_stops_counting(prompt_tokens):
    s = groups_plan(groups=40, size=3)
    window = s.windows[0]
    judged = 0
    while judged < SILENT_FOLLOWERS:
        lines = drain(s)
        assert lines
        for line in lines:
            s.on_finished(line, True, prompt_tokens=prompt_tokens, cached_tokens=0)
            judged += line % 3 != 0
    assert not window.learning
    assert len([line for line in drain(s) if line % 3 == 0]) > INITIAL_GROUPS  # every group may open now


def test_small_prefixes_are_never_held_back():
    s = GroupScheduler(np.arange(20), depths=np.array([0, 1] * 10, dtype=np.uint8))  # ~30-token prefixes
    s.windows[0].observe(capacity=100.0, held=90.0)
    assert drain(s) == list(range(0, 20, 2))


def test_an_engine_with_a_cache_per_slot_keeps_its_one_follower_rule_instead():
    s = groups_plan(groups=6, size=3)
    s.windows[0].observe(capacity=PREFIX, held=0.0)
    s.limit_pool_inflight(0, 1)  # llama.cpp, recognised by its /metrics
    assert drain(s) == [0, 3, 6, 9, 12, 15]
    s.on_finished(0, True)
    assert drain(s) == [1]


def test_each_endpoint_has_its_own_window():
    depths = np.array([0 if i % 3 == 0 else DEEP for i in range(12)], dtype=np.uint8)
    s = GroupScheduler(np.arange(12), depths=depths, endpoints=2)
    s.windows[0].observe(capacity=1.2 * PREFIX / MARGIN, held=0.0)  # one group at a time here
    s.windows[1].observe(capacity=10 * PREFIX, held=0.0)
    assert drain(s, 0) == [0]
    assert drain(s, 1) == [3, 6, 9]
    s.on_finished(3, True)
    assert drain(s, 0) == []  # endpoint 0's window is full: it does not join the group warm on endpoint 1
    assert drain(s, 1) == [4, 5]  # followers go where their prefix is cached


def test_a_follower_that_shares_less_of_the_prompt_than_its_siblings_is_no_miss():
    s = groups_plan(groups=2, size=4)
    window = s.windows[0]
    assert drain(s) == [0, 4]
    s.on_finished(0, True, prompt_tokens=900, cached_tokens=0)
    assert drain(s) == [1, 2, 3]
    s.on_finished(1, True, prompt_tokens=900, cached_tokens=880)  # the whole prompt but its last block
    s.on_finished(2, True, prompt_tokens=900, cached_tokens=500)  # shares less with the head: still no miss
    assert window.misses == 0 and window.cuts == 0
    s.on_finished(3, True, prompt_tokens=900, cached_tokens=96)  # most of its prefix was evicted
    assert window.misses == 1 and window.cuts == 1


@pytest.mark.parametrize("mode", ["cache_size", "learnt"])
@pytest.mark.parametrize("endpoints,seed", [(1, 1), (2, 2)])
def test_random_trees_under_a_tight_window_finish_exactly_once_and_leave_nothing_open(mode, endpoints, seed):
    rng = np.random.default_rng(seed)
    n = 1200
    groups = np.sort(rng.integers(0, 60, n))
    depths = np.zeros(n, dtype=np.uint8)
    depths[1:] = np.where(groups[1:] == groups[:-1], rng.integers(3, 7, n - 1), 0)  # subtrees at several depths
    s = GroupScheduler(np.arange(n), depths=depths, endpoints=endpoints)
    for window in s.windows:
        window.observe(capacity=2 * PREFIX if mode == "cache_size" else None, held=0.0)
    handed: list[int] = []
    inflight: list[tuple[int, int]] = []
    while not s.done or inflight:
        for endpoint in range(endpoints):
            while sum(1 for _, e in inflight if e == endpoint) < 16 and (line := s.next_ready(endpoint)) is not None:
                handed.append(line)
                inflight.append((line, endpoint))
        assert inflight, "nothing in flight and nothing handed out: the window deadlocked"
        line, _ = inflight.pop(int(rng.integers(len(inflight))))
        ok = rng.random() > 0.05
        s.on_finished(line, ok, prompt_tokens=800, cached_tokens=int(rng.choice([0, 400, 768])))
    assert sorted(handed) == list(range(n))
    for window in s.windows:
        assert window.snapshot()["open_groups"] == 0 and window.working() == pytest.approx(0, abs=1e-6)


def test_the_window_is_exported_as_metrics_per_endpoint():
    from prometheus_client import REGISTRY

    from batch_gateway.runner import metrics as runner_metrics

    window = PrefixWindow()
    window.observe(16_000, 4_000)
    runner_metrics.record_prefix_window("endpoint-7", window.snapshot())
    sample = lambda name: REGISTRY.get_sample_value(name, {"endpoint": "endpoint-7"})  # noqa: E731
    assert sample("batch_runner_prefix_cache_tokens") == 16_000
    assert sample("batch_runner_prefix_open_groups") == 0
    assert sample("batch_runner_prefix_working_tokens") is not None
