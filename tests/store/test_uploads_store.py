"""The uploads half of the metadata store (the Uploads API), on SQLite and PostgreSQL (see conftest.py)."""

from __future__ import annotations

import pytest

from batch_gateway import ids
from batch_gateway.store.metadata import FileRecord, MetadataStore, UploadPartRecord, UploadRecord

PENDING, COMPLETING, COMPLETED, CANCELLED, EXPIRED = "pending", "completing", "completed", "cancelled", "expired"


def upload_record(tenant: str = "acme", *, created_at: int = 1_000, **fields) -> UploadRecord:
    values = dict(
        id=ids.new_upload_id(),
        tenant=tenant,
        filename="big.jsonl",
        purpose="batch",
        bytes=30,
        mime_type="text/jsonl",
        status=PENDING,
        created_at=created_at,
        expires_at=created_at + 3600,
    )
    return UploadRecord(**(values | fields))


def part_record(upload: UploadRecord, size: int = 10, *, tenant: str | None = None, created_at: int = 1_001):
    part_id = ids.new_upload_part_id()
    return UploadPartRecord(
        id=part_id,
        upload_id=upload.id,
        tenant=tenant or upload.tenant,
        bytes=size,
        created_at=created_at,
        object_key=f"{upload.tenant}/uploads/{upload.id}/{part_id}",
    )


def file_for(upload: UploadRecord) -> FileRecord:
    file_id = ids.upload_file_id(upload.id)
    return FileRecord(
        id=file_id,
        tenant=upload.tenant,
        bytes=upload.bytes,
        created_at=2_000,
        filename=upload.filename,
        purpose=upload.purpose,
        object_key=f"{upload.tenant}/files/{file_id}",
        expires_at=9_000,
    )


async def test_upload_round_trip_is_tenant_scoped(store: MetadataStore):
    upload = upload_record(file_expires_after=7200)
    await store.insert_upload(upload)
    assert await store.get_upload(upload.id, "acme") == upload
    assert await store.get_upload(upload.id, None) == upload
    assert await store.get_upload(upload.id, "other") is None
    assert await store.get_upload("upload_missing", "acme") is None


async def test_parts_are_added_only_to_a_pending_unexpired_upload_of_their_tenant(store: MetadataStore):
    upload = upload_record()
    await store.insert_upload(upload)
    first, second = part_record(upload), part_record(upload, 20)
    assert await store.add_upload_part(first, now=1_001)
    assert await store.add_upload_part(second, now=1_002)
    assert not await store.add_upload_part(part_record(upload, tenant="other"), now=1_003)
    assert not await store.add_upload_part(part_record(upload), now=upload.expires_at)  # expired by then
    assert await store.upload_parts(upload.id) == [first, second]

    assert await store.transition_upload(upload.id, "acme", [PENDING], CANCELLED) is not None
    assert not await store.add_upload_part(part_record(upload), now=1_004)
    assert await store.upload_parts(upload.id) == [first, second]


async def test_transition_upload_is_compare_and_set_with_tenant_and_expiry(store: MetadataStore):
    upload = upload_record()
    await store.insert_upload(upload)
    assert await store.transition_upload(upload.id, "other", [PENDING], COMPLETING) is None
    assert (
        await store.transition_upload(upload.id, "acme", [PENDING], COMPLETING, unexpired_at=upload.expires_at) is None
    )
    moved = await store.transition_upload(upload.id, "acme", [PENDING], COMPLETING, unexpired_at=upload.expires_at - 1)
    assert moved is not None and moved.status == COMPLETING
    assert await store.transition_upload(upload.id, "acme", [PENDING], CANCELLED) is None
    back = await store.transition_upload(upload.id, None, [COMPLETING], PENDING)
    assert back is not None and back.status == PENDING
    with pytest.raises(ValueError):
        await store.transition_upload(upload.id, None, [PENDING], "finished")


async def test_complete_upload_writes_the_file_with_the_status_or_not_at_all(store: MetadataStore):
    upload = upload_record()
    await store.insert_upload(upload)
    file = file_for(upload)
    assert await store.complete_upload(upload.id, file) is None  # still pending: no completion
    assert await store.get_file(file.id, None) is None

    await store.transition_upload(upload.id, "acme", [PENDING], COMPLETING)
    done = await store.complete_upload(upload.id, file)
    assert done is not None and (done.status, done.file_id) == (COMPLETED, file.id)
    assert await store.get_file(file.id, "acme") == file
    assert await store.complete_upload(upload.id, file) is None  # only once


async def test_expire_uploads_moves_open_ones_past_their_expiry(store: MetadataStore):
    old_pending = upload_record(created_at=100)
    old_completing = upload_record(created_at=200)
    old_cancelled = upload_record(created_at=50)
    fresh = upload_record(created_at=5_000)
    for upload in (old_pending, old_completing, old_cancelled, fresh):
        await store.insert_upload(upload)
    await store.transition_upload(old_completing.id, None, [PENDING], COMPLETING)
    await store.transition_upload(old_cancelled.id, None, [PENDING], CANCELLED)

    now = 200 + 3600
    first = await store.expire_uploads(now, limit=1)
    assert [u.id for u in first] == [old_pending.id] and first[0].status == EXPIRED
    rest = await store.expire_uploads(now, limit=10)
    assert [u.id for u in rest] == [old_completing.id]
    assert await store.expire_uploads(now, limit=10) == []
    assert (await store.get_upload(fresh.id, None)).status == PENDING
    assert (await store.get_upload(old_cancelled.id, None)).status == CANCELLED


async def test_stale_parts_are_those_of_uploads_no_longer_open(store: MetadataStore):
    pending, completing, completed, cancelled = (upload_record(created_at=1_000 + i) for i in range(4))
    parts = {}
    for upload in (pending, completing, completed, cancelled):
        await store.insert_upload(upload)
        parts[upload.id] = part_record(upload)
        assert await store.add_upload_part(parts[upload.id], now=1_010)
    await store.transition_upload(completing.id, None, [PENDING], COMPLETING)
    await store.transition_upload(completed.id, None, [PENDING], COMPLETING)
    await store.complete_upload(completed.id, file_for(completed))
    await store.transition_upload(cancelled.id, None, [PENDING], CANCELLED)

    stale = await store.stale_upload_parts(limit=10)
    assert stale == [parts[completed.id], parts[cancelled.id]]
    await store.delete_upload_part(parts[completed.id].id)
    assert await store.stale_upload_parts(limit=10) == [parts[cancelled.id]]
    assert await store.upload_parts(completed.id) == []


def test_upload_status_shown_to_clients():
    upload = upload_record(created_at=100)
    assert upload.shown_status(now=200) == PENDING
    assert upload.shown_status(now=3_700) == EXPIRED  # before gc gets to it
    completing = upload_record(created_at=100, status=COMPLETING)
    assert completing.shown_status(now=200) == PENDING
    assert upload_record(status=CANCELLED).shown_status(now=10**9) == CANCELLED
