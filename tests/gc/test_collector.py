"""The gc pass: orphaned and overdue batches go back to the executor, expired files are deleted (object, then row;
its place in its tenant's list a day later), stale multipart uploads are aborted."""

from __future__ import annotations

import dataclasses

import pytest

from batch_gateway import ids
from batch_gateway.executor.base import RunState
from batch_gateway.gc.collector import FILE_CURSOR_SECONDS, collect
from batch_gateway.services import Services
from batch_gateway.settings import Settings
from batch_gateway.store.metadata import BatchRecord, FileRecord
from batch_gateway.store.objects import ObjectMissing, file_key
from tests.fakes.executor import RecordingExecutor
from tests.fixtures.s3 import S3Server, s3  # noqa: F401  (s3 is a session fixture)


def batch(batch_id: str, status: str, expires_at: int) -> BatchRecord:
    return BatchRecord(
        id=batch_id,
        tenant="t",
        endpoint="/v1/chat/completions",
        input_file_id="f",
        completion_window="24h",
        status=status,
        created_at=1,
        expires_at=expires_at,
    )


async def stored_file(services: Services, file_id: str, *, expires_at: int | None = None, data: bytes = b"x") -> None:
    """A file of tenant `t`: its bytes and its row."""
    await services.objects.put_bytes(file_key("t", file_id), data)
    await services.metadata.insert_file(
        FileRecord(
            id=file_id,
            tenant="t",
            bytes=len(data),
            created_at=1,
            filename="a",
            purpose="batch",
            object_key=file_key("t", file_id),
            expires_at=expires_at,
        )
    )


async def test_gc_pass(tmp_path):
    services = await Services.open(Settings(data_dir=str(tmp_path)))
    try:
        now = ids.now()
        for record in (
            batch("batch_orphan", "in_progress", now + 999),
            batch("batch_running", "in_progress", now + 999),
            batch("batch_overdue", "validating", now - 5),
            batch("batch_broken", "cancelling", now + 999),
            batch("batch_done", "completed", now - 5),
        ):
            await services.metadata.insert_batch(record)
        for file_id, expires_at in (("file-old", now - 10), ("file-new", now + 1000), ("file-none", None)):
            await stored_file(services, file_id, expires_at=expires_at)
        executor = RecordingExecutor(running={"batch_running"}, broken={"batch_broken"})

        report = await collect(services, executor)

        assert sorted(batch_id for batch_id, _ in executor.submitted) == ["batch_orphan", "batch_overdue"]
        assert report.resubmitted == 2 and report.overdue == 1 and report.files_deleted == 1
        assert await services.metadata.get_file("file-old", None) is None
        with pytest.raises(ObjectMissing):  # the expired file's object is gone too
            await services.objects.get_bytes(file_key("t", "file-old"))
        assert await services.metadata.get_file("file-new", None) is not None
        assert await services.metadata.get_file("file-none", None) is not None
        assert (await collect(services, executor)).files_deleted == 0  # idempotent
    finally:
        await services.close()


class _RunnerEndsMeanwhile(RecordingExecutor):
    """The executor answers after the batch's runner ended it: between gc's read of the unfinished batches and its
    question, as a short batch's runner can (CI saw a finished batch started again this way)."""

    def __init__(self, services: Services) -> None:
        super().__init__()
        self.services = services

    async def state(self, batch_id: str) -> RunState:
        await self.services.metadata.transition(batch_id, ["in_progress"], "completed", ids.now())
        return RunState.FINISHED


async def test_a_batch_its_runner_ended_while_gc_read_the_list_is_not_started_again(tmp_path):
    services = await Services.open(Settings(data_dir=str(tmp_path)))
    try:
        await services.metadata.insert_batch(batch("batch_short", "in_progress", ids.now() + 999))
        executor = _RunnerEndsMeanwhile(services)

        report = await collect(services, executor)

        assert executor.submitted == [] and report.resubmitted == 0
    finally:
        await services.close()


async def test_an_unfinished_batch_keeps_its_deleted_or_expired_input_until_it_ends(tmp_path):
    services = await Services.open(Settings(data_dir=str(tmp_path)))
    try:
        now = ids.now()
        metadata = services.metadata
        for file_id, expires_at in (("file-deleted", None), ("file-expired", now - 10)):
            await stored_file(services, file_id, expires_at=expires_at, data=b"input")
            running = BatchRecord(
                id=f"batch_{file_id}",
                tenant="t",
                endpoint="/v1/chat/completions",
                input_file_id=file_id,
                completion_window="24h",
                status="in_progress",
                created_at=1,
                expires_at=now + 999,
            )
            await metadata.insert_batch(running)
        assert await metadata.hide_file("file-deleted", "t", now)  # what DELETE /v1/files does while the batch runs
        executor = RecordingExecutor(running={"batch_file-deleted", "batch_file-expired"}, broken=set())

        assert (await collect(services, executor)).files_deleted == 0
        for file_id in ("file-deleted", "file-expired"):
            assert await metadata.get_file(file_id, "t") is None  # gone for the user ...
            assert await services.objects.get_bytes(file_key("t", file_id)) == b"input"  # ... readable for the runner

        for file_id in ("file-deleted", "file-expired"):
            await metadata.transition(f"batch_{file_id}", ["in_progress"], "completed", now)
        assert (await collect(services, executor)).files_deleted == 2
        for file_id in ("file-deleted", "file-expired"):
            with pytest.raises(ObjectMissing):
                await services.objects.get_bytes(file_key("t", file_id))
        assert await metadata.deletable_hidden_files(10) == []
    finally:
        await services.close()


