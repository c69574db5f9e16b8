"""Webhooks: the outbox loop delivers the events the database writes when batches end, over real HTTP to a
recording receiver; each verifies with the `openai` SDK; failures are retried with the same event id, then given up.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
import structlog

from batch_gateway import ids, webhooks
from batch_gateway.store.metadata import BatchRecord, MetadataStore
from batch_gateway.store.postgres import PostgresStore
from batch_gateway.store.sqlite import SqliteStore
from batch_gateway.webhooks import WebhookConfig, build_event, parse_webhooks, post_event, sign
from batch_gateway.webhooks_outbox import WebhookOutbox
from tests.fixtures.postgres import allow_connections, postgres_available, terminate_connections, test_database
from tests.fixtures.webhook_receiver import HANG, Receiver, webhook_receiver
from tests.helpers import eventually_async, free_port

SECRET = webhooks.generate_secret()
FAST = dict(base_delay=0.01, max_delay=0.05, poll_interval=0.01)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as state:
        yield state


@pytest.fixture
async def store(tmp_path) -> AsyncIterator[MetadataStore]:
    store = SqliteStore(str(tmp_path / "metadata.sqlite3"))
    await store.open()
    yield store
    await store.close()


async def end_batch(store: MetadataStore, status: str = "completed", tenant: str = "acme") -> BatchRecord:
    """A batch that reached `status`: the database writes its webhook event into the outbox."""
    now = ids.now()
    batch, _ = await store.insert_batch(
        BatchRecord(
            id=ids.new_batch_id(),
            tenant=tenant,
            endpoint="/v1/chat/completions",
            input_file_id="file-in",
            completion_window="24h",
            status="validating",
            created_at=now,
            expires_at=now + 86400,
        )
    )
    source = "cancelling" if status == "cancelled" else "validating"
    if status == "cancelled":
        await store.transition(batch.id, ["validating"], "cancelling", now)
    ended = await store.transition(batch.id, [source], status, now)
    assert ended is not None
    return ended


def to(receiver: Receiver, tenant: str = "*") -> dict[str, WebhookConfig]:
    return {tenant: WebhookConfig(url=receiver.url, secret=SECRET)}


async def run_until(outbox: WebhookOutbox, done, timeout: float = 10.0) -> None:
    """Run the delivery loop until `done()` holds."""
    task = asyncio.create_task(outbox.run())
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "the outbox did not get there in time"
            assert not task.done(), task
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # room for anything that should not happen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def sdk() -> openai.OpenAI:
    return openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")


# --- delivery ------------------------------------------------------------------------------------


async def test_delivered_event_verifies_with_the_openai_sdk(store, receiver):
    batch = await end_batch(store, "completed")
    assert await WebhookOutbox(store, to(receiver)).deliver_due() == 1

    [request] = receiver.requests
    event = sdk().webhooks.unwrap(request.body, request.headers, secret=SECRET)
    assert (event.type, event.data.id, event.object, event.created_at) == (
        "batch.completed",
        batch.id,
        "event",
        batch.completed_at,
    )
    assert event.id.startswith("evt_") and request.headers["webhook-id"] == event.id
    assert json.loads(request.body) == {
        "id": event.id,
        "object": "event",
        "type": "batch.completed",
        "created_at": batch.completed_at,
        "data": {"id": batch.id},
    }
    assert request.headers["content-type"] == "application/json"
    assert await WebhookOutbox(store, to(receiver)).deliver_due() == 0  # delivered once, never again


async def test_tampered_or_wrongly_signed_events_are_rejected(receiver):
    async with httpx.AsyncClient() as http:
        attempt = await post_event(
            http, WebhookConfig(receiver.url, SECRET), build_event("batch.failed", "batch_abc"), timeout=5
        )
    assert attempt.delivered
    [request] = receiver.requests
    client = sdk()
    tampered = request.body.replace(b"batch_abc", b"batch_xyz")
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(tampered, request.headers, secret=SECRET)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(request.body, request.headers, secret=webhooks.generate_secret())
    replayed_later = {**request.headers, "webhook-timestamp": str(int(request.headers["webhook-timestamp"]) + 1)}
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(request.body, replayed_later, secret=SECRET)


def test_signature_matches_the_standard_webhooks_test_vector():
    # The published example of the Standard Webhooks specification (which OpenAI's scheme follows).
    signature = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize("status", ["completed", "failed", "expired", "cancelled"])
async def test_every_terminal_status_has_its_event_type(store, receiver, status):
    batch = await end_batch(store, status)
    await WebhookOutbox(store, parse_webhooks([receiver.url], [SECRET])).deliver_due()
    [request] = receiver.requests
    event = sdk().webhooks.unwrap(request.body, request.headers, secret=SECRET)
    assert (event.type, event.data.id) == (f"batch.{status}", batch.id)


async def test_tenants_without_webhooks_are_dropped_quietly(store, receiver):
    await end_batch(store, tenant="other")
    acme = await end_batch(store, tenant="acme")
    outbox = WebhookOutbox(store, parse_webhooks([f"acme={receiver.url}"], [f"acme={SECRET}"]))
    with structlog.testing.capture_logs() as logs:
        assert await outbox.deliver_due() == 2
    assert [json.loads(r.body)["data"]["id"] for r in receiver.requests] == [acme.id]
    assert [entry["event"] for entry in logs] == ["webhook.delivered"]
    assert await store.claim_webhook_events(time.time() + 10**6, 30, 10) == []  # done with, not pending

    # With no webhook at all, events are dropped as they come (none is kept for a webhook configured later).
    await end_batch(store, tenant="acme")
    assert await WebhookOutbox(store, {}).deliver_due() == 1
    assert await store.claim_webhook_events(time.time() + 10**6, 30, 10) == []


async def test_a_receiver_down_for_a_while_gets_the_event_once_it_is_back_with_the_same_id(store, receiver):
    receiver.script = [(503, {}), (502, {}), (500, {}), (404, {})]  # down, then a proxy without its backend
    await end_batch(store)
    with structlog.testing.capture_logs() as logs:
        await run_until(WebhookOutbox(store, to(receiver), **FAST), lambda: len(receiver.requests) == 5)
    assert len(receiver.requests) == 5  # and no more once it answered 200
    assert len(set(receiver.event_ids())) == 1
    for request in receiver.requests:  # each attempt is signed on its own and verifies
        sdk().webhooks.unwrap(request.body, request.headers, secret=SECRET)
    assert len({request.body for request in receiver.requests}) == 1
    assert [(e["attempt"], e["outcome"]) for e in logs if e["event"] == "webhook.retry"] == [
        (1, "HTTP 503"),
        (2, "HTTP 502"),
        (3, "HTTP 500"),
        (4, "HTTP 404"),
    ]
    assert [e["attempt"] for e in logs if e["event"] == "webhook.delivered"] == [5]


async def test_honours_retry_after(store, receiver):
    receiver.script = [(429, {"retry-after": "1"})]
    await end_batch(store)
    await run_until(
        WebhookOutbox(store, to(receiver), base_delay=0.01, max_delay=5, poll_interval=0.01),
        lambda: len(receiver.requests) == 2,
    )
    first, second = receiver.requests
    assert second.at - first.at >= 0.95


async def test_gives_up_after_the_retry_window_and_logs_it(store, receiver):
    receiver.otherwise = (502, {})
    batch = await end_batch(store, "expired")
    outbox = WebhookOutbox(store, to(receiver), retry_for=0, **FAST)
    with structlog.testing.capture_logs() as logs:
        assert await outbox.deliver_due() == 1
    [gave_up] = [entry for entry in logs if entry["event"] == "webhook.gave_up"]
    assert gave_up["log_level"] == "error" and gave_up["batch_id"] == batch.id and gave_up["outcome"] == "HTTP 502"
    assert await store.claim_webhook_events(time.time() + 10**6, 30, 10) == []  # never tried again


async def test_connection_refused_is_retried(store):
    config = {"*": WebhookConfig(url=f"http://127.0.0.1:{free_port()}/hook", secret=SECRET)}  # nobody listens
    await end_batch(store)
    with structlog.testing.capture_logs() as logs:
        assert await WebhookOutbox(store, config, **FAST).deliver_due() == 1
    [retry] = [entry for entry in logs if entry["event"] == "webhook.retry"]
    assert "ConnectError" in retry["outcome"] and retry["log_level"] == "warning"


async def test_a_hung_receiver_costs_one_timeout_per_attempt(store, receiver):
    receiver.otherwise = HANG
    await end_batch(store)
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        assert await WebhookOutbox(store, to(receiver), timeout=0.3, **FAST).deliver_due() == 1
    assert time.monotonic() - started < 2
    [retry] = [entry for entry in logs if entry["event"] == "webhook.retry"]
    assert retry["outcome"] == "no answer within 0.3 s"


@pytest.mark.production
@pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL")
async def test_two_delivery_loops_on_one_postgresql_database_deliver_each_event_once(receiver):
    with test_database() as url:
        stores = [PostgresStore(url), PostgresStore(url)]
        for each in stores:
            await each.open()
        try:
            ended = [await end_batch(stores[0]) for _ in range(60)]
            loops = [
                asyncio.create_task(WebhookOutbox(each, to(receiver), concurrency=4, **FAST).run()) for each in stores
            ]
            try:
                await eventually_async(lambda: len(receiver.requests) >= 60, timeout=20, what="60 deliveries")
                await asyncio.sleep(0.5)  # any duplicate would arrive meanwhile
            finally:
                for loop in loops:
                    loop.cancel()
                await asyncio.gather(*loops, return_exceptions=True)
        finally:
            for each in stores:
                await each.close()
    assert len(receiver.requests) == 60
    assert sorted(json.loads(r.body)["data"]["id"] for r in receiver.requests) == sorted(b.id for b in ended)
    assert len(set(receiver.event_ids())) == 60


@pytest.mark.production
@pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL")
async def test_delivery_resumes_after_a_database_outage(receiver):
    with test_database() as url:
        store = PostgresStore(url, timeout=0.5, reconnect_timeout=1)
        await store.open()
        try:
            batch = await end_batch(store)
            allow_connections(url, False)
            terminate_connections(url)
            with structlog.testing.capture_logs() as logs:
                task = asyncio.create_task(WebhookOutbox(store, to(receiver), **FAST).run())
                await asyncio.sleep(1.5)
                assert receiver.requests == [] and not task.done()
                allow_connections(url, True)
                await eventually_async(lambda: receiver.requests, timeout=15, interval=0.05, what="the delivery")
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        finally:
            allow_connections(url, True)
            await store.close()
    assert [json.loads(r.body)["data"]["id"] for r in receiver.requests] == [batch.id]
    assert [e["event"] for e in logs if e["event"].startswith("webhook.outbox")] == [
        "webhook.outbox_unavailable",
        "webhook.outbox_available",
    ]


# --- backoff -------------------------------------------------------------------------------------


def test_backoff_grows_with_jitter_and_is_capped():
    delays = [webhooks.backoff_delay(n, base_delay=1.0, max_delay=10.0) for n in (1, 2, 3, 4, 5, 6)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and 2.0 <= delays[2] <= 4.0
    assert all(d <= 10.0 for d in delays)
    assert webhooks.backoff_delay(1, base_delay=1.0, max_delay=10.0, retry_after=7) == 7
    assert webhooks.backoff_delay(1, base_delay=1.0, max_delay=10.0, retry_after=3600) == 10.0


def test_retry_after_accepts_seconds_and_http_dates():
    assert webhooks.parse_retry_after("3") == 3.0
    assert webhooks.parse_retry_after(None) is None
    assert webhooks.parse_retry_after("soon") is None
    now = 1_700_000_000.0
    assert webhooks.parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now=now) == pytest.approx(20.0)


# --- configuration -------------------------------------------------------------------------------


def test_parse_webhooks_per_tenant_and_for_everyone():
    acme_secret, shared_secret = webhooks.generate_secret(), webhooks.generate_secret()
    configs = parse_webhooks(
        ["acme=https://hooks.acme.example/b?x=1", "https://hooks.example/all", "beta=http://10.0.0.5:8080/h"],
        [f"acme={acme_secret}", shared_secret],
    )
    assert configs["acme"] == WebhookConfig("https://hooks.acme.example/b?x=1", acme_secret)
    assert configs["beta"] == WebhookConfig("http://10.0.0.5:8080/h", shared_secret)
    assert webhooks.webhook_for(configs, "gamma") == WebhookConfig("https://hooks.example/all", shared_secret)
    assert parse_webhooks([], []) == {}


@pytest.mark.parametrize(
    ("urls", "secrets", "message"),
    [
        (["acme=https://h.example/x"], [], "has no secret"),
        (["acme"], [SECRET], "expected TENANT=VALUE"),
        (["acme=ftp://h.example/x"], [SECRET], "not an http(s) URL"),
        (["acme=https://a.example", "acme=https://b.example"], [SECRET], "two webhook URLs"),
        (["acme=https://h.example/x"], ["acme=secret"], "whsec_"),
        (["acme=https://h.example/x"], ["acme=whsec_!!!"], "base64"),
        (["acme=https://h.example/x"], ["acme=whsec_c2hvcnQ="], "too short"),
        (["acme=https://h.example/x"], [SECRET, f"beta={SECRET}"], "no --webhook beta=URL"),
    ],
)
def test_parse_webhooks_rejects_bad_settings_clearly(urls, secrets, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_webhooks(urls, secrets)


def test_secrets_stay_out_of_reprs_and_errors():
    assert SECRET not in repr(WebhookConfig("https://h.example", SECRET))
    with pytest.raises(ValueError) as caught:
        parse_webhooks(["acme=https://h.example"], ["whsec-typo-looks-like-a-secret"])
    assert "whsec-typo" not in str(caught.value)


def test_build_event_rejects_unknown_types():
    with pytest.raises(ValueError, match="unknown batch event type"):
        build_event("batch.exploded", "batch_1")


async def test_a_deadline_unreachable_event_is_delivered_once_and_verifies_with_the_openai_sdk(store, receiver):
    from batch_gateway.runner.deadline import UNREACHABLE_EVENT, unreachable_event_id

    batch = await end_batch(store, "completed")
    await store.add_webhook_event(unreachable_event_id(batch.id), batch.id, "acme", UNREACHABLE_EVENT, 123)
    assert await WebhookOutbox(store, to(receiver)).deliver_due() == 2
    bodies = [json.loads(r.body) for r in receiver.requests]
    (extension,) = [b for b in bodies if b["type"] == "batch.deadline_unreachable"]
    assert extension == {
        "id": unreachable_event_id(batch.id),
        "object": "event",
        "type": "batch.deadline_unreachable",
        "created_at": 123,
        "data": {"id": batch.id},
    }
    request = next(r for r in receiver.requests if json.loads(r.body)["type"] == "batch.deadline_unreachable")
    sdk().webhooks.unwrap(request.body, request.headers, secret=SECRET)  # signed like OpenAI's own events
