"""ObjectStore behaviour, the same on a local directory and on a real S3 server (moto over HTTP)."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from batch_gateway.errors import InvalidRequest, StorageUnavailable
from batch_gateway.store.objects import ObjectMissing, ObjectStore
from tests.fixtures.processes import spawn, stop
from tests.fixtures.s3 import S3Server, s3  # noqa: F401  (s3 is a session fixture)
from tests.helpers import eventually_async, free_port

MB = 1024 * 1024


class Backend:
    """An ObjectStore plus a way to see what really landed in the backend, bypassing ObjectStore."""

    def __init__(self, store: ObjectStore, raw_keys, pending_uploads) -> None:
        self.store = store
        self.raw_keys = raw_keys  # every stored object, as the backend lists it
        self.pending_uploads = pending_uploads  # unfinished multipart uploads (S3) or staging files (disk)


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.production)])
def backend(request, tmp_path: Path, monkeypatch) -> Backend:
    if request.param == "file":
        root = tmp_path / "objects"

        def files() -> list[str]:
            return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

        def staging() -> list[str]:  # obstore's local multipart upload stages parts in "<key>#<n>" files
            return [name for name in files() if "#" in name]

        return Backend(ObjectStore(root.as_uri()), files, staging)
    server: S3Server = request.getfixturevalue("s3")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    bucket = server.create_bucket()
    return Backend(
        ObjectStore(server.url(bucket, prefix="gw")),
        lambda: server.keys(bucket),
        lambda: server.pending_uploads(bucket),
    )


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes that differ by position, so a reordered or dropped chunk changes the content."""
    block = bytes((i * 7 + seed) % 251 for i in range(MB))
    return (block * (size // MB + 1))[:size]


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_put_stream_multipart_and_stream_back(backend: Backend):
    data = pattern(12 * MB + 12345)  # more than one 8 MB part: a multipart upload on S3
    await backend.store.put_stream("t1/files/big", chunked(data, 256 * 1024))

    assert await backend.store.get_bytes("t1/files/big") == data
    chunks = [chunk async for chunk in await backend.store.stream("t1/files/big", chunk_size=MB)]
    assert b"".join(chunks) == data
    assert len(chunks) > 1 and all(isinstance(chunk, bytes) for chunk in chunks)
    assert backend.pending_uploads() == []


async def test_put_bytes_put_file_overwrite(backend: Backend, tmp_path: Path):
    await backend.store.put_bytes("t1/files/a", b"first")
    await backend.store.put_bytes("t1/files/a", b"second")
    assert await backend.store.get_bytes("t1/files/a") == b"second"

    source = tmp_path / "upload.bin"
    source.write_bytes(pattern(3 * MB, seed=5))
    await backend.store.put_file("t1/files/b", source)
    assert await backend.store.get_bytes("t1/files/b") == source.read_bytes()

    await backend.store.put_bytes("t1/files/empty", b"")
    assert await backend.store.get_bytes("t1/files/empty") == b""


async def test_list_by_prefix_matches_whole_path_segments(backend: Backend):
    keys = ["t1/batches/b1/out-0", "t1/batches/b1/out-1", "t1/batches/b10/out-0", "t1/files/f1", "t2/files/f1"]
    for key in keys:
        await backend.store.put_bytes(key, key.encode())

    assert await backend.store.list("t1/batches/b1") == ["t1/batches/b1/out-0", "t1/batches/b1/out-1"]
    assert await backend.store.list("t1") == sorted(k for k in keys if k.startswith("t1/"))
    assert await backend.store.list("t3") == []

    await backend.store.delete_prefix("t1/batches/b1")
    assert await backend.store.list("t1/batches") == ["t1/batches/b10/out-0"]


async def test_delete_is_idempotent_and_missing_objects_raise(backend: Backend):
    await backend.store.put_bytes("t1/files/gone", b"x")
    await backend.store.delete("t1/files/gone")
    await backend.store.delete("t1/files/gone")
    await backend.store.delete("t1/files/never-existed")

    with pytest.raises(ObjectMissing):
        await backend.store.get_bytes("t1/files/gone")
    with pytest.raises(ObjectMissing):
        await backend.store.stream("t1/files/never-existed")
    assert backend.raw_keys() == []


@pytest.mark.parametrize("fail_after", [0, 3 * MB, 9 * MB], ids=["before-data", "first-part", "after-a-part"])
async def test_failing_stream_stores_nothing_and_reraises(backend: Backend, fail_after: int):
    async def upload() -> AsyncIterator[bytes]:
        async for chunk in chunked(pattern(fail_after), MB):
            yield chunk
        raise InvalidRequest("File is larger than the upload limit.", code="file_too_large")

    with pytest.raises(InvalidRequest) as raised:
        await backend.store.put_stream("t1/files/partial", upload())
    assert raised.value.code == "file_too_large"
    assert await backend.store.list("t1") == []
    assert backend.raw_keys() == []
    assert backend.pending_uploads() == []


async def test_ping_ok(backend: Backend):
    await backend.store.ping()


@pytest.mark.production
async def test_ping_unreachable_s3_fails_fast(s3: S3Server, monkeypatch):  # noqa: F811
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    store = ObjectStore("s3://no-server/prefix")

    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        await store.ping()
    assert time.monotonic() - started < 1.5


@pytest.mark.production
async def test_ping_missing_bucket_fails(s3: S3Server, monkeypatch):  # noqa: F811
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StorageUnavailable):
        await ObjectStore("s3://bucket-that-does-not-exist/prefix").ping()


# A writer SIGKILLed in the middle of a streamed upload (the API storing a large file, a runner writing its output).
_KILLED_WRITER = """
import asyncio, sys
from batch_gateway.store.objects import ObjectStore

async def upload():
    for _ in range(20):
        yield bytes(1024 * 1024)
    await asyncio.sleep(3600)  # killed here, with parts sent and the upload unfinished

asyncio.run(ObjectStore(sys.argv[1]).put_stream(sys.argv[2], upload()))
"""


async def kill_a_writer_mid_upload(backend: Backend, key: str) -> None:
    writer = spawn([sys.executable, "-c", _KILLED_WRITER, backend.store.url, key], cwd=Path(__file__).parents[2])
    try:

        def uploading() -> list[str]:
            assert writer.poll() is None, "the writer died by itself"
            return backend.pending_uploads()

        await eventually_async(uploading, timeout=20, interval=0.05, what="the writer to start an upload")
    finally:
        stop(writer, sig=signal.SIGKILL)


@pytest.mark.process
async def test_uploads_left_by_a_killed_writer_are_aborted_once_stale(backend: Backend):
    await backend.store.put_bytes("t1/files/done", b"finished before")
    await kill_a_writer_mid_upload(backend, "t1/files/big")
    left = backend.pending_uploads()
    assert len(left) == 1 and "t1/files/big" in left[0]

    assert await backend.store.abort_stale_uploads(older_than=24 * 3600) == 0  # may still be in progress: kept
    assert backend.pending_uploads() == left
    assert await backend.store.abort_stale_uploads(older_than=0) == 1
    assert backend.pending_uploads() == []
    assert await backend.store.get_bytes("t1/files/done") == b"finished before"
    assert await backend.store.list("t1") == ["t1/files/done"]


@pytest.mark.production
async def test_stale_upload_cleanup_stays_under_the_store_prefix(s3: S3Server, monkeypatch):  # noqa: F811
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3.create_bucket()
    client = s3.client()
    for key in ("gw/t1/files/mine", "gw2/t1/files/a-neighbours", "other/x"):
        client.create_multipart_upload(Bucket=bucket, Key=key)
    assert await ObjectStore(s3.url(bucket, prefix="gw")).abort_stale_uploads(older_than=0) == 1
    assert s3.pending_uploads(bucket) == ["gw2/t1/files/a-neighbours", "other/x"]


@pytest.mark.production
async def test_stale_upload_cleanup_needs_static_s3_credentials(s3: S3Server, monkeypatch):  # noqa: F811
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    store = ObjectStore(s3.url())
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")  # as with an IAM role: no keys in the environment
    assert await store.abort_stale_uploads(older_than=0) is None


async def test_a_bug_is_raised_as_it_is_never_as_storage_unavailable(backend: Backend):
    """StorageUnavailable means "retry later" (a 503, a runner waiting storage out); a bug must surface as a bug."""

    async def buggy() -> AsyncIterator[bytes]:
        yield b"first line\n"
        raise TypeError("a bug in the producer")

    with pytest.raises(TypeError, match="a bug in the producer"):
        await backend.store.put_stream("t1/files/buggy", buggy())
    with pytest.raises(ValueError):  # obstore refuses what is not bytes, a path or a stream
        await backend.store.put_bytes("t1/files/not-bytes", 12345)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # a key no object can have
        await backend.store.get_bytes("t1/../escape")
    assert backend.raw_keys() == []


async def test_a_storage_error_is_storage_unavailable(tmp_path: Path):
    root = tmp_path / "objects"
    store = ObjectStore(root.as_uri())
    (root / "t1").write_text("a file where the tenant's folder goes")
    with pytest.raises(StorageUnavailable):
        await store.put_bytes("t1/files/a", b"x")
    with pytest.raises(StorageUnavailable):
        await store.get_bytes("t1/files/a")
