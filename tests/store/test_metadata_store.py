"""One behaviour suite for every MetadataStore backend (SQLite and PostgreSQL, see conftest.py)."""

from __future__ import annotations

import itertools

import msgspec
import pytest

from batch_gateway import ids, wire
from batch_gateway.store.metadata import (
    ApiKeyRecord,
    BatchForecast,
    BatchRecord,
    FileRecord,
    MetadataStore,
    RunnerLoad,
    TenantPolicy,
    WebhookState,
)

_clock = itertools.count(1_000)


def file_record(tenant: str = "acme", purpose: str = "batch", **fields) -> FileRecord:
    values = dict(
        id=ids.new_file_id(),
        tenant=tenant,
        bytes=123,
        created_at=next(_clock),
        filename="in.jsonl",
        purpose=purpose,
        object_key=f"{tenant}/files/x",
    )
    return FileRecord(**(values | fields))


def batch_record(tenant: str = "acme", status: str = "validating", **fields) -> BatchRecord:
    created = next(_clock)
    values = dict(
        id=ids.new_batch_id(),
        tenant=tenant,
        endpoint="/v1/chat/completions",
        input_file_id="file-in",
        completion_window="24h",
        status=status,
        created_at=created,
        expires_at=created + 86400,
    )
    return BatchRecord(**(values | fields))


async def insert_batches(store: MetadataStore, n: int, **fields) -> list[BatchRecord]:
    out = []
    for _ in range(n):
        record, created = await store.insert_batch(batch_record(**fields))
        assert created
        out.append(record)
    return out


# --- files ---------------------------------------------------------------------------------------


async def test_file_round_trip_and_tenant_scoping(store: MetadataStore):
    record = file_record(expires_at=5_000, bytes=2**40)
    await store.insert_file(record)

    assert await store.get_file(record.id, "acme") == record
    assert await store.get_file(record.id, "other") is None
    assert await store.get_file(record.id, None) == record  # the service's own view
    assert await store.get_file("file-missing", "acme") is None


async def test_inserting_a_file_again_is_a_no_op(store: MetadataStore):
    record = file_record()
    await store.insert_file(record)
    await store.insert_file(msgspec.structs.replace(record, filename="changed.jsonl", bytes=1))
    assert await store.get_file(record.id, None) == record


async def test_delete_file_only_in_own_tenant(store: MetadataStore):
    record = file_record()
    await store.insert_file(record)
    assert not await store.delete_file(record.id, "other")
    assert await store.get_file(record.id, "acme") == record
    assert await store.delete_file(record.id, "acme")
    assert not await store.delete_file(record.id, "acme")
    assert await store.get_file(record.id, None) is None

    service_deleted = file_record()
    await store.insert_file(service_deleted)
    assert await store.delete_file(service_deleted.id, None)


async def test_list_files_pages_both_orders_with_purpose_filter_and_tenant_isolation(store: MetadataStore):
    mine = []
    for i in range(7):
        record = file_record(purpose="batch_output" if i % 3 == 2 else "batch")
        await store.insert_file(record)
        mine.append(record)
        await store.insert_file(file_record(tenant="other"))  # interleaved: must never show up

    async def walk(order: str, purpose: str | None, limit: int) -> list[FileRecord]:
        seen, after = [], None
        while True:
            page, has_more = await store.list_files("acme", purpose=purpose, order=order, after=after, limit=limit)
            assert len(page) <= limit
            seen += page
            if not has_more:
                return seen
            assert len(page) == limit
            after = page[-1].id

    assert await walk("desc", None, 3) == mine[::-1]
    assert await walk("asc", None, 3) == mine
    assert await walk("asc", None, 7) == mine
    assert await walk("desc", "batch", 2) == [r for r in mine[::-1] if r.purpose == "batch"]
    assert await walk("asc", "batch_output", 1) == [r for r in mine if r.purpose == "batch_output"]

    page, has_more = await store.list_files("acme", purpose=None, order="desc", after=None, limit=7)
    assert (len(page), has_more) == (7, False)
    page, has_more = await store.list_files("acme", purpose=None, order="desc", after=None, limit=6)
    assert (len(page), has_more) == (6, True)
    assert await store.list_files("nobody", purpose=None, order="desc", after=None, limit=10) == ([], False)


