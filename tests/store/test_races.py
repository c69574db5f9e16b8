"""Races on real concurrency: several stores (own connections; SQLite: own threads) on one database, all calls
started together. Each scenario is repeated so that both orders of the race get exercised."""

from __future__ import annotations

import asyncio
import collections

from batch_gateway import wire
from batch_gateway.store.metadata import MetadataStore
from tests.store.conftest import OpenStore
from tests.store.test_metadata_store import batch_record

STORES = 4
ROUNDS = 12
CANCELLABLE = ["validating", "in_progress", "finalizing"]
LEGAL_ENDS = {"completed", "cancelling"}


async def stores(open_store: OpenStore) -> list[MetadataStore]:
    return [await open_store() for _ in range(STORES)]


async def test_many_cancels_against_one_completion_exactly_one_wins(open_store: OpenStore):
    contenders = await stores(open_store)
    winners = collections.Counter()
    for round_ in range(ROUNDS):
        batch, _ = await contenders[0].insert_batch(
            batch_record(status="finalizing", in_progress_at=1, finalizing_at=2)
        )
        counts = wire.RequestCounts(total=5, completed=5)
        cancels = [contenders[i % STORES].transition(batch.id, CANCELLABLE, "cancelling", 100 + i) for i in range(8)]
        # The completion starts in the middle of the cancels, alternating sides between rounds.
        position = 4 if round_ % 2 else 0
        completing = contenders[round_ % STORES].transition(
            batch.id, ["finalizing"], "completed", 50, request_counts=counts, output_file_id="file-out"
        )
        calls = [*cancels[:position], completing, *cancels[position:]]
        results = await asyncio.gather(*calls)
        completion = results[position]
        cancel_results = results[:position] + results[position + 1 :]

        succeeded = [r for r in results if r is not None]
        assert len(succeeded) == 1, f"round {round_}: {len(succeeded)} transitions succeeded"
        final = await contenders[0].get_batch(batch.id, None)
        assert final.status in LEGAL_ENDS
        if completion is not None:
            winners["completion"] += 1
            assert all(r is None for r in cancel_results)
            assert (final.status, final.completed_at, final.cancelling_at) == ("completed", 50, None)
            assert final.request_counts == counts and final.output_file_id == "file-out"
        else:
            winners["cancel"] += 1
            assert final.status == "cancelling" and final.completed_at is None
            assert final.cancelling_at == succeeded[0].cancelling_at
            assert final.output_file_id is None
            # The runner's fallback: the cancel wins, with the same files.
            ended = await contenders[1].transition(batch.id, ["cancelling"], "cancelled", 60, output_file_id="file-out")
            assert ended.status == "cancelled" and ended.cancelling_at == final.cancelling_at
    assert sum(winners.values()) == ROUNDS


async def test_concurrent_claims_from_different_owners_exactly_one_wins(open_store: OpenStore):
    contenders = await stores(open_store)
    for round_ in range(ROUNDS):
        batch, _ = await contenders[0].insert_batch(batch_record(status="in_progress"))
        owners = [f"runner-{round_}-{i}" for i in range(STORES * 2)]
        taken = await asyncio.gather(
            *(contenders[i % STORES].claim_batch(batch.id, owner, 1_000, 30) for i, owner in enumerate(owners))
        )
        assert sum(taken) == 1, f"round {round_}: {sum(taken)} runners claimed the batch"
        winner = owners[taken.index(True)]
        # Only the winner can renew.
        renewed = await asyncio.gather(*(contenders[0].renew_lease(batch.id, o, 1_001, 30) for o in owners))
        assert [o for o, ok in zip(owners, renewed, strict=True) if ok] == [winner]


async def test_concurrent_inserts_with_one_idempotency_key_make_one_batch(open_store: OpenStore):
    contenders = await stores(open_store)
    for round_ in range(ROUNDS // 2):
        key = f"create-{round_}"
        records = [batch_record(idempotency_key=key) for _ in range(STORES * 2)]
        results = await asyncio.gather(*(contenders[i % STORES].insert_batch(r) for i, r in enumerate(records)))
        created = [stored for stored, was_created in results if was_created]
        assert len(created) == 1
        assert {stored.id for stored, _ in results} == {created[0].id}
    page, _ = await contenders[0].list_batches("acme", after=None, limit=100)
    assert len(page) == ROUNDS // 2


async def test_concurrent_progress_and_terminal_transition_never_regress(open_store: OpenStore):
    """A late progress write racing the final transition must not overwrite the final counts."""
    contenders = await stores(open_store)
    final = wire.RequestCounts(total=100, completed=90, failed=10)
    for _ in range(ROUNDS // 2):
        batch, _ = await contenders[0].insert_batch(batch_record(status="finalizing"))
        progress = [
            contenders[i % STORES].save_progress(batch.id, wire.RequestCounts(total=100, completed=i), None)
            for i in range(1, 9)
        ]
        done = contenders[0].transition(batch.id, ["finalizing"], "completed", 5, request_counts=final)
        await asyncio.gather(*progress[:4], done, *progress[4:])
        stored = await contenders[1].get_batch(batch.id, None)
        assert stored.status == "completed" and stored.request_counts == final


async def test_concurrent_retries_claim_a_fold_exactly_once(open_store: OpenStore):
    contenders = await stores(open_store)
    for round_ in range(ROUNDS):
        fingerprint = f"fp-{round_}"
        if round_ % 2:  # a stale claim from an earlier request is there: the retries take it over, once
            await contenders[0].claim_fold("acme", fingerprint, "batch_stale", 10, older_than=None)
        mine = [f"batch_{round_}_{i}" for i in range(20)]
        holders = await asyncio.gather(
            *(contenders[i % STORES].claim_fold("acme", fingerprint, mine[i], 1000, older_than=400) for i in range(20))
        )
        winners = [batch_id for batch_id, holder in zip(mine, holders, strict=True) if holder == batch_id]
        assert len(winners) == 1, f"round {round_}: {len(winners)} retries claimed the fold"
        assert set(holders) == set(winners)  # every other retry folds into the winner


async def test_concurrent_webhook_claims_never_hand_out_an_event_twice(open_store: OpenStore):
    contenders = await stores(open_store)
    batches = [(await contenders[0].insert_batch(batch_record()))[0] for _ in range(40)]
    for batch in batches:
        await contenders[0].transition(batch.id, ["validating"], "completed", 10)
    claimed: list[str] = []
    for round_ in range(ROUNDS):
        now = 100 + round_ * 1000  # every round after the previous leases have run out
        results = await asyncio.gather(
            *(contenders[i % STORES].claim_webhook_events(now=now, lease_seconds=30, limit=3) for i in range(8))
        )
        this_round = [event.id for events in results for event in events]
        assert len(this_round) == len(set(this_round)) == 24
        claimed += this_round
    assert len(set(claimed)) == 40
