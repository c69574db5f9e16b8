"""Delivers webhook events from the outbox: a background task of `serve`, never the runner.

The database writes one event per batch that reaches a terminal status, in the same transaction as the status change
(a trigger on `batches`), so an event survives any crash: of the runner right after the change, of `serve` while it
delivers, of the receiver for hours. This loop claims due events with a lease, POSTs each one signed, and then marks
it delivered or schedules the next attempt with exponential backoff and jitter (honouring `Retry-After`). Every
non-2xx answer is retried, as OpenAI does, until `retry_for` seconds after the batch ended; then the event is given up
with an error log. Events of tenants without a webhook are dropped quietly.

Several `serve` replicas on one database each run this loop: a claim takes an event for `lease_seconds`, so two
replicas never send it at the same time, and one whose replica died is taken again when its lease runs out. A
receiver may still get an event twice (a replica killed after the receiver answered but before the event was marked
delivered); the event id is the same, so it can drop the duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import structlog

from batch_gateway import ids
from batch_gateway.errors import StorageUnavailable
from batch_gateway.store.metadata import MetadataStore, WebhookEventRecord, WebhookState
from batch_gateway.webhooks import WebhookConfig, backoff_delay, build_event, post_event, webhook_for

log = structlog.get_logger("webhooks")

MAX_ERROR_CHARS = 500  # of the last error kept in the outbox row


class WebhookOutbox:
    def __init__(
        self,
        metadata: MetadataStore,
        configs: dict[str, WebhookConfig],
        *,
        timeout: float = 10.0,
        retry_for: float = 72 * 3600.0,
        base_delay: float = 1.0,
        max_delay: float = 600.0,
        poll_interval: float = 1.0,
        concurrency: int = 16,
        lease_seconds: float | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        """`timeout` bounds one attempt; the lease outlasts it, so an event is never taken from a live attempt.
        `concurrency` attempts run at once, so a few hung receivers do not hold up everyone else's events."""
        self.metadata = metadata
        self.configs = configs
        self.timeout = timeout
        self.retry_for = retry_for
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.poll_interval = poll_interval
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds if lease_seconds is not None else 2 * timeout + 5.0
        self._client = client
        self._unavailable = False  # the database did not answer the last claim

    async def run(self) -> None:
        """Deliver events until cancelled."""
        in_flight: set[asyncio.Task] = set()
        async with self._http() as http:
            try:
                while True:
                    free = self.concurrency - len(in_flight)
                    claimed = await self._claim(free) if free > 0 else []
                    for event in claimed:
                        task = asyncio.create_task(self._deliver(http, event))
                        in_flight.add(task)
                        task.add_done_callback(in_flight.discard)
                    if free == 0:  # every slot busy (slow receivers): go on as soon as one is free
                        await asyncio.wait(in_flight, timeout=self.poll_interval, return_when=asyncio.FIRST_COMPLETED)
                    elif len(claimed) < free:  # nothing more is due: poll again later
                        await asyncio.sleep(self.poll_interval)
            finally:
                for task in in_flight:
                    task.cancel()  # their events are taken again when the lease runs out
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def deliver_due(self) -> int:
        """One round: claim what is due and wait for each attempt. Returns how many events were attempted."""
        async with self._http() as http:
            claimed = await self._claim(self.concurrency)
            await asyncio.gather(*(self._deliver(http, event) for event in claimed))
        return len(claimed)

    def _http(self) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
        if self._client is not None:
            return contextlib.nullcontext(self._client)  # the caller's client: used, not closed
        return httpx.AsyncClient()

    async def _claim(self, limit: int) -> list[WebhookEventRecord]:
        try:
            claimed = await self.metadata.claim_webhook_events(time.time(), self.lease_seconds, limit)
        except StorageUnavailable as exc:
            if not self._unavailable:  # once per outage, not at every poll
                log.warning("webhook.outbox_unavailable", error=str(exc))
            self._unavailable = True
            return []
        except Exception:
            log.exception("webhook.claim_failed")  # a bug must not end delivery for good: try again next round
            return []
        if self._unavailable:
            log.info("webhook.outbox_available")
            self._unavailable = False
        return claimed

    async def _deliver(self, http: httpx.AsyncClient, event: WebhookEventRecord) -> None:
        config = webhook_for(self.configs, event.tenant)
        bound = log.bind(event_id=event.id, event_type=event.type, batch_id=event.batch_id, tenant=event.tenant)
        try:
            if config is None:
                await self.metadata.finish_webhook_event(event.id, WebhookState.DROPPED, ids.now())
                return
            body = build_event(event.type, event.batch_id, created_at=event.created_at, event_id=event.id)
            attempt = await post_event(http, config, body, timeout=self.timeout)
            if attempt.delivered:
                await self.metadata.finish_webhook_event(event.id, WebhookState.DELIVERED, ids.now())
                bound.info("webhook.delivered", attempt=event.attempts, outcome=attempt.outcome)
                return
            delay = backoff_delay(
                event.attempts, base_delay=self.base_delay, max_delay=self.max_delay, retry_after=attempt.retry_after
            )
            error = attempt.outcome[:MAX_ERROR_CHARS]
            if time.time() + delay > event.created_at + self.retry_for:
                await self.metadata.finish_webhook_event(event.id, WebhookState.FAILED, ids.now(), error)
                bound.error("webhook.gave_up", attempts=event.attempts, outcome=attempt.outcome, url=config.url)
                return
            await self.metadata.reschedule_webhook_event(event.id, time.time() + delay, error)
            bound.warning("webhook.retry", attempt=event.attempts, outcome=attempt.outcome, delay=round(delay, 3))
        except StorageUnavailable as exc:
            # The event stays claimed: it is tried again (with the same id) when the lease runs out.
            bound.warning("webhook.outbox_unavailable", error=str(exc))
        except Exception:
            bound.exception("webhook.delivery_failed")
