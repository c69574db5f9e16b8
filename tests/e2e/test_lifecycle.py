"""A batch from upload to results, through the real server, runner processes and simulator, with the openai SDK."""

from __future__ import annotations

import io

import openai
import pytest

from tests.helpers import chat_lines, eventually, jsonl, wait_for

pytestmark = pytest.mark.e2e

BATCH_KEYS = {
    "id",
    "object",
    "endpoint",
    "model",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "usage",
    "metadata",
}


def upload(client, data: bytes, name: str = "input.jsonl"):
    return client.files.create(file=(name, io.BytesIO(data)), purpose="batch")


def test_batch_completes_with_every_line_once(client):
    data = chat_lines(40, systems=5)
    input_file = upload(client, data)
    batch = client.batches.create(
        input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "e2e"}
    )
    assert batch.status == "validating"
    assert batch.request_counts.total == 0
    assert batch.expires_at == batch.created_at + 86400

    done = wait_for(client, batch.id)
    assert done.status == "completed", done
    assert set(done.model_dump().keys()) >= BATCH_KEYS
    assert done.model == "sim-model"
    assert done.request_counts.total == 40 and done.request_counts.completed == 40 and done.request_counts.failed == 0
    assert done.error_file_id is None
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(done, stamp) is not None, stamp
    assert done.failed_at is None and done.cancelled_at is None
    assert done.metadata == {"run": "e2e"}
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens

    output = client.files.content(done.output_file_id).content
    lines = jsonl(output)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(40))
    for line in lines:
        assert line["error"] is None
        assert line["id"].startswith("batch_req_")
        assert line["response"]["status_code"] == 200
        assert isinstance(line["response"]["body"], dict)
        assert line["response"]["body"]["object"] == "chat.completion"
    assert sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in lines) == done.usage.input_tokens

    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.bytes == len(output)
    assert out_file.expires_at is None  # results are kept until deleted (unless output_expires_after says otherwise)
    assert done.output_file_id in {f.id for f in client.files.list(purpose="batch_output")}


def test_output_expires_after_is_honoured(client):
    input_file = upload(client, chat_lines(2))
    batch = client.batches.create(
        input_file_id=input_file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"output_expires_after": {"anchor": "created_at", "seconds": 7200}},
    )
    done = wait_for(client, batch.id)
    out_file = client.files.retrieve(done.output_file_id)
    assert out_file.expires_at == out_file.created_at + 7200


def test_validation_failure_reports_every_bad_line(client):
    good = chat_lines(3).splitlines()
    bad_url = good[1].replace(b"/v1/chat/completions", b"/v1/embeddings")
    streaming = good[2].replace(b'"max_tokens": 8', b'"max_tokens": 8, "stream": true')
    data = b"\n".join([good[0], b"{not json", bad_url, streaming, good[0]]) + b"\n"
    batch = client.batches.create(
        input_file_id=upload(client, data).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(client, batch.id)
    assert done.status == "failed"
    assert done.failed_at is not None and done.in_progress_at is None
    assert done.output_file_id is None and done.error_file_id is None
    got = sorted((e.code, e.line, e.param) for e in done.errors.data)
    assert got == [
        ("duplicate_custom_id", 5, "custom_id"),
        ("invalid_json_line", 2, None),
        ("invalid_url", 3, "url"),
        ("streaming_unsupported", 4, "body.stream"),
    ]


def test_unknown_model_fails_validation(gateway_factory, sim):
    gateway = gateway_factory(f"sim-model={sim.url}")
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, chat_lines(2, model="gpt-nope")).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = wait_for(client, batch.id)
    assert done.status == "failed"
    assert [(e.code, e.param, e.line) for e in done.errors.data] == [("model_not_found", "body.model", 1)]


def test_partial_failures_go_to_the_error_file(gateway_factory, sim_factory):
    sim = sim_factory(error_rate_500=0.4, seed=7)
    gateway = gateway_factory(sim.url, env={"BATCH_GATEWAY_MAX_ATTEMPTS": "1"})
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, chat_lines(30)).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(client, batch.id)
    assert done.status == "completed"
    counts = done.request_counts
    assert counts.failed > 0 and counts.completed > 0 and counts.completed + counts.failed == 30
    errors = jsonl(client.files.content(done.error_file_id).content)
    outputs = jsonl(client.files.content(done.output_file_id).content)
    assert len(errors) == counts.failed and len(outputs) == counts.completed
    assert {e["custom_id"] for e in errors}.isdisjoint({o["custom_id"] for o in outputs})
    for line in errors:
        assert line["error"] is None
        assert line["response"]["status_code"] == 500
        assert "error" in line["response"]["body"]


