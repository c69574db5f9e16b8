"""Webhooks end to end: the real `serve` delivers each ended batch's OpenAI-style event from the outbox, whatever the
receiver does (hangs, is down, outlives a `serve` crash), and the openai SDK verifies it."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator

import openai
import pytest

from batch_gateway.webhooks import generate_secret
from tests.fixtures.webhook_receiver import HANG, Receiver, webhook_receiver
from tests.helpers import chat_lines, wait_for

pytestmark = pytest.mark.e2e

SECRET = generate_secret()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as state:
        yield state


def webhook_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {"BATCH_GATEWAY_WEBHOOK": receiver.url, "BATCH_GATEWAY_WEBHOOK_SECRET": SECRET, **extra}


def create_batch(client: openai.OpenAI, lines: int = 3):
    file = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(lines))), purpose="batch")
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")


def verified(receiver: Receiver, index: int = -1):
    request = receiver.requests[index]
    return openai.OpenAI(api_key="x").webhooks.unwrap(request.body, request.headers, secret=SECRET)


def test_completed_batch_sends_a_verifiable_event(gateway_factory, sim_factory, receiver):
    gateway = gateway_factory(sim_factory().url, env=webhook_env(receiver))
    client = gateway.client()
    batch = create_batch(client)
    assert wait_for(client, batch.id).status == "completed"
    receiver.wait_for_requests(1, timeout=10)
    time.sleep(0.5)
    assert len(receiver.requests) == 1
    event = verified(receiver)
    assert event.type == "batch.completed" and event.data.id == batch.id


def test_a_hung_receiver_does_not_hold_a_runner_slot(gateway_factory, sim_factory, receiver):
    """One runner slot, a receiver that never answers: the second batch runs as soon as the first has ended (the
    runner no longer waits for the webhook; it used to hold its slot for about a minute)."""
    receiver.otherwise = HANG
    gateway = gateway_factory(sim_factory().url, env=webhook_env(receiver), args=["--max-concurrent-runners", "1"])
    client = gateway.client()
    first, second = create_batch(client), create_batch(client)
    assert wait_for(client, first.id, timeout=30).status == "completed"
    assert wait_for(client, second.id, timeout=15).status == "completed"
    receiver.wait_for_requests(2, timeout=10)  # both events were attempted, and neither is answered
    assert {json.loads(r.body)["data"]["id"] for r in receiver.requests} == {first.id, second.id}


def test_the_event_outlives_a_serve_crash_and_a_receiver_outage(gateway_factory, sim_factory, receiver):
    """The receiver is down when the batch ends; serve is SIGKILLed before any attempt succeeded. The restarted serve
    delivers the event once the receiver is back, with the id of the failed attempts."""
    receiver.otherwise = (503, {})
    sim = sim_factory()
    env = webhook_env(receiver, BATCH_GATEWAY_WEBHOOK_TIMEOUT="1")
    gateway = gateway_factory(sim.url, env=env)
    client = gateway.client()
    batch = create_batch(client)
    assert wait_for(client, batch.id).status == "completed"
    receiver.wait_for_requests(1, timeout=10)
    gateway.kill()
    failed_attempts = len(receiver.requests)
    receiver.otherwise = (200, {})

    gateway_factory(sim.url, env=env)  # the same data directory and databases
    receiver.wait_for_requests(failed_attempts + 1, timeout=30)
    time.sleep(1.5)  # several polls: a delivered event is not sent again
    assert len(receiver.requests) == failed_attempts + 1
    assert len(set(receiver.event_ids())) == 1
    event = verified(receiver)
    assert event.type == "batch.completed" and event.data.id == batch.id