async def test_list_files_after_an_unknown_or_foreign_id_is_an_empty_page(store: MetadataStore):
    await store.insert_file(file_record())
    foreign = file_record(tenant="other")
    await store.insert_file(foreign)
    for after in ("file-unknown", foreign.id):
        for order in ("asc", "desc"):
            assert await store.list_files("acme", purpose=None, order=order, after=after, limit=10) == ([], False)


async def test_list_files_after_a_deleted_file_goes_on_from_its_place_until_gc_forgets_it(store: MetadataStore):
    """What `for f in client.files.list(): client.files.delete(f.id)` does: the SDK asks for the page after the last
    file of the one before, which it has deleted meanwhile."""
    records = [file_record() for _ in range(5)]
    for record in records:
        await store.insert_file(record)
    foreign = file_record(tenant="other")
    await store.insert_file(foreign)
    first, _ = await store.list_files("acme", purpose=None, order="asc", after=None, limit=2)
    for record in first:
        assert await store.hide_file(record.id, "acme", 1_000) == record
        assert await store.delete_file(record.id, "acme")
    await store.hide_file(foreign.id, None, 1_000)
    await store.delete_file(foreign.id, None)

    def page(order: str, after: str):
        return store.list_files("acme", purpose=None, order=order, after=after, limit=2)

    assert await page("asc", first[-1].id) == (records[2:4], True)
    assert await page("desc", first[-1].id) == ([], False)  # before it comes only the first, deleted too
    assert await page("desc", first[0].id) == ([], False)
    assert await page("asc", foreign.id) == ([], False)  # another tenant's place is not this one's

    assert await store.forget_file_cursors(1_000) == 0  # deleted at 1,000: not before it
    assert await store.forget_file_cursors(1_001) == 3
    assert await page("asc", first[-1].id) == ([], False)


async def test_list_files_rejects_a_bad_order_or_limit(store: MetadataStore):
    with pytest.raises(ValueError, match="order"):
        await store.list_files("acme", purpose=None, order="newest", after=None, limit=10)
    with pytest.raises(ValueError, match="limit"):
        await store.list_files("acme", purpose=None, order="asc", after=None, limit=0)


async def test_a_hidden_file_is_gone_for_every_read_until_deleted(store: MetadataStore):
    record = file_record(expires_at=100)
    kept = file_record()
    for r in (record, kept):
        await store.insert_file(r)
    assert await store.hide_file(record.id, "other", 50) is None  # another tenant's: untouched
    assert await store.hide_file(record.id, "acme", 50) == record
    assert await store.hide_file(record.id, "acme", 51) is None  # hidden already: a second delete is a 404
    assert await store.hide_file(record.id, None, 51) is None
    for tenant in ("acme", None):
        assert await store.get_file(record.id, tenant) is None
    assert (await store.list_files("acme", purpose=None, order="asc", after=None, limit=10))[0] == [kept]
    assert await store.expired_files(1_000, 10) == []  # gc's sweep of hidden files deletes it, not expiry
    assert await store.deletable_hidden_files(10) == [record]
    assert await store.delete_file(record.id, None)
    assert await store.deletable_hidden_files(10) == []
    assert await store.hide_file(kept.id, None, 60) == kept  # gc hides expired files this way


async def test_a_hidden_input_file_stays_until_no_unfinished_batch_reads_it(store: MetadataStore):
    record = file_record()
    await store.insert_file(record)
    unrelated = file_record()
    await store.insert_file(unrelated)
    other_tenant = file_record(tenant="other")
    await store.insert_file(other_tenant)
    running = batch_record(input_file_id=record.id, status="in_progress")
    finished = batch_record(input_file_id=record.id, status="completed")
    foreign = batch_record(tenant="acme", input_file_id=other_tenant.id, status="in_progress")
    for batch in (running, finished, foreign):
        await store.insert_batch(batch)
    assert await store.file_in_use(record.id)
    assert not await store.file_in_use(unrelated.id)
    for r in (record, unrelated, other_tenant):
        assert await store.hide_file(r.id, None, 10) == r
    # Another tenant's batch naming the file id (the API never allows it) does not keep it.
    assert await store.deletable_hidden_files(10) == [unrelated, other_tenant]
    for status in ("finalizing", "cancelling"):
        await store.transition(running.id, ["in_progress", "finalizing"], status, 20)
        assert await store.file_in_use(record.id) and record not in await store.deletable_hidden_files(10)
    await store.transition(running.id, ["cancelling"], "cancelled", 30)
    assert not await store.file_in_use(record.id)
    assert await store.deletable_hidden_files(10) == [record, unrelated, other_tenant]
    assert await store.deletable_hidden_files(1) == [record]


