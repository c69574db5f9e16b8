"""OpenAI-compatible webhooks: `batch.completed`, `batch.failed`, `batch.expired` and `batch.cancelled` events.

The event body is OpenAI's, `{"id":"evt_...","object":"event","type":"batch.completed","created_at":...,
"data":{"id":"batch_..."}}`, signed the Standard Webhooks way that `openai`'s `client.webhooks.unwrap(body, headers,
secret=...)` verifies: headers `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, keyed with the base64-decoded part of a `whsec_...` secret.

Configured per tenant (settings `webhook` and `webhook_secret`):
    --webhook acme=https://hooks.acme.example/batch   --webhook-secret acme=whsec_...
    --webhook https://hooks.example/all               --webhook-secret whsec_...    (every other tenant)

Delivery retries connection errors, timeouts, 408, 429 and 5xx with jittered exponential backoff (honouring
`Retry-After`), keeping the same event id so receivers can drop duplicates. It re-signs each attempt with a fresh
timestamp, because receivers reject signatures older than five minutes.
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

log = structlog.get_logger("webhooks")

# Batch status reached -> event type sent.
EVENT_TYPES: dict[str, str] = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "expired": "batch.expired",
    "cancelled": "batch.cancelled",
}
ALL_TENANTS = "*"  # the key of the webhook that serves every tenant without its own
SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 16
RETRYABLE_STATUSES = frozenset({408, 429})  # and every 5xx
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
        tenant, secret = _split(item, "--webhook-secret", looks_bare=item.startswith(SECRET_PREFIX))
        if tenant in secret_by_tenant:
            raise ValueError(f"--webhook-secret: tenant {tenant!r} has two secrets")
        secret_by_tenant[tenant] = _check_secret(secret, tenant)

    configs: dict[str, WebhookConfig] = {}
    for tenant, url in url_by_tenant.items():
        secret = secret_by_tenant.get(tenant) or secret_by_tenant.get(ALL_TENANTS)
        if secret is None:
            who = f"{tenant}=" if tenant != ALL_TENANTS else ""
            raise ValueError(f"webhook {_label(tenant)} has no secret: add --webhook-secret {who}whsec_... "
                             "(make one with `python -c 'from batch_gateway import webhooks; print(webhooks.generate_secret())'`)")
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
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"webhook secret {_label(tenant)}: the part after whsec_ is not valid base64") from exc
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"webhook secret {_label(tenant)}: too short ({len(key)} bytes; use at least {MIN_SECRET_BYTES})")
    return secret


def _label(tenant: str) -> str:
    return "for every tenant" if tenant == ALL_TENANTS else f"for tenant {tenant!r}"


# --- events and signatures -----------------------------------------------------------------------


def build_event(event_type: str, batch_id: str, *, created_at: int | None = None, event_id: str | None = None) -> WebhookEvent:
    """The event for a batch that reached a terminal status; `created_at` is when it did (default: now)."""
    if event_type not in EVENT_TYPES.values():
        raise ValueError(f"unknown batch event type {event_type!r}; expected one of {sorted(EVENT_TYPES.values())}")
    return WebhookEvent(
        id=event_id or "evt_" + secrets.token_hex(16),
        type=event_type,
        created_at=int(time.time()) if created_at is None else created_at,
        data=EventData(id=batch_id),
    )


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`."""
    key = base64.b64decode(secret[len(SECRET_PREFIX):]) if secret.startswith(SECRET_PREFIX) else secret.encode()
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


# --- delivery ------------------------------------------------------------------------------------


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
    return min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


async def deliver(
    config: WebhookConfig,
    event_type: str,
    batch_id: str,
    *,
    client: httpx.AsyncClient | None = None,
    attempts: int = 5,
    created_at: int | None = None,
    base_delay: float = 1.0,
    max_delay: float = 60.0,
    timeout: float = 10.0,
) -> bool:
    """POST one signed event, retrying transient failures; True once the receiver answered 2xx.

    Gives up (logging `webhook.gave_up` or `webhook.rejected`) after `attempts` tries, or at once on a 4xx other
    than 408/429, which retrying cannot fix (wrong URL, receiver rejects the signature).
    """
    event = build_event(event_type, batch_id, created_at=created_at)
    body = msgspec.json.encode(event)
    bound = log.bind(event_id=event.id, event_type=event_type, batch_id=batch_id, url=config.url)
    own_client = client is None
    http = client if client is not None else httpx.AsyncClient()
    outcome = "not attempted"
    try:
        for attempt in range(1, attempts + 1):
            retry_after = None
            try:
                response = await http.post(
                    config.url, content=body, headers=signed_headers(config.secret, event.id, body), timeout=timeout
                )
            except httpx.HTTPError as exc:  # connection refused or reset, timeouts, protocol errors
                outcome = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    bound.info("webhook.delivered", attempt=attempt, status=response.status_code)
                    return True
                outcome = f"HTTP {response.status_code}"
                if response.status_code not in RETRYABLE_STATUSES and response.status_code < 500:
                    bound.error("webhook.rejected", attempt=attempt, status=response.status_code, body=response.text[:200])
                    return False
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            if attempt == attempts:
                break
            delay = backoff_delay(attempt, base_delay=base_delay, max_delay=max_delay, retry_after=retry_after)
            bound.warning("webhook.retry", attempt=attempt, outcome=outcome, delay=round(delay, 3))
            await asyncio.sleep(delay)
        bound.error("webhook.gave_up", attempts=attempts, outcome=outcome)
        return False
    finally:
        if own_client:
            await http.aclose()


async def notify(
    configs: dict[str, WebhookConfig],
    tenant: str,
    batch_id: str,
    status: str,
    *,
    created_at: int | None = None,
    client: httpx.AsyncClient | None = None,
) -> bool | None:
    """Send the event for a batch that reached `status`, if that tenant has a webhook and the status has an event.

    Returns None when there was nothing to send, else whether the receiver took it. Call it after the terminal
    status is stored (the event says the batch *is* completed), from a task that may take up to a minute or two.
    """
    event_type = EVENT_TYPES.get(status)
    config = webhook_for(configs, tenant)
    if event_type is None or config is None:
        return None
    return await deliver(config, event_type, batch_id, client=client, created_at=created_at)
