"""Deadline-aware admission through the real `serve` (local executor), two tenants' keys and the simulator: the order
waiting batches start in, what a waiting batch shows (status, run_stats, metrics), and a running batch's forecast."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import chat_lines, wait_for

pytestmark = pytest.mark.e2e

ENDPOINT = "/v1/chat/completions"


def run_stats(gateway, key: str, batch_id: str) -> dict:
    response = httpx.get(f"{gateway.base_url}/batches/{batch_id}/run_stats", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def gauges(gateway, name: str) -> dict[str, float]:
    text = httpx.get(gateway.base_url.removesuffix("/v1") + "/metrics").text
    return {
        sample.labels["batch_id"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def log_events(gateway) -> list[dict]:
    events = []
    for line in gateway.logs().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def until(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_waiting_batches_start_by_deadline_within_fair_shares_and_show_where_they_stand(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=1.0, max_num_seqs=4)
    gateway = gateway_factory(
        sim.url,
        env={
            "BATCH_GATEWAY_AUTH": "keys",
            "BATCH_GATEWAY_MAX_CONCURRENT_RUNNERS": "1",
            "BATCH_GATEWAY_COMPLETION_WINDOWS": "1h,24h",
        },
    )
    keys = {tenant: gateway.cli("keys", "create", "--tenant", tenant).stdout.strip() for tenant in ("acme", "globex")}
    acme, globex = gateway.client(keys["acme"]), gateway.client(keys["globex"])

    def submit(client, lines: int, window: str = "24h"):
        file = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(lines, max_tokens=16))), purpose="batch")
        return client.batches.create(input_file_id=file.id, endpoint=ENDPOINT, completion_window=window)

    first = submit(acme, 400)  # about twenty seconds on the one slot
    wait_for(acme, first.id, statuses=("in_progress",), timeout=30)
    second, third = submit(acme, 20), submit(acme, 20)  # acme floods the queue...
    theirs = submit(globex, 20)  # ...globex's one batch comes after, with the same window...
    urgent = submit(acme, 20, "1h")  # ...and acme's tight one last
    assert (urgent.completion_window, urgent.expires_at - urgent.created_at) == ("1h", 3600)

    # Waiting is `validating` with nothing done, as at OpenAI; run_stats and /metrics tell where each one stands.
    for batch, client in ((second, acme), (third, acme), (theirs, globex), (urgent, acme)):
        waiting = client.batches.retrieve(batch.id)
        assert waiting.status == "validating" and waiting.request_counts.total == 0
    expected = {theirs.id: 1, urgent.id: 2, second.id: 3, third.id: 4}  # globex's turn, then acme by deadline
    assert until(lambda: gauges(gateway, "batch_gateway_batch_queue_position") == expected)
    stats = until(lambda: (s := run_stats(gateway, keys["globex"], theirs.id))["queue"]["projected_start_at"] and s)
    # (the first batch's runner has made a forecast, and the next admission pass has read it)
    assert stats["queue"]["position"] == 1 and stats["status"] == "validating"
    assert first.created_at < stats["queue"]["projected_start_at"] < first.created_at + 300
    running = run_stats(gateway, keys["acme"], first.id)
    assert running["queue"] is None and running["deadline"]["remaining"] < 400
    assert running["deadline"]["projected_end_at"] > time.time() - 5 and running["deadline"]["at_risk"] is False
    assert first.id in gauges(gateway, "batch_gateway_batch_projected_completion_timestamp_seconds")
    assert gauges(gateway, "batch_gateway_batch_deadline_at_risk")[first.id] == 0

    for batch, client in ((first, acme), (second, acme), (third, acme), (theirs, globex), (urgent, acme)):
        assert wait_for(client, batch.id, timeout=120).status == "completed"
    started = [event["batch_id"] for event in log_events(gateway) if event.get("event") == "executor.runner_started"]
    assert started == [first.id, theirs.id, urgent.id, second.id, third.id]  # FIFO: first, second, third, theirs...
    final = run_stats(gateway, keys["acme"], urgent.id)
    assert final["deadline"]["expires_at"] == urgent.expires_at and final["deadline"]["unreachable"] is False