async def test_expired_files_oldest_expiry_first_across_tenants(store: MetadataStore):
    late = file_record(expires_at=300)
    early = file_record(tenant="other", expires_at=100)
    future = file_record(expires_at=10_000)
    forever = file_record(expires_at=None)
    for record in (late, early, future, forever):
        await store.insert_file(record)
    assert await store.expired_files(300, 10) == [early, late]
    assert await store.expired_files(300, 1) == [early]
    assert await store.expired_files(99, 10) == []


# --- batches -------------------------------------------------------------------------------------


async def test_batch_round_trip_with_json_columns(store: MetadataStore):
    record = batch_record(
        metadata={"project": "q3", "ünïcode": "✓"},
        output_expires_after=7200,
        model="m",
        errors=[wire.BatchError("invalid_json_line", "This line is not parseable as valid JSON.", None, 3)],
        request_counts=wire.RequestCounts(total=10, completed=4, failed=1),
        usage=wire.Usage(input_tokens=5, output_tokens=7, total_tokens=12),
        fingerprint="fp",
        idempotency_key="key-1",
    )
    stored, created = await store.insert_batch(record)
    assert created and stored == record
    assert await store.get_batch(record.id, "acme") == record
    assert await store.get_batch(record.id, None) == record
    assert await store.get_batch(record.id, "other") is None
    assert await store.get_batch("batch_missing", None) is None


async def test_list_batches_newest_first_across_pages(store: MetadataStore):
    mine = await insert_batches(store, 5)
    await insert_batches(store, 3, tenant="other")
    newest_first = [b.id for b in mine[::-1]]

    page, has_more = await store.list_batches("acme", after=None, limit=2)
    assert ([b.id for b in page], has_more) == (newest_first[:2], True)
    page, has_more = await store.list_batches("acme", after=page[-1].id, limit=2)
    assert ([b.id for b in page], has_more) == (newest_first[2:4], True)
    page, has_more = await store.list_batches("acme", after=page[-1].id, limit=2)
    assert ([b.id for b in page], has_more) == (newest_first[4:], False)
    page, has_more = await store.list_batches("acme", after=None, limit=5)
    assert (len(page), has_more) == (5, False)

    other = (await store.list_batches("other", after=None, limit=10))[0]
    assert len(other) == 3
    assert await store.list_batches("acme", after=other[0].id, limit=10) == ([], False)  # foreign cursor
    assert await store.list_batches("acme", after="batch_unknown", limit=10) == ([], False)


async def test_idempotency_key_returns_the_existing_batch_per_tenant(store: MetadataStore):
    first, created = await store.insert_batch(batch_record(idempotency_key="k"))
    assert created
    again, created = await store.insert_batch(batch_record(idempotency_key="k", metadata={"x": "y"}))
    assert not created and again == first
    elsewhere, created = await store.insert_batch(batch_record(tenant="other", idempotency_key="k"))
    assert created and elsewhere.id != first.id
    # Without a key, nothing is folded.
    a, created_a = await store.insert_batch(batch_record())
    b, created_b = await store.insert_batch(batch_record())
    assert created_a and created_b and a.id != b.id
    assert len((await store.list_batches("acme", after=None, limit=10))[0]) == 3


