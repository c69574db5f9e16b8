"""Outages of the production backends mid-batch: Valkey dies, PostgreSQL restarts. Nothing is lost or duplicated."""

from __future__ import annotations

import io
import time

import httpx
import openai
import pytest

from tests.fixtures.private_postgres import private_postgres
from tests.fixtures.redis import redis_server, unique_prefix
from tests.helpers import chat_lines, eventually, jsonl, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.production]


@pytest.fixture(params=["production"])
def backend(request, s3_session):
    """These tests bring their own PostgreSQL and Valkey; only S3 comes from the session."""
    return {"BATCH_GATEWAY_OBJECT_STORE": s3_session.url(), **s3_session.env()}


def start_batch(client, lines: int):
    file = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(lines, max_tokens=16))), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")


def wait_for_progress(client, batch_id: str, at_least: int) -> None:
    eventually(
        lambda: client.batches.retrieve(batch_id).request_counts.completed >= at_least,
        timeout=60,
        interval=0.1,
        what=f"{at_least} requests of {batch_id} to complete",
    )


def assert_every_line_once(client, batch, lines: int) -> None:
    outputs = jsonl(client.files.content(batch.output_file_id).content)
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"req-{i}" for i in range(lines))
    assert batch.request_counts.completed == lines and batch.request_counts.failed == 0


def test_valkey_dies_mid_batch_and_the_batch_still_completes(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=1.0, max_num_seqs=4)
    with redis_server() as valkey:
        gateway = gateway_factory(
            sim.url,
            env={
                "BATCH_GATEWAY_VALKEY_URL": valkey.url,
                "BATCH_GATEWAY_VALKEY_PREFIX": unique_prefix(),
                "BATCH_GATEWAY_FIXED_CONCURRENCY": "4",
            },
        )
        client = gateway.client()
        batch = start_batch(client, 60)
        wait_for_progress(client, batch.id, 5)
        valkey.kill()
        ready = httpx.get(f"http://127.0.0.1:{gateway.port}/ready", timeout=5)
        assert ready.status_code == 200, ready.text  # Valkey down degrades; it does not make the API unready
        done = wait_for(client, batch.id, timeout=90)
        assert done.status == "completed"
        assert_every_line_once(client, done, 60)
        assert "down" in httpx.get(f"http://127.0.0.1:{gateway.port}/ready", timeout=5).text


def test_postgres_restart_mid_batch_loses_nothing(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=1.0, max_num_seqs=4)
    with private_postgres() as postgres:
        gateway = gateway_factory(
            sim.url,
            env={"BATCH_GATEWAY_DATABASE_URL": postgres.url, "BATCH_GATEWAY_FIXED_CONCURRENCY": "4"},
        )
        client = gateway.client()
        batch = start_batch(client, 60)
        wait_for_progress(client, batch.id, 5)

        postgres.stop()
        impatient = gateway.client(max_retries=0, timeout=10)
        with pytest.raises((openai.InternalServerError, openai.APIStatusError)) as caught:
            impatient.batches.retrieve(batch.id)
        assert caught.value.status_code == 503  # an error the SDK retries, never a wrong answer
        assert httpx.get(f"http://127.0.0.1:{gateway.port}/ready", timeout=5).status_code == 503
        time.sleep(2)
        postgres.start()

        done = wait_for(client, batch.id, timeout=120)
        assert done.status == "completed"
        assert_every_line_once(client, done, 60)
        assert len(client.batches.list().data) == 1
