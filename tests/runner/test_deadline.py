"""A runner's deadline (runner/deadline.py): the weight it asks for on the board, its forecast, its flags."""

from __future__ import annotations

import asyncio

import pytest
import structlog
from structlog.testing import capture_logs

from batch_gateway import ids
from batch_gateway.runner.deadline import UNREACHABLE_EVENT, DeadlineTracker, unreachable_event_id
from batch_gateway.runner.share import allocate
from batch_gateway.store.metadata import BatchRecord, RunnerLoad, TenantPolicy
from batch_gateway.store.sqlite import SqliteStore

NOW = 1_700_000_000


def batch_record(tenant: str = "acme", window: int = 100) -> BatchRecord:
    return BatchRecord(
        id=ids.new_batch_id(),
        tenant=tenant,
        endpoint="/v1/chat/completions",
        input_file_id="file-x",
        completion_window="24h",
        status="in_progress",
        created_at=NOW,
        expires_at=NOW + window,
    )


def peer(owner: str, weight: float = 1.0, limit: int = 10, tenant: str = "other") -> RunnerLoad:
    return RunnerLoad(owner, inflight=limit, limit=limit, demand=1000, completed=0, weight=weight, tenant=tenant)


def tracker(batch: BatchRecord | None = None) -> DeadlineTracker:
    return DeadlineTracker(None, batch or batch_record(), structlog.get_logger("test"))  # type: ignore[arg-type]


def test_a_runner_that_would_miss_its_deadline_asks_for_the_share_it_needs_and_gets_it():
    peers = [peer("b"), peer("c"), peer("d")]  # four runners of 10 requests in flight each: 40 in all
    # 1000 requests left, 1 s each, 40 s left: 25 in flight needed, 62.5% of the batch share (an equal share is 25%).
    weight = tracker().weight(NOW + 60, remaining=1000, service_time=1.0, limit=10, peers=peers)
    mine = allocate(40, [1000] * 4, [weight, 1.0, 1.0, 1.0])[0]
    assert 25 <= mine <= 40 * 0.9  # its need, with a margin, and never all of it
    equal = DeadlineTracker(None, batch_record(), structlog.get_logger("test"), shares=False)  # type: ignore[arg-type]
    assert equal.weight(NOW + 60, remaining=1000, service_time=1.0, limit=10, peers=peers) == 1.0
    # One with slack keeps its fair weight, and so yields the rest to it.
    assert tracker(batch_record(window=86400)).weight(NOW, remaining=1000, service_time=1.0, limit=10, peers=peers) == 1


def test_a_tenants_runners_on_one_engine_share_its_weight():
    slack = tracker(batch_record(tenant="acme", window=86400))
    slack.tenant_weight = 2.0
    peers = [peer("b", tenant="acme"), peer("c", tenant="acme"), peer("d", tenant="globex")]
    assert slack.weight(NOW, remaining=10, service_time=1.0, limit=10, peers=peers) == pytest.approx(2 / 3)
    assert slack.weight(NOW, remaining=10, service_time=1.0, limit=10, peers=[]) == 2.0


async def test_forecast_flags_and_the_unreachable_event(tmp_path):
    store = SqliteStore(str(tmp_path / "metadata.sqlite3"))
    await store.open()
    batch = batch_record(window=100)
    await store.insert_batch(batch)
    await store.set_tenant_policy("acme", TenantPolicy(weight=3.0))
    deadline = DeadlineTracker(store, batch, structlog.get_logger("test"))
    peers = [peer("b")]
    try:
        with capture_logs() as logs:
            # 10 results a second, 2000 requests left: it would end 200 s after it started, its window is 100 s.
            for step in range(40):
                now = NOW + step * 0.5
                deadline.progress(now, done=5 * step, remaining=2000 - 5 * step)
                deadline.weight(now, remaining=2000 - 5 * step, service_time=2.0, limit=10, peers=peers)
                await asyncio.sleep(0)
            await deadline.close()
        forecast = deadline.forecast(NOW + 19.5)
        assert forecast.projected_end_at == pytest.approx(NOW + 19.5 + 1805 / 10, abs=1)
        assert forecast.at_risk and forecast.unreachable  # it needs 1805 × 2 s / 80 s = 45 in flight, of 20
        events = [e["event"] for e in logs]
        assert events.count("runner.deadline_at_risk") == 1 and events.count("runner.deadline_unreachable") == 1
        first_risk = next(e for e in logs if e["event"] == "runner.deadline_at_risk")
        assert first_risk["log_level"] == "warning" and first_risk["expires_at"] == NOW + 100
        saved = (await store.forecasts([batch.id]))[batch.id]
        assert saved.unreachable and saved.at_risk and saved.need_share > 1
        assert deadline.tenant_weight == 3.0  # read from the tenant's policy
        (event,) = await store.claim_webhook_events(now=NOW + 100, lease_seconds=30, limit=10)
        assert (event.id, event.type, event.batch_id) == (unreachable_event_id(batch.id), UNREACHABLE_EVENT, batch.id)

        # Before the warm-up (10 s and 20 results), nothing is flagged, whatever the pace says.
        early = DeadlineTracker(store, batch_record(window=100), structlog.get_logger("test"))
        with capture_logs() as logs:
            for step in range(10):
                early.progress(NOW + step * 0.5, done=step, remaining=2000)
                early.weight(NOW + step * 0.5, remaining=2000, service_time=2.0, limit=10, peers=peers)
            await early.close()
        assert not early.forecast(NOW + 5).at_risk and not early.unreachable and logs == []
    finally:
        await store.close()