@pytest.mark.production
async def test_gc_pass_aborts_stale_multipart_uploads_on_s3(tmp_path, s3: S3Server, monkeypatch):  # noqa: F811
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3.create_bucket()
    client = s3.client()
    # What a runner SIGKILLed while writing its output file leaves behind: an upload with a part, never completed.
    upload = client.create_multipart_upload(Bucket=bucket, Key="objects/t/files/file-batch_x_output")
    client.upload_part(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    settings = Settings(data_dir=str(tmp_path), object_store=s3.url(bucket, prefix="objects"))
    executor = RecordingExecutor()

    for stale_after, aborted, left in ((settings.gc_stale_upload_age, 0, [upload["Key"]]), (0, 1, [])):
        services = await Services.open(dataclasses.replace(settings, gc_stale_upload_age=stale_after))
        try:
            assert (await collect(services, executor)).uploads_aborted == aborted
        finally:
            await services.close()
        assert s3.pending_uploads(bucket) == left


async def test_gc_expires_uploads_and_deletes_the_parts_of_finished_ones(tmp_path):
    from batch_gateway.store.metadata import UploadPartRecord, UploadRecord
    from batch_gateway.store.objects import upload_part_key

    services = await Services.open(Settings(data_dir=str(tmp_path)))
    try:
        now, metadata, objects = ids.now(), services.metadata, services.objects

        async def upload_with_part(upload_id: str, created_at: int, status: str = "pending") -> str:
            await metadata.insert_upload(
                UploadRecord(
                    id=upload_id,
                    tenant="t",
                    filename="a.jsonl",
                    purpose="batch",
                    bytes=4,
                    mime_type="text/jsonl",
                    status="pending",
                    created_at=created_at,
                    expires_at=created_at + 3600,
                )
            )
            key = upload_part_key("t", upload_id, f"part_{upload_id}")
            await objects.put_bytes(key, b"{}\n\n")
            assert await metadata.add_upload_part(
                UploadPartRecord(
                    id=f"part_{upload_id}",
                    upload_id=upload_id,
                    tenant="t",
                    bytes=4,
                    created_at=created_at,
                    object_key=key,
                ),
                now=created_at,
            )
            if status != "pending":
                await metadata.transition_upload(upload_id, "t", ["pending"], status)
            return key

        stale = await upload_with_part("upload_stale", now - 3601)
        crashed = await upload_with_part("upload_crashed", now - 3601, status="completing")
        # The bytes a completion wrote before its process died, without a File record.
        leftover = file_key("t", ids.upload_file_id("upload_crashed"))
        await objects.put_bytes(leftover, b"{}\n\n")
        cancelled = await upload_with_part("upload_cancelled", now, status="cancelled")
        live = await upload_with_part("upload_live", now)

        report = await collect(services, RecordingExecutor())

        assert (report.uploads_expired, report.upload_parts_deleted) == (2, 3)
        for upload_id in ("upload_stale", "upload_crashed"):
            assert (await metadata.get_upload(upload_id, None)).status == "expired"
        for key in (stale, crashed, cancelled, leftover):
            with pytest.raises(ObjectMissing):
                await objects.get_bytes(key)
        assert await objects.get_bytes(live) == b"{}\n\n"
        assert [p.id for p in await metadata.upload_parts("upload_live")] == ["part_upload_live"]
        assert await metadata.stale_upload_parts(10) == []
        again = await collect(services, RecordingExecutor())
        assert (again.uploads_expired, again.upload_parts_deleted) == (0, 0)
    finally:
        await services.close()


async def test_a_deleted_file_keeps_its_list_place_for_a_day(tmp_path):
    services = await Services.open(Settings(data_dir=str(tmp_path)))
    try:
        now = ids.now()
        for file_id, hidden_at in (("file-yesterday", now - FILE_CURSOR_SECONDS - 5), ("file-today", now - 5)):
            await stored_file(services, file_id)
            await services.metadata.hide_file(file_id, "t", hidden_at)

        report = await collect(services, RecordingExecutor())

        assert (report.files_deleted, report.file_cursors_forgotten) == (2, 1)
        assert (await collect(services, RecordingExecutor())).file_cursors_forgotten == 0
    finally:
        await services.close()