async def test_claim_fold_first_tries_always_claim_retries_only_stale_claims(store: MetadataStore):
    assert await store.claim_fold("acme", "fp", "batch_a", 100, older_than=None) == "batch_a"
    # A retry within the window folds into the recorded batch; one after it (older_than past 100) takes over.
    assert await store.claim_fold("acme", "fp", "batch_b", 150, older_than=100) == "batch_a"
    assert await store.claim_fold("acme", "fp", "batch_c", 700, older_than=101) == "batch_c"
    # A first try is the user asking for another batch: it always claims.
    assert await store.claim_fold("acme", "fp", "batch_d", 710, older_than=None) == "batch_d"
    assert await store.claim_fold("acme", "fp", "batch_e", 720, older_than=110) == "batch_d"
    # Scoped by tenant and fingerprint.
    assert await store.claim_fold("other", "fp", "batch_f", 720, older_than=110) == "batch_f"
    assert await store.claim_fold("acme", "fp2", "batch_g", 720, older_than=110) == "batch_g"


async def test_release_fold_only_forgets_the_named_batch(store: MetadataStore):
    assert await store.claim_fold("acme", "fp", "batch_a", 100, older_than=None) == "batch_a"
    await store.release_fold("acme", "fp", "batch_other")
    assert await store.claim_fold("acme", "fp", "batch_b", 101, older_than=50) == "batch_a"
    await store.release_fold("acme", "fp", "batch_a")
    assert await store.claim_fold("acme", "fp", "batch_b", 102, older_than=50) == "batch_b"


async def test_transition_is_compare_and_set(store: MetadataStore):
    (batch,) = await insert_batches(store, 1)

    assert await store.transition(batch.id, ["in_progress"], "finalizing", 10) is None  # wrong source
    assert await store.transition("batch_missing", ["validating"], "in_progress", 10) is None
    assert await store.get_batch(batch.id, None) == batch

    counts = wire.RequestCounts(total=3)
    moved = await store.transition(batch.id, ["validating"], "in_progress", 10, model="m", request_counts=counts)
    assert moved is not None
    assert (moved.status, moved.in_progress_at, moved.model, moved.request_counts) == ("in_progress", 10, "m", counts)
    assert await store.get_batch(batch.id, None) == moved

    cancelling = await store.transition(batch.id, ["validating", "in_progress", "finalizing"], "cancelling", 20)
    assert (cancelling.status, cancelling.cancelling_at, cancelling.in_progress_at) == ("cancelling", 20, 10)
    # Re-entering a status keeps its first timestamp.
    again = await store.transition(batch.id, ["cancelling"], "cancelling", 30)
    assert again.cancelling_at == 20

    usage = wire.Usage(input_tokens=1, output_tokens=2, total_tokens=3)
    done = await store.transition(
        batch.id,
        ["cancelling"],
        "cancelled",
        40,
        output_file_id="file-out",
        error_file_id=None,
        usage=usage,
        request_counts=wire.RequestCounts(total=3, completed=2, failed=1),
    )
    assert (done.status, done.cancelled_at, done.output_file_id, done.error_file_id) == (
        "cancelled",
        40,
        "file-out",
        None,
    )
    assert done.usage == usage and done.request_counts.completed == 2
    assert done.terminal


async def test_statuses_read_back_as_batch_status_and_are_stored_as_openai_names(store: MetadataStore):
    (batch,) = await insert_batches(store, 1, status=wire.BatchStatus.VALIDATING)
    moved = await store.transition(batch.id, [wire.BatchStatus.VALIDATING], wire.BatchStatus.IN_PROGRESS, 10)
    listed = await store.batches_with_status([wire.BatchStatus.IN_PROGRESS])
    for record in (moved, await store.get_batch(batch.id, None), *listed):
        assert type(record.status) is wire.BatchStatus and record.status == "in_progress"
    assert list((await store.storage_stats()).batches_by_status) == ["in_progress"]  # the column holds the value


async def test_transition_to_failed_with_errors(store: MetadataStore):
    (batch,) = await insert_batches(store, 1)
    errors = [wire.BatchError("invalid_url", "bad url", "url", 2), wire.BatchError("invalid_json_line", "bad", None, 5)]
    failed = await store.transition(batch.id, ["validating"], "failed", 7, errors=errors)
    assert (failed.status, failed.failed_at, failed.errors) == ("failed", 7, errors)
    assert failed.to_wire().errors.data == errors


