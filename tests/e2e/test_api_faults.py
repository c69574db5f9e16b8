"""Everyday faults met at the API, through the real server on both backend sets, with the openai SDK."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.helpers import chat_lines, jsonl, wait_for

pytestmark = pytest.mark.e2e

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


def test_deleting_the_input_of_a_running_batch_loses_no_line_across_a_crash(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=1.0, max_num_seqs=4)
    env = {"BATCH_GATEWAY_FIXED_CONCURRENCY": "4", "BATCH_GATEWAY_RUNNER_LEASE_SECONDS": "3"}
    gateway = gateway_factory(sim.url, env=env)
    client = gateway.client()
    input_file = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(60, max_tokens=12))), purpose="batch")
    batch = client.batches.create(input_file_id=input_file.id, endpoint=ENDPOINT, completion_window="24h")
    deadline = time.monotonic() + 30
    while client.batches.retrieve(batch.id).request_counts.completed < 2:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.1)

    assert client.files.delete(input_file.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(input_file.id)
    gateway.kill()  # server and runner die with SIGKILL: the restarted runner reads the input again
    gateway.start()
    client = gateway.client()
    done = wait_for(client, batch.id, timeout=90)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 60, 0), done
    lines = jsonl(client.files.content(done.output_file_id).content)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(60))
    # The batch has ended: gc (every second here) deletes the input's bytes for good (checked on local files).
    input_path = gateway.data_dir / "objects" / "default" / "files" / input_file.id
    deadline = time.monotonic() + 10
    while "BATCH_GATEWAY_OBJECT_STORE" not in gateway.env and input_path.exists():
        assert time.monotonic() < deadline, "gc kept the deleted input after its batch ended"
        time.sleep(0.2)
