"""Prefix keys: what counts as the prefix, chained blocks, determinism, planning order and its cost at 1M lines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from batch_gateway.runner.prefix import (
    BLOCK_SIZES,
    MAX_BLOCKS,
    PrefixKeys,
    group_ids,
    plan_order,
    prefix_key,
    prefix_text,
    shared_depths,
)

CHAT = "/v1/chat/completions"
SYSTEM = "You are the support assistant of ACME. Answer politely, cite the handbook, never guess. " * 10


def chat(*messages: tuple[str, object], **extra: object) -> dict:
    return {"model": "m", "messages": [{"role": role, "content": content} for role, content in messages], **extra}


def shared(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def padded(keys: list[tuple[int, ...]]) -> np.ndarray:
    return np.array([k + (0,) * (MAX_BLOCKS - len(k)) for k in keys], dtype=np.uint64)


def test_longer_shared_prefixes_share_more_blocks():
    a = prefix_key(CHAT, chat(("system", SYSTEM), ("user", "Where is my order 1?")))
    b = prefix_key(CHAT, chat(("system", SYSTEM), ("user", "Where is my order 2?")))
    other = prefix_key(CHAT, chat(("system", "You are a pirate. " + SYSTEM), ("user", "Where is my order 1?")))
    # "<system>" + the prompt is 888 bytes: blocks of 64+128+256 bytes lie inside it, the next (up to 960) does not.
    assert shared(a, b) == 3
    assert shared(a, other) == 0
    assert all(k != 0 for k in a) and len(a) <= MAX_BLOCKS


def test_a_per_request_detail_at_the_end_of_the_system_prompt_keeps_the_shared_part():
    a = prefix_key(CHAT, chat(("system", SYSTEM + "Customer: Alice."), ("user", "Hi")))
    b = prefix_key(CHAT, chat(("system", SYSTEM + "Customer: Bob."), ("user", "Hi")))
    assert shared(a, b) == 3


def test_a_short_system_prompt_is_a_block_of_its_own():
    a = prefix_key(CHAT, chat(("system", "You are helpful."), ("user", "What is 2+2?")))
    b = prefix_key(CHAT, chat(("system", "You are helpful."), ("user", "Name a colour.")))
    c = prefix_key(CHAT, chat(("system", "You are terse."), ("user", "What is 2+2?")))
    assert shared(a, b) == 1 and shared(a, c) == 0
    # Without a system prompt the first block is simply the first 64 bytes.
    assert (
        shared(prefix_key(CHAT, chat(("user", "x" * 70 + "1"))), prefix_key(CHAT, chat(("user", "x" * 70 + "2")))) == 1
    )


def test_what_makes_up_the_chat_prefix():
    text = prefix_text(
        CHAT,
        chat(
            ("system", "S"),
            ("developer", "D"),
            ("user", "U"),
            ("assistant", "A"),
            tools=[{"type": "function", "function": {"name": "f"}}],
        ),
    )
    assert (
        text.index("<system>S")
        < text.index("<developer>D")
        < text.index('"function"')
        < text.index("<user>U")
        < text.index("<assistant>A")
    )
    # Content-part arrays: text parts read as text, so they match the plain-string form.
    parts = [{"type": "text", "text": "Describe"}, {"type": "text", "text": "this"}]
    assert prefix_key(CHAT, chat(("user", parts))) == prefix_key(CHAT, chat(("user", "Describe\nthis")))


def test_tools_are_canonical_json():
    tools_a = [{"type": "function", "function": {"name": "f", "parameters": {"a": 1, "b": 2}}}]
    tools_b = [{"function": {"parameters": {"b": 2, "a": 1}, "name": "f"}, "type": "function"}]
    assert prefix_key(CHAT, chat(("user", "x"), tools=tools_a)) == prefix_key(CHAT, chat(("user", "x"), tools=tools_b))


def test_images_count_by_a_hash_of_their_data():
    big = "data:image/png;base64," + "A" * 500_000

    def with_image(url: str) -> dict:
        return chat(
            ("user", [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}])
        )

    text = prefix_text(CHAT, with_image(big))
    assert len(text) < 100  # the image is a short hash, not half a megabyte of base64
    assert prefix_key(CHAT, with_image(big)) == prefix_key(CHAT, with_image(big))
    assert prefix_key(CHAT, with_image(big)) != prefix_key(CHAT, with_image(big[:-1] + "B"))


def test_other_endpoints():
    completions = "/v1/completions"
    assert prefix_text(completions, {"prompt": "Once upon a time"}) == "Once upon a time"
    assert prefix_text(completions, {"prompt": ["first", "second"]}).startswith("first")
    ids_a = prefix_key(completions, {"prompt": [*range(1000), 1]})
    ids_b = prefix_key(completions, {"prompt": [*range(1000), 2]})
    assert shared(ids_a, ids_b) >= 4  # token-id prompts share their leading ids
    responses = prefix_text(
        "/v1/responses", {"instructions": "Be brief.", "input": [{"role": "user", "content": "Hi"}]}
    )
    assert responses.index("Be brief.") < responses.index("<user>Hi")
    assert prefix_text("/v1/responses", {"input": "plain"}) == "plain"
    assert prefix_text("/v1/embeddings", {"input": ["a", "b"]}).startswith("a")
    assert len(prefix_key("/v1/embeddings", {"input": ""})) == 1  # an empty text still has a (shared) first block


def test_only_the_covered_text_matters():
    long_user = "word " * 10_000
    a = prefix_key(CHAT, chat(("user", long_user + "A")))
    b = prefix_key(CHAT, chat(("user", long_user + "B")))
    assert a == b and len(a) == MAX_BLOCKS
    assert len(prefix_text(CHAT, chat(("user", long_user)))) == sum(BLOCK_SIZES)


@pytest.mark.process
def test_keys_are_the_same_in_another_process():
    body = chat(("system", SYSTEM), ("user", "déjà vu ✓"))
    script = (
        "import json,sys; from batch_gateway.runner.prefix import prefix_key; "
        "print(json.dumps(prefix_key('/v1/chat/completions', json.loads(sys.argv[1]))))"
    )
    import json

    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(body)], env=env, capture_output=True, text=True, check=True
    )
    assert tuple(json.loads(out.stdout)) == prefix_key(CHAT, body)


def test_plan_order_sorts_groups_together_largest_group_first_and_is_stable():
    bodies = [
        chat(("system", "B" + SYSTEM), ("user", "b1")),
        chat(("user", "lonely")),
        chat(("system", "A" + SYSTEM), ("user", "a1")),
        chat(("system", "B" + SYSTEM), ("user", "b2")),
        chat(("system", "A" + SYSTEM), ("user", "a2")),
        chat(("system", "A" + SYSTEM), ("user", "a1")),  # same text as line 2: stays after it
        chat(("system", "B" + SYSTEM), ("user", "b1")),
        chat(("system", "A" + SYSTEM), ("user", "a3")),
    ]
    keys = padded([prefix_key(CHAT, b) for b in bodies])
    order = plan_order(keys).tolist()
    # Group A (4 requests) before group B (3) before the singleton; identical requests keep input order.
    assert set(order[:4]) == {2, 4, 5, 7} and set(order[4:7]) == {0, 3, 6} and order[7] == 1
    assert order.index(2) < order.index(5) and order.index(0) < order.index(6)
    assert plan_order(keys).tolist() == order
    assert group_ids(keys, np.array(order)).tolist() == [0, 0, 0, 0, 1, 1, 1, 2]
    depths = shared_depths(keys, np.array(order)).tolist()
    assert depths[0] == 0 and depths[4] == 0 and depths[7] == 0
    assert all(d >= 3 for i, d in enumerate(depths) if i not in (0, 4, 7))
    assert np.array_equal(shared_depths(keys[order]), shared_depths(keys, np.array(order)))


def test_shared_depths_stop_at_padding():
    keys = np.array([[5, 7, 0, 0], [5, 7, 0, 0], [5, 8, 0, 0], [6, 0, 0, 0]], dtype=np.uint64)
    assert shared_depths(keys).tolist() == [0, 2, 1, 0]
    compact = PrefixKeys.from_padded(keys)
    assert compact.counts.tolist() == [2, 2, 2, 1] and compact.depth == 2
    assert shared_depths(compact).tolist() == [0, 2, 1, 0]
    assert np.array_equal(compact.column(1), keys[:, 1]) and not compact.column(5).any()
    assert plan_order(np.zeros((0, MAX_BLOCKS), dtype=np.uint64)).tolist() == []
    with pytest.raises(ValueError):
        plan_order(np.zeros(5, dtype=np.uint64))


def test_prefix_key_is_cheap_per_line():
    bodies = [
        chat(("system", f"Assistant {i % 50}. " + "Follow the rules. " * 40), ("user", f"question {i} " + "x" * 300))
        for i in range(5000)
    ]
    started = time.perf_counter()
    for body in bodies:
        prefix_key(CHAT, body)
    per_line = (time.perf_counter() - started) / len(bodies)
    assert per_line < 100e-6, f"{per_line * 1e6:.1f} µs per line"  # ~12 µs on a slow 2-core CI box


@pytest.mark.slow
def test_planning_a_million_lines_is_fast_and_small():
    n = 1_000_000
    rng = np.random.default_rng(0)
    group = rng.integers(0, 20_000, n).astype(np.uint64)
    keys = np.zeros((n, MAX_BLOCKS), dtype=np.uint64)
    keys[:, 0] = group * np.uint64(2654435761) | np.uint64(1)
    keys[:, 1] = group % np.uint64(7) + np.uint64(3)
    keys[:, 2] = rng.integers(1, 1 << 62, n).astype(np.uint64)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        order = plan_order(keys)
        depths = shared_depths(keys, order)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sorted(order[:5].tolist()) == sorted(set(order[:5].tolist()))
    assert np.array_equal(np.sort(order), np.arange(n))
    assert (depths == 0).sum() == len(np.unique(group))  # one top-level group per first block
    assert elapsed < 20, elapsed
    assert peak < 150e6, f"peak {peak / 1e6:.0f} MB besides the 64 MB of keys"


def _reference_plan_order(keys: np.ndarray) -> np.ndarray:
    """The plan as first written: np.lexsort over all padded columns, then groups by size (largest first)."""
    n = len(keys)
    order = np.lexsort(tuple(keys[:, i] for i in range(keys.shape[1] - 1, -1, -1)))
    first = keys[order, 0]
    starts = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group_rank = np.argsort(-sizes, kind="stable")
    position_of_group = np.empty(len(starts), dtype=np.int64)
    position_of_group[group_rank] = np.r_[0, np.cumsum(sizes[group_rank])[:-1]]
    group = np.repeat(np.arange(len(starts)), sizes)
    planned = np.empty(n, dtype=np.int64)
    planned[position_of_group[group] + (np.arange(n) - starts[group])] = order
    return planned


def _reference_depths(sorted_keys: np.ndarray) -> np.ndarray:
    same = (sorted_keys[1:] == sorted_keys[:-1]) & (sorted_keys[1:] != 0)
    return np.r_[0, np.logical_and.accumulate(same, axis=1).sum(axis=1)].astype(np.uint8)


@pytest.mark.parametrize("seed", range(5))
def test_column_at_a_time_planning_matches_lexsort(seed):
    """The lean planner gives exactly the order and depths of a full lexsort, on random prefix trees with ties,
    groups of equal and different sizes, short and long keys, and requests without a key."""
    rng = np.random.default_rng(seed)
    n = 3000
    keys = np.zeros((n, MAX_BLOCKS), dtype=np.uint64)
    keys[:, 0] = rng.integers(1, 40, n)
    lengths = rng.integers(0, MAX_BLOCKS + 1, n)
    for d in range(1, MAX_BLOCKS):
        # Chained like real keys: few distinct values near the root, so subtrees share deep prefixes.
        keys[:, d] = keys[:, d - 1] * np.uint64(31) + rng.integers(0, 3 + d, n).astype(np.uint64) + np.uint64(1)
    keys[np.arange(MAX_BLOCKS) >= lengths[:, None]] = 0
    order = plan_order(keys)
    assert np.array_equal(order, _reference_plan_order(keys))
    assert np.array_equal(plan_order(PrefixKeys.from_padded(keys)), order)
    assert np.array_equal(shared_depths(keys, order), _reference_depths(keys[order]))
    keep = rng.random(n) < 0.7
    assert np.array_equal(shared_depths(keys, order[keep]), _reference_depths(keys[order[keep]]))
    singletons = np.zeros((50, MAX_BLOCKS), dtype=np.uint64)
    singletons[:, 0] = rng.permutation(50) + 1
    assert np.array_equal(plan_order(singletons), _reference_plan_order(singletons))