async def test_transition_refuses_fields_and_statuses_it_does_not_know(store: MetadataStore):
    (batch,) = await insert_batches(store, 1)
    with pytest.raises(ValueError, match="tenant"):
        await store.transition(batch.id, ["validating"], "in_progress", 1, tenant="evil")
    with pytest.raises(ValueError, match="status"):
        await store.transition(batch.id, ["validating"], "in_progress", 1, status="completed")
    with pytest.raises(ValueError, match="unknown batch status"):
        await store.transition(batch.id, ["validating"], "done; DROP TABLE batches", 1)
    with pytest.raises(ValueError, match="unknown batch status"):
        await store.transition(batch.id, ["validatin"], "in_progress", 1)
    assert await store.get_batch(batch.id, None) == batch
    assert await store.transition(batch.id, [], "in_progress", 1) is None


async def test_save_progress_only_while_running_and_never_backwards(store: MetadataStore):
    (batch,) = await insert_batches(store, 1)
    await store.save_progress(batch.id, wire.RequestCounts(total=9, completed=1), None)
    assert (await store.get_batch(batch.id, None)).request_counts == wire.RequestCounts()  # still validating

    await store.transition(batch.id, ["validating"], "in_progress", 1, request_counts=wire.RequestCounts(total=9))
    usage = wire.Usage(input_tokens=10, total_tokens=10)
    await store.save_progress(batch.id, wire.RequestCounts(total=9, completed=3, failed=1), usage)
    current = await store.get_batch(batch.id, None)
    assert current.request_counts == wire.RequestCounts(total=9, completed=3, failed=1) and current.usage == usage

    await store.save_progress(batch.id, wire.RequestCounts(total=9, completed=2, failed=1), None)  # stale
    assert (await store.get_batch(batch.id, None)).request_counts.completed == 3
    await store.save_progress(batch.id, wire.RequestCounts(total=9, completed=4, failed=0), usage)  # a retry succeeded
    assert (await store.get_batch(batch.id, None)).request_counts == wire.RequestCounts(total=9, completed=4, failed=0)

    final = wire.RequestCounts(total=9, completed=8, failed=1)
    await store.transition(batch.id, ["in_progress"], "finalizing", 2)
    await store.transition(batch.id, ["finalizing"], "completed", 3, request_counts=final)
    await store.save_progress(batch.id, wire.RequestCounts(total=9, completed=9), None)
    assert (await store.get_batch(batch.id, None)).request_counts == final


async def test_batches_with_status_and_overdue(store: MetadataStore):
    running = batch_record(status="in_progress", expires_at=100)
    cancelling = batch_record(tenant="other", status="cancelling", expires_at=50)
    done = batch_record(status="completed", expires_at=10)
    waiting = batch_record(status="validating", expires_at=1_000)
    for record in (running, cancelling, done, waiting):
        await store.insert_batch(record)

    assert {b.id for b in await store.batches_with_status(wire.ACTIVE_STATUSES)} == {
        running.id,
        cancelling.id,
        waiting.id,
    }
    assert [b.id for b in await store.batches_with_status(["completed"])] == [done.id]
    assert await store.batches_with_status([]) == []
    assert len(await store.batches_with_status(wire.ACTIVE_STATUSES, limit=2)) == 2
    assert [b.id for b in await store.overdue_batches(100)] == [cancelling.id, running.id]
    assert [b.id for b in await store.overdue_batches(100, limit=1)] == [cancelling.id]
    assert await store.overdue_batches(49) == []


async def test_storage_stats_count_all_tenants(store: MetadataStore):
    await store.insert_batch(batch_record(status="in_progress"))
    await store.insert_batch(batch_record(tenant="other", status="in_progress"))
    await store.insert_batch(batch_record(status="completed"))
    await store.insert_file(file_record(bytes=10))
    await store.insert_file(file_record(tenant="other", bytes=5))
    await store.insert_file(file_record(purpose="batch_output", bytes=7))
    stats = await store.storage_stats()
    assert stats.batches_by_status == {"in_progress": 2, "completed": 1}
    assert stats.files_by_purpose == {"batch": (2, 15), "batch_output": (1, 7)}


