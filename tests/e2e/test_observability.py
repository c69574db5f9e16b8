"""Metrics on the API, and partial results while a batch runs."""

from __future__ import annotations

import io
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import chat_lines, eventually, jsonl, wait_for

pytestmark = pytest.mark.e2e


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_api_metrics_count_requests_batches_and_bytes(gateway, client):
    file = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(4))), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(client, batch.id)
    text = httpx.get(f"http://127.0.0.1:{gateway.port}/metrics").text
    values = samples(text)
    assert values[("batch_gateway_batches", (("status", "completed"),))] == 1
    assert values[("batch_gateway_files", (("purpose", "batch"),))] == 1
    assert values[("batch_gateway_file_bytes", (("purpose", "batch"),))] == file.bytes
    assert values[("batch_gateway_files", (("purpose", "batch_output"),))] == 1
    created = ("batch_gateway_http_requests_total", (("method", "POST"), ("route", "/v1/batches"), ("status", "200")))
    assert values[created] == 1
    polled = [
        v
        for (name, labels), v in values.items()
        if name == "batch_gateway_http_requests_total" and ("route", "/v1/batches/{batch_id}") in labels
    ]
    assert sum(polled) >= 1  # route templates, not one series per batch id
    assert not any(batch.id in str(key) for key in values)


def test_partial_results_stream_while_the_batch_runs(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=1.0, max_num_seqs=4)
    gateway = gateway_factory(
        sim.url, env={"BATCH_GATEWAY_FIXED_CONCURRENCY": "4", "BATCH_GATEWAY_CHECKPOINT_INTERVAL": "0.3"}
    )
    client = gateway.client()
    file = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(80, max_tokens=16))), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    url = f"{gateway.base_url}/batches/{batch.id}/partial_results"
    partial: list[dict] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        current = client.batches.retrieve(batch.id)
        lines = jsonl(httpx.get(url, headers={"authorization": "Bearer x"}).content)
        if current.status == "in_progress" and 0 < len(lines) < 80:
            partial = lines
            break
        time.sleep(0.2)
    assert partial, "no partial results were seen while the batch ran"
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in partial)
    assert len({line["custom_id"] for line in partial}) == len(partial)
    done = wait_for(client, batch.id, timeout=90)
    final = {line["custom_id"]: line for line in jsonl(client.files.content(done.output_file_id).content)}
    assert all(final[line["custom_id"]] == line for line in partial)
    after = jsonl(httpx.get(url, headers={"authorization": "Bearer x"}).content)
    assert len(after) == 80  # once terminal: the output file
    assert httpx.get(f"{gateway.base_url}/batches/batch_nope/partial_results").status_code == 404


def test_run_stats_and_runner_metrics(gateway_factory, sim_factory):
    from tests.helpers import free_port

    sim = sim_factory(time_scale=1.0, max_num_seqs=4)
    port = free_port()
    gateway = gateway_factory(sim.url, env={"BATCH_GATEWAY_RUNNER_METRICS_PORT": str(port)})
    client = gateway.client()
    file = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(40, systems=2, max_tokens=16))), purpose="batch")
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")

    def runner_metrics() -> dict | None:
        try:
            scraped = {name: v for (name, _), v in samples(httpx.get(f"http://127.0.0.1:{port}/metrics").text).items()}
        except httpx.HTTPError:
            return None  # the runner has not started serving them yet
        return scraped if "batch_runner_tokens_total" in scraped else None

    scraped = eventually(runner_metrics, timeout=30, interval=0.1, what="the runner's metrics")
    assert scraped.get("batch_runner_concurrency_limit", 0) >= 1, "the runner served no metrics while it ran"
    done = wait_for(client, batch.id, timeout=60)
    stats = httpx.get(f"{gateway.base_url}/batches/{batch.id}/run_stats", headers={"authorization": "Bearer x"}).json()
    assert stats["completed"] == 40 and stats["ended"] == "completed"
    assert stats["prefix_cache_hit_rate"] == done.usage.input_tokens_details.cached_tokens / done.usage.input_tokens
    (endpoint,) = stats["endpoints"].values()
    assert endpoint["limit"] >= 1
