"""OpenAI-compatible webhooks: `batch.completed`, `batch.failed`, `batch.expired` and `batch.cancelled` events, and
one extension, `batch.deadline_unreachable` (a running batch that cannot end in time, docs/deadlines.md).

The event body is OpenAI's, `{"id":"evt_...","object":"event","type":"batch.completed","created_at":...,
"data":{"id":"batch_..."}}`, signed the Standard Webhooks way that `openai`'s `client.webhooks.unwrap(body, headers,
secret=...)` verifies: headers `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, keyed with the base64-decoded part of a `whsec_...` secret.

Configured per tenant (settings `webhook` and `webhook_secret`):
    --webhook acme=https://hooks.acme.example/batch   --webhook-secret acme=whsec_...
    --webhook https://hooks.example/all               --webhook-secret whsec_...    (every other tenant)

Events are not sent by the runner: the database writes each one into an outbox in the same transaction as the
batch's terminal status, and `serve` delivers them (`webhooks_outbox.py`), retrying for hours. Every attempt carries
the same event id, so receivers can drop duplicates, and is signed afresh, because receivers reject signatures older
than five minutes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import hashlib
import hmac
import random
import secrets
import time
from collections.abc import Iterable

import httpx
import msgspec
import structlog

from batch_gateway.wire import BatchStatus

log = structlog.get_logger("webhooks")

# Batch status reached -> event type sent.
EVENT_TYPES: dict[str, str] = {
    BatchStatus.COMPLETED: "batch.completed",
    BatchStatus.FAILED: "batch.failed",
    BatchStatus.EXPIRED: "batch.expired",
    BatchStatus.CANCELLED: "batch.cancelled",
}
# Extensions (not OpenAI's): sent while a batch runs, with the same body and signature as the others.
EXTENSION_EVENT_TYPES = ("batch.deadline_unreachable",)  # even the engine's whole batch share cannot end it in time
ALL_TENANTS = "*"  # the key of the webhook that serves every tenant without its own
SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16
USER_AGENT = "batch-gateway-webhooks"


class WebhookConfig(msgspec.Struct, frozen=True):
    url: str
    secret: str  # whsec_<base64>

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"WebhookConfig(url={self.url!r}, secret='whsec_***')"


class EventData(msgspec.Struct):
    id: str


class WebhookEvent(msgspec.Struct, kw_only=True):
    """OpenAI's event object, fields in OpenAI's order."""

    id: str
    object: str = "event"
    type: str
    created_at: int
    data: EventData


# --- configuration -------------------------------------------------------------------------------


def parse_webhooks(urls: Iterable[str], secret_values: Iterable[str]) -> dict[str, WebhookConfig]:
    """Webhooks by tenant from the `webhook` (`[TENANT=]URL`) and `webhook_secret` (`[TENANT=]whsec_...`) settings.

    A value without `TENANT=` is keyed `*` and serves every tenant without a webhook of its own. Every webhook needs
    a secret (its own, or the `*` one): OpenAI-compatible receivers reject unsigned events. Raises ValueError.
    """
    url_by_tenant: dict[str, str] = {}
    for item in urls:
        tenant, url = _split(item, "--webhook", looks_bare=item.startswith(("http://", "https://")))
        if tenant in url_by_tenant:
            raise ValueError(f"--webhook: tenant {tenant!r} has two webhook URLs")
        url_by_tenant[tenant] = _check_url(url, tenant)
    secret_by_tenant: dict[str, str] = {}
    for item in secret_values:
        tenant, given = _split(item, "--webhook-secret", looks_bare=item.startswith(SECRET_PREFIX))
        if tenant in secret_by_tenant:
            raise ValueError(f"--webhook-secret: tenant {tenant!r} has two secrets")
        secret_by_tenant[tenant] = _check_secret(given, tenant)

    configs: dict[str, WebhookConfig] = {}
    for tenant, url in url_by_tenant.items():
        secret = secret_by_tenant.get(tenant) or secret_by_tenant.get(ALL_TENANTS)
        if secret is None:
            who = f"{tenant}=" if tenant != ALL_TENANTS else ""
            raise ValueError(
                f"webhook {_label(tenant)} has no secret: add --webhook-secret {who}whsec_... "
                "(make one with `python -c 'from batch_gateway import webhooks; print(webhooks.generate_secret())'`)"
            )
        configs[tenant] = WebhookConfig(url=url, secret=secret)
    for tenant in secret_by_tenant.keys() - url_by_tenant.keys():
        if tenant != ALL_TENANTS:
            raise ValueError(f"--webhook-secret for tenant {tenant!r} but no --webhook {tenant}=URL")
    return configs


def webhook_for(configs: dict[str, WebhookConfig], tenant: str) -> WebhookConfig | None:
    return configs.get(tenant) or configs.get(ALL_TENANTS)


def generate_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _split(item: str, flag: str, *, looks_bare: bool) -> tuple[str, str]:
    if looks_bare:
        return ALL_TENANTS, item
    tenant, sep, value = item.partition("=")
    tenant = tenant.strip()
    if not sep or not tenant or not value or any(c.isspace() for c in tenant):
        shown = tenant if sep else "..."  # never echo what may be a secret
        raise ValueError(f"{flag} {shown}=...: expected TENANT=VALUE, or a bare value for every tenant")
    return tenant, value.strip()


def _check_url(url: str, tenant: str) -> str:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"webhook {_label(tenant)}: invalid URL {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"webhook {_label(tenant)}: {url!r} is not an http(s) URL")
    return url


def _check_secret(secret: str, tenant: str) -> str:
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"webhook secret {_label(tenant)}: must look like whsec_<base64>")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"webhook secret {_label(tenant)}: the part after whsec_ is not valid base64") from exc
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(
            f"webhook secret {_label(tenant)}: too short ({len(key)} bytes; use at least {MIN_SECRET_BYTES})"
        )
    return secret


def _label(tenant: str) -> str:
    return "for every tenant" if tenant == ALL_TENANTS else f"for tenant {tenant!r}"


# --- events and signatures -----------------------------------------------------------------------


def build_event(
    event_type: str, batch_id: str, *, created_at: int | None = None, event_id: str | None = None
) -> WebhookEvent:
    """The event for a batch that reached a terminal status (or an extension event); `created_at` is when it did
    (default: now)."""
    known = sorted([*EVENT_TYPES.values(), *EXTENSION_EVENT_TYPES])
    if event_type not in known:
        raise ValueError(f"unknown batch event type {event_type!r}; expected one of {known}")
    return WebhookEvent(
        id=event_id or "evt_" + secrets.token_hex(16),
        type=event_type,
        created_at=int(time.time()) if created_at is None else created_at,
        data=EventData(id=batch_id),
    )


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    key = base64.b64decode(secret[len(SECRET_PREFIX) :]) if secret.startswith(SECRET_PREFIX) else secret.encode()
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(secret: str, webhook_id: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


# --- one delivery attempt -----------------------------------------------------------------------


class Attempt(msgspec.Struct, frozen=True):
    """What one POST of an event came to."""

    delivered: bool  # the receiver answered 2xx
    outcome: str  # "HTTP 503", "ConnectTimeout: ...", for logs and the outbox's last_error
    retry_after: float | None = None  # seconds the receiver asked us to wait


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header (seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, *, base_delay: float, max_delay: float, retry_after: float | None = None) -> float:
    """Seconds before attempt `attempt + 1`: the server's Retry-After if it sent one, else exponential backoff with
    jitter (50-100 % of base * 2^(attempt-1)) so many gateways do not retry in step; never more than max_delay."""
    if retry_after is not None:
        return min(retry_after, max_delay)
    return min(max_delay, base_delay * 2 ** min(attempt - 1, 60)) * random.uniform(0.5, 1.0)


async def post_event(http: httpx.AsyncClient, config: WebhookConfig, event: WebhookEvent, *, timeout: float) -> Attempt:
    """POST the event once, signed now. `timeout` bounds the whole attempt, however slowly the receiver answers."""
    body = msgspec.json.encode(event)
    try:
        async with asyncio.timeout(timeout):
            response = await http.post(
                config.url, content=body, headers=signed_headers(config.secret, event.id, body), timeout=timeout
            )
    except TimeoutError:
        return Attempt(False, f"no answer within {timeout:g} s")
    except httpx.HTTPError as exc:  # connection refused or reset, protocol errors
        return Attempt(False, f"{type(exc).__name__}: {exc}")
    outcome = f"HTTP {response.status_code}"
    if response.is_success:
        return Attempt(True, outcome)
    return Attempt(False, outcome, parse_retry_after(response.headers.get("retry-after")))