async def test_storage_stats_count_active_batches_overdue_and_near_their_deadline(store: MetadataStore):
    """The alerts' view of deadlines: windows of 1000 s, `now` 10_000. Terminal batches never count."""
    window = dict(created_at=9_000, expires_at=10_000)
    await store.insert_batch(batch_record(status="in_progress", created_at=8_000, expires_at=9_000))  # overdue
    await store.insert_batch(batch_record(status="cancelling", created_at=9_000, expires_at=10_000))  # overdue: at it
    await store.insert_batch(batch_record(status="in_progress", created_at=9_150, expires_at=10_150))  # 150 s left
    await store.insert_batch(batch_record(tenant="other", status="validating", created_at=9_190, expires_at=10_190))
    await store.insert_batch(batch_record(status="in_progress", created_at=9_300, expires_at=10_300))  # 300 s: fine
    await store.insert_batch(batch_record(status="expired", **window))
    await store.insert_batch(batch_record(status="completed", created_at=9_100, expires_at=10_100))
    stats = await store.storage_stats(now=10_000)
    assert (stats.overdue_batches, stats.near_deadline_batches) == (2, 2)
    stats = await store.storage_stats(now=8_000)
    assert (stats.overdue_batches, stats.near_deadline_batches) == (0, 0)


# --- leases --------------------------------------------------------------------------------------


async def test_lease_claim_renew_release(store: MetadataStore):
    (batch,) = await insert_batches(store, 1)
    assert await store.claim_batch(batch.id, "runner-a", now=100, lease_seconds=30)
    assert not await store.claim_batch(batch.id, "runner-b", now=110, lease_seconds=30)
    assert await store.claim_batch(batch.id, "runner-a", now=110, lease_seconds=30)  # already mine
    assert await store.renew_lease(batch.id, "runner-a", now=120, lease_seconds=30)  # until 150
    assert not await store.renew_lease(batch.id, "runner-b", now=120, lease_seconds=30)
    assert not await store.claim_batch(batch.id, "runner-b", now=150, lease_seconds=30)

    # runner-a stops renewing; once its lease has run out, runner-b takes over and runner-a cannot renew.
    assert await store.claim_batch(batch.id, "runner-b", now=151, lease_seconds=30)
    assert not await store.renew_lease(batch.id, "runner-a", now=152, lease_seconds=30)
    await store.release_batch(batch.id, "runner-a")  # not mine: no effect
    assert not await store.claim_batch(batch.id, "runner-c", now=153, lease_seconds=30)
    await store.release_batch(batch.id, "runner-b")
    assert await store.claim_batch(batch.id, "runner-c", now=153, lease_seconds=30)
    assert not await store.claim_batch("batch_missing", "runner-c", now=153, lease_seconds=30)
    # The lease is bookkeeping, not part of the record.
    assert await store.get_batch(batch.id, None) == batch


# --- webhook outbox ------------------------------------------------------------------------------


async def test_leased_batches_are_those_a_live_runner_holds(store: MetadataStore):
    held, expired, finished = await insert_batches(store, 3)
    assert await store.claim_batch(held.id, "runner-a", now=100, lease_seconds=30)
    assert await store.claim_batch(expired.id, "runner-b", now=50, lease_seconds=30)
    assert await store.claim_batch(finished.id, "runner-c", now=100, lease_seconds=30)
    await store.transition(finished.id, ["validating"], "failed", 101)
    assert await store.leased_batches(now=110) == {held.id}


async def test_the_load_board_shows_each_runner_the_others_fresh_loads(store: MetadataStore):
    def load(owner: str, inflight: int, at: float) -> RunnerLoad:
        return RunnerLoad(owner, inflight=inflight, limit=inflight + 1, demand=100, completed=7, weight=1.0, at=at)

    assert await store.share_load("http://e1", load("a", 10, 100.0), fresh_after=95.0) == []
    assert await store.share_load("http://e1", load("b", 20, 101.0), fresh_after=96.0) == [load("a", 10, 100.0)]
    assert await store.share_load("http://e2", load("c", 5, 101.0), fresh_after=96.0) == []  # another endpoint
    # a refreshes (its row is replaced, not added); b's load is stale by the time c reads at 107.
    assert await store.share_load("http://e1", load("a", 12, 102.0), fresh_after=97.0) == [load("b", 20, 101.0)]
    assert await store.share_load("http://e1", load("c", 1, 107.5), fresh_after=101.5) == [load("a", 12, 102.0)]
    await store.withdraw_load("a", older_than=0.0)
    assert await store.share_load("http://e1", load("c", 1, 108.0), fresh_after=0.0) == [load("b", 20, 101.0)]
    await store.withdraw_load("c", older_than=105.0)  # c's own rows, and anyone's older than 105 (b's)
    assert await store.share_load("http://e1", load("d", 1, 109.0), fresh_after=0.0) == []


