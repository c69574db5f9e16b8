"""Uploads and downloads through the API with S3 object storage (moto's real S3 server on a loopback port).

The production path: the upload streams to S3 as a multipart upload, and a rejected upload leaves neither an object
nor a dangling multipart upload behind.
"""

from __future__ import annotations

import openai
import pytest

from tests.fixtures.s3 import S3Server, s3  # noqa: F401  (s3 is a session fixture)
from tests.helpers import chat_lines

pytestmark = pytest.mark.production


@pytest.fixture
def s3_api(server_factory, s3: S3Server):  # noqa: F811
    bucket = s3.create_bucket()
    with s3.environ():
        server = server_factory(object_store_url=s3.url(bucket), max_upload_bytes=24 * 1024 * 1024)
    return server, bucket


def test_upload_streams_to_s3_and_reads_back(s3_api, s3):  # noqa: F811
    server, bucket = s3_api
    client = server.client(max_retries=0)
    line = b'{"custom_id": "' + b"x" * 4000 + b'"}\n'
    data = line * (20 * 1024 * 1024 // len(line))  # 20 MB: more than one 8 MB part
    created = client.files.create(file=("big.jsonl", data), purpose="batch")
    assert created.bytes == len(data)
    assert s3.keys(bucket) == [f"objects/default/files/{created.id}"]
    with client.files.with_streaming_response.content(created.id) as streamed:
        assert b"".join(streamed.iter_bytes()) == data
    client.files.delete(created.id)
    assert s3.keys(bucket) == []


def test_rejected_uploads_leave_nothing_in_s3(s3_api, s3):  # noqa: F811
    server, bucket = s3_api
    client = server.client(max_retries=0)
    too_big = b'{"a": 1}\n' * (25 * 1024 * 1024 // 9 + 1)
    with pytest.raises(openai.BadRequestError, match="File is too large"):
        client.files.create(file=("big.jsonl", too_big), purpose="batch")
    late_problem = chat_lines(3) * 8_000 + b"\xff\n"  # ~11 MB, then a byte that is not UTF-8
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("late.jsonl", late_problem), purpose="batch")
    assert s3.keys(bucket) == [] and s3.pending_uploads(bucket) == []
    assert client.files.list().data == []