def test_all_requests_failing_still_completes_with_null_output(gateway_factory, sim_factory):
    sim = sim_factory(error_rate_500=1.0)
    gateway = gateway_factory(sim.url, env={"BATCH_GATEWAY_MAX_ATTEMPTS": "1"})
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, chat_lines(5)).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(client, batch.id)
    assert done.status == "completed"
    assert done.output_file_id is None and done.error_file_id is not None
    assert done.request_counts.failed == 5


def test_cancel_mid_run_keeps_finished_results(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=1.0, max_num_seqs=2)
    gateway = gateway_factory(sim.url, env={"BATCH_GATEWAY_FIXED_CONCURRENCY": "2"})
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, chat_lines(200, max_tokens=20)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    running = wait_for(client, batch.id, statuses={"in_progress"})
    wait_until_some_done(client, batch.id)
    cancelling = client.batches.cancel(running.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_for(client, batch.id, timeout=30)
    assert done.status == "cancelled"
    assert done.cancelling_at is not None and done.cancelled_at is not None and done.completed_at is None
    counts = done.request_counts
    assert counts.total == 200 and 0 < counts.completed < 200
    outputs = jsonl(client.files.content(done.output_file_id).content)
    errors = jsonl(client.files.content(done.error_file_id).content)
    assert len(outputs) == counts.completed
    assert len(outputs) + len(errors) == 200
    assert {o["custom_id"] for o in outputs} | {e["custom_id"] for e in errors} == {f"req-{i}" for i in range(200)}
    assert {e["error"]["code"] for e in errors if e["response"] is None} == {"batch_cancelled"}
    # Cancelling again is fine; the SDK gets the batch back.
    assert client.batches.cancel(batch.id).status == "cancelled"


def wait_until_some_done(client, batch_id: str) -> None:
    eventually(
        lambda: client.batches.retrieve(batch_id).request_counts.completed >= 2,
        timeout=30,
        interval=0.1,
        what=f"requests of {batch_id} to complete",
    )


def test_cancel_of_finished_batch_is_409_without_retry(client):
    batch = client.batches.create(
        input_file_id=upload(client, chat_lines(1)).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_for(client, batch.id)
    with pytest.raises(openai.ConflictError) as caught:
        client.batches.cancel(batch.id)
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_expiry_keeps_partial_results(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=1.0, max_num_seqs=2)
    gateway = gateway_factory(
        sim.url, env={"BATCH_GATEWAY_FIXED_CONCURRENCY": "2", "BATCH_GATEWAY_COMPLETION_WINDOW_SECONDS": "4"}
    )
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, chat_lines(300, max_tokens=20)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    assert batch.expires_at == batch.created_at + 4
    done = wait_for(client, batch.id, timeout=40)
    assert done.status == "expired", done
    assert done.expired_at is not None
    counts = done.request_counts
    assert counts.total == 300 and counts.completed > 0
    outputs = jsonl(client.files.content(done.output_file_id).content)
    errors = jsonl(client.files.content(done.error_file_id).content)
    assert len(outputs) + len(errors) == 300
    assert {e["error"]["code"] for e in errors if e["response"] is None} == {"batch_expired"}


def test_live_request_counts_while_running(gateway_factory, sim_factory):
    sim = sim_factory(time_scale=1.0, max_num_seqs=4)
    gateway = gateway_factory(sim.url, env={"BATCH_GATEWAY_FIXED_CONCURRENCY": "4"})
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, chat_lines(60, max_tokens=16)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    seen = set()
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        current = client.batches.retrieve(batch.id)
        if current.status == "in_progress":
            seen.add(current.request_counts.completed)
        if current.status in ("completed", "failed"):
            break
        time.sleep(0.2)
    assert current.status == "completed"
    assert len(seen) >= 3, f"counts were not live: {sorted(seen)}"


def test_server_crash_resumes_batches(gateway_factory, sim_factory, tmp_path):
    sim = sim_factory(time_scale=1.0, max_num_seqs=4)
    env = {"BATCH_GATEWAY_FIXED_CONCURRENCY": "4", "BATCH_GATEWAY_RUNNER_LEASE_SECONDS": "3"}
    gateway = gateway_factory(sim.url, env=env)
    client = gateway.client()
    batch = client.batches.create(
        input_file_id=upload(client, chat_lines(80, max_tokens=12)).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    wait_until_some_done(client, batch.id)
    gateway.kill()  # server and runner die with SIGKILL
    gateway.start()  # same data directory: the batch is found unfinished and resumed
    done = wait_for(gateway.client(), batch.id, timeout=90)
    assert done.status == "completed"
    lines = jsonl(gateway.client().files.content(done.output_file_id).content)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(80))
