"""Everyday faults met at the API, through the real server on both backend sets, with the openai SDK."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

from tests.helpers import chat_lines

ENDPOINT = "/v1/chat/completions"


def test_concurrent_sdk_retries_make_exactly_one_batch(client):
    file_id = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(2))), purpose="batch").id

    def together(retry_count: str, n: int) -> set[str]:
        barrier = threading.Barrier(n)

        def one(_: int) -> str:
            barrier.wait()
            headers = {"x-stainless-retry-count": retry_count}
            return client.batches.create(
                input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h", extra_headers=headers
            ).id

        with ThreadPoolExecutor(n) as pool:
            return set(pool.map(one, range(n)))

    assert len(together("1", 20)) == 1  # twenty retries of one request, all at once
    assert len(together("0", 2)) == 2  # two first tries are two requests
    assert len(client.batches.list().data) == 3