async def test_a_terminal_status_change_writes_one_webhook_event(store: MetadataStore):
    ran, failed, cancelled, expired = await insert_batches(store, 4)
    await store.transition(ran.id, ["validating"], "in_progress", 10)
    await store.transition(ran.id, ["in_progress"], "finalizing", 11)
    assert await store.claim_webhook_events(now=100, lease_seconds=30, limit=10) == []  # not terminal yet
    await store.transition(ran.id, ["finalizing"], "completed", 12)
    await store.transition(failed.id, ["validating"], "failed", 13)
    await store.transition(cancelled.id, ["validating"], "cancelling", 14)
    await store.transition(cancelled.id, ["cancelling"], "cancelled", 15)
    await store.transition(expired.id, ["validating"], "expired", 16)
    # A compare-and-set that does not match, or a status set again, writes nothing more.
    assert await store.transition(ran.id, ["finalizing"], "completed", 17) is None
    await store.transition(failed.id, ["failed"], "failed", 18)

    events = await store.claim_webhook_events(now=100, lease_seconds=30, limit=10)
    assert [(e.batch_id, e.tenant, e.type, e.created_at, e.attempts) for e in events] == [
        (ran.id, "acme", "batch.completed", 12, 1),
        (failed.id, "acme", "batch.failed", 13, 1),
        (cancelled.id, "acme", "batch.cancelled", 15, 1),
        (expired.id, "acme", "batch.expired", 16, 1),
    ]
    ids_ = [e.id for e in events]
    assert all(i.startswith("evt_") and len(i) == 36 for i in ids_) and len(set(ids_)) == 4


async def test_claimed_webhook_events_are_leased_until_rescheduled_or_finished(store: MetadataStore):
    batches = await insert_batches(store, 3)
    for n, batch in enumerate(batches):
        await store.transition(batch.id, ["validating"], "failed", 20 + n)

    first, second = await store.claim_webhook_events(now=100, lease_seconds=30, limit=2)
    assert [first.batch_id, second.batch_id] == [batches[0].id, batches[1].id]
    (third,) = await store.claim_webhook_events(now=101, lease_seconds=30, limit=10)  # the others are leased
    assert third.batch_id == batches[2].id
    assert await store.claim_webhook_events(now=129, lease_seconds=30, limit=10) == []

    await store.finish_webhook_event(first.id, WebhookState.DELIVERED, now=102)
    await store.reschedule_webhook_event(second.id, due_at=110.5, error="HTTP 503")
    await store.finish_webhook_event(third.id, WebhookState.DROPPED, now=103)
    assert await store.claim_webhook_events(now=110.4, lease_seconds=30, limit=10) == []
    (again,) = await store.claim_webhook_events(now=110.5, lease_seconds=30, limit=10)
    assert (again.id, again.attempts) == (second.id, 2)  # the same event id on every attempt

    # A deliverer that died mid-attempt: the event is due again when its lease runs out.
    (taken_over,) = await store.claim_webhook_events(now=140.5, lease_seconds=30, limit=10)
    assert (taken_over.id, taken_over.attempts) == (second.id, 3)
    await store.finish_webhook_event(second.id, WebhookState.FAILED, now=141, error="gave up")
    # A finished event stays finished: a late reschedule (a slow deliverer whose lease ran out) does not revive it.
    await store.reschedule_webhook_event(second.id, due_at=0, error="late")
    await store.finish_webhook_event(first.id, WebhookState.FAILED, now=142)
    assert await store.claim_webhook_events(now=10_000, lease_seconds=30, limit=10) == []


