"""Webhooks: delivered over real HTTP to a recording receiver, verified with the `openai` SDK, retried, given up."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import structlog

from batch_gateway import webhooks
from batch_gateway.webhooks import WebhookConfig, build_event, deliver, notify, parse_webhooks, sign
from tests.helpers import free_port

SECRET = webhooks.generate_secret()
FAST = dict(base_delay=0.01, max_delay=0.05)


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    at: float


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records each POST and answers from a script of (status, headers)."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    url: str = ""

    def next_answer(self) -> tuple[int, dict[str, str]]:
        return self.script.pop(0) if self.script else (200, {})


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            state.requests.append(Received(body, {k.lower(): v for k, v in self.headers.items()}, time.monotonic()))
            status, headers = state.next_answer()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/batch"
    yield state
    server.shutdown()
    server.server_close()


def sdk() -> openai.OpenAI:
    return openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")


async def test_delivered_event_verifies_with_the_openai_sdk(receiver):
    config = WebhookConfig(url=receiver.url, secret=SECRET)
    assert await deliver(config, "batch.completed", "batch_abc", created_at=1_700_000_000) is True

    [request] = receiver.requests
    event = sdk().webhooks.unwrap(request.body, request.headers, secret=SECRET)
    assert event.type == "batch.completed"
    assert event.data.id == "batch_abc"
    assert event.object == "event"
    assert event.created_at == 1_700_000_000
    assert event.id.startswith("evt_") and request.headers["webhook-id"] == event.id
    assert json.loads(request.body) == {
        "id": event.id, "object": "event", "type": "batch.completed", "created_at": 1_700_000_000,
        "data": {"id": "batch_abc"},
    }
    assert request.headers["content-type"] == "application/json"


async def test_tampered_or_wrongly_signed_events_are_rejected(receiver):
    await deliver(WebhookConfig(url=receiver.url, secret=SECRET), "batch.failed", "batch_abc")
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
    signature = sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


@pytest.mark.parametrize("status", ["completed", "failed", "expired", "cancelled"])
async def test_every_terminal_status_has_its_event_type(receiver, status):
    configs = parse_webhooks([receiver.url], [SECRET])
    assert await notify(configs, "any-tenant", "batch_1", status) is True
    event = sdk().webhooks.unwrap(receiver.requests[-1].body, receiver.requests[-1].headers, secret=SECRET)
    assert event.type == f"batch.{status}"


async def test_statuses_without_events_and_tenants_without_webhooks_send_nothing(receiver):
    configs = parse_webhooks([f"acme={receiver.url}"], [f"acme={SECRET}"])
    assert await notify(configs, "acme", "batch_1", "in_progress") is None
    assert await notify(configs, "other", "batch_1", "completed") is None
    assert receiver.requests == []


async def test_retries_after_a_500_with_the_same_event_id(receiver):
    receiver.script = [(500, {}), (503, {})]
    config = WebhookConfig(url=receiver.url, secret=SECRET)
    assert await deliver(config, "batch.completed", "batch_1", **FAST) is True
    assert len(receiver.requests) == 3
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 1
    for request in receiver.requests:  # each attempt is signed on its own and verifies
        sdk().webhooks.unwrap(request.body, request.headers, secret=SECRET)


async def test_honours_retry_after_on_429(receiver):
    receiver.script = [(429, {"retry-after": "1"})]
    config = WebhookConfig(url=receiver.url, secret=SECRET)
    assert await deliver(config, "batch.completed", "batch_1", base_delay=0.01, max_delay=5) is True
    first, second = receiver.requests
    assert second.at - first.at >= 0.95


async def test_gives_up_after_the_attempts_and_logs_it(receiver):
    receiver.script = [(502, {})] * 10
    config = WebhookConfig(url=receiver.url, secret=SECRET)
    with structlog.testing.capture_logs() as logs:
        assert await deliver(config, "batch.expired", "batch_9", attempts=3, **FAST) is False
    assert len(receiver.requests) == 3
    gave_up = [entry for entry in logs if entry["event"] == "webhook.gave_up"]
    assert gave_up and gave_up[0]["log_level"] == "error" and gave_up[0]["batch_id"] == "batch_9"
    assert gave_up[0]["outcome"] == "HTTP 502"
    assert [entry["attempt"] for entry in logs if entry["event"] == "webhook.retry"] == [1, 2]


async def test_a_4xx_is_not_retried(receiver):
    receiver.script = [(401, {})]
    config = WebhookConfig(url=receiver.url, secret=SECRET)
    with structlog.testing.capture_logs() as logs:
        assert await deliver(config, "batch.completed", "batch_1", **FAST) is False
    assert len(receiver.requests) == 1
    assert [entry["event"] for entry in logs] == ["webhook.rejected"]


async def test_connection_refused_is_retried_then_given_up():
    config = WebhookConfig(url=f"http://127.0.0.1:{free_port()}/hook", secret=SECRET)
    with structlog.testing.capture_logs() as logs:
        assert await deliver(config, "batch.completed", "batch_1", attempts=2, **FAST) is False
    assert [entry["event"] for entry in logs] == ["webhook.retry", "webhook.gave_up"]
    assert "ConnectError" in logs[-1]["outcome"]


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