async def test_the_load_board_says_whose_batch_each_runner_runs_and_its_budget(store: MetadataStore):
    mine = RunnerLoad("a", inflight=1, limit=2, demand=3, completed=4, weight=0.5, at=100.0, tenant="acme", budget=21.5)
    await store.share_load("http://e1", mine, fresh_after=0.0)
    mine = RunnerLoad("a", inflight=1, limit=2, demand=3, completed=4, weight=0.5, at=100.0, tenant="acme", budget=19.0)
    await store.share_load("http://e1", mine, fresh_after=0.0)  # replaced, budget and all
    other = RunnerLoad("b", inflight=1, limit=2, demand=3, completed=4, weight=2.0, at=100.0, tenant="globex")
    assert await store.share_load("http://e1", other, fresh_after=0.0) == [mine]


# --- deadlines -------------------------------------------------------------------------------------


async def test_tenant_policies_are_set_and_replaced(store: MetadataStore):
    assert await store.tenant_policies() == {}
    await store.set_tenant_policy("acme", TenantPolicy(weight=2.0, max_running=3))
    await store.set_tenant_policy("globex", TenantPolicy(weight=0.5))
    await store.set_tenant_policy("acme", TenantPolicy(weight=3.0))  # the cap goes with it
    assert await store.tenant_policies() == {"acme": TenantPolicy(3.0, None), "globex": TenantPolicy(0.5, None)}


async def test_forecasts_are_kept_beside_their_batches(store: MetadataStore):
    first, second, never = await insert_batches(store, 3)
    forecast = BatchForecast(
        at=100.5, remaining=7, projected_end_at=160.25, need_share=0.4, at_risk=False, unreachable=False
    )
    await store.save_forecast(first.id, forecast)
    await store.save_forecast(second.id, BatchForecast(100.0, 3, None, None, at_risk=True, unreachable=True))
    later = msgspec.structs.replace(forecast, at=101.0, remaining=5)
    await store.save_forecast(first.id, later)
    found = await store.forecasts([first.id, second.id, never.id, "batch_missing"])
    assert found == {first.id: later, second.id: BatchForecast(100.0, 3, None, None, True, True)}
    assert await store.forecasts([]) == {}
    assert (await store.get_batch(first.id, None)) == first  # the record itself is unchanged


async def test_an_extension_webhook_event_is_added_once(store: MetadataStore):
    (batch,) = await insert_batches(store, 1)
    assert await store.add_webhook_event("evt_x1", batch.id, "acme", "batch.deadline_unreachable", 50)
    assert not await store.add_webhook_event("evt_x1", batch.id, "acme", "batch.deadline_unreachable", 51)
    (event,) = await store.claim_webhook_events(now=100, lease_seconds=30, limit=10)
    assert (event.id, event.batch_id, event.type, event.created_at) == (
        "evt_x1",
        batch.id,
        "batch.deadline_unreachable",
        50,
    )


# --- API keys ------------------------------------------------------------------------------------


async def test_api_keys(store: MetadataStore):
    first = ApiKeyRecord(id="key_1", tenant="acme", key_hash="h1", prefix="sk-bg-aa", created_at=1)
    second = ApiKeyRecord(id="key_2", tenant="other", key_hash="h2", prefix="sk-bg-bb", created_at=2)
    assert await store.active_key_count() == 0
    await store.insert_key(first)
    await store.insert_key(second)
    with pytest.raises(ValueError):
        await store.insert_key(ApiKeyRecord(id="key_3", tenant="acme", key_hash="h1", prefix="x", created_at=3))

    assert await store.list_keys() == [first, second]
    assert await store.active_key_count() == 2
    assert await store.tenant_for_key_hash("h1") == "acme"
    assert await store.tenant_for_key_hash("nope") is None

    assert await store.revoke_key("key_1", now=50)
    assert not await store.revoke_key("key_1", now=60)
    assert not await store.revoke_key("key_missing", now=60)
    assert await store.tenant_for_key_hash("h1") is None
    assert await store.active_key_count() == 1
    assert (await store.list_keys())[0].revoked_at == 50


async def test_ping(store: MetadataStore):
    await store.ping()
