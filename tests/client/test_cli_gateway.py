"""The client CLI against a real `batch-gateway serve` and simulator: submit, watch, list, cancel, download, Ctrl-C.

The gateways are shared per module; the CLI runs in-process except where a signal must reach it (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from batch_gateway.sim import SimConfig, SimServer
from tests.e2e.conftest import FAST_SIM, Gateway
from tests.fixtures.processes import spawn, stop
from tests.helpers import chat_lines, jsonl, wait_for

pytestmark = pytest.mark.e2e


def start_gateway(data_dir: Path, sim: SimServer, env: dict[str, str] | None = None) -> Gateway:
    return Gateway(
        data_dir, {"BATCH_GATEWAY_UPSTREAM": sim.url, "BATCH_GATEWAY_GC_INTERVAL": "1", **(env or {})}, []
    ).start()


@pytest.fixture(scope="module")
def fast_gateway(tmp_path_factory) -> Iterator[Gateway]:
    """Batches of a few dozen requests finish in a second or two."""
    sim = SimServer(SimConfig(**FAST_SIM))
    sim.start()
    gateway = start_gateway(tmp_path_factory.mktemp("fast-gw"), sim)
    yield gateway
    gateway.stop()
    sim.stop()


@pytest.fixture(scope="module")
def slow_gateway(tmp_path_factory) -> Iterator[Gateway]:
    """Requests take real time (four at once), so a batch can be watched, interrupted and cancelled mid-run."""
    sim = SimServer(SimConfig(time_scale=1.0, max_num_seqs=4))
    sim.start()
    gateway = start_gateway(
        tmp_path_factory.mktemp("slow-gw"),
        sim,
        {"BATCH_GATEWAY_FIXED_CONCURRENCY": "4", "BATCH_GATEWAY_CHECKPOINT_INTERVAL": "0.3"},
    )
    yield gateway
    gateway.stop()
    sim.stop()


def write_input(tmp_path, data: bytes, name: str = "prompts.jsonl"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_submit_wait_downloads_the_results_next_to_the_input(fast_gateway, run_cli, tmp_path):
    path = write_input(tmp_path, chat_lines(20))
    result = run_cli(fast_gateway, "submit", str(path), "--wait", "--interval", "0.1", "--metadata", "run=cli")
    assert result.code == 0, result
    batch_id = result.out.splitlines()[0]
    assert batch_id.startswith("batch_")
    output = jsonl((tmp_path / "prompts.output.jsonl").read_bytes())
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(20))
    assert not (tmp_path / "prompts.errors.jsonl").exists()  # a clean batch has no error file
    assert f"Batch {batch_id} completed" in result.out
    assert "20 requests, 20 completed, 0 failed" in result.out
    assert "status: validating" in result.err or "status: in_progress" in result.err
    assert "in_progress -> " in result.err or "-> completed" in result.err
    assert "\r" not in result.err  # not a terminal: plain lines, no bar redraws
    batch = fast_gateway.client().batches.retrieve(batch_id)
    assert batch.metadata == {"run": "cli"} and batch.endpoint == "/v1/chat/completions"


def test_submit_wait_prints_validation_errors_and_exits_3(fast_gateway, run_cli, tmp_path):
    good = chat_lines(2).splitlines()
    path = write_input(tmp_path, b"\n".join([good[0], b"{not json", good[1]]) + b"\n")
    output = tmp_path / "out" / "results.jsonl"
    result = run_cli(fast_gateway, "submit", str(path), "--wait", "--interval", "0.1", "--output", str(output))
    assert result.code == 3, result
    assert "failed" in result.out
    assert "The input file did not validate:" in result.out
    assert "  line 2: invalid_json_line: " in result.out
    assert not output.exists()


def test_submit_json_then_batch_and_file_commands(fast_gateway, run_cli, tmp_path):
    path = write_input(tmp_path, chat_lines(6), name="six.jsonl")
    created = run_cli(fast_gateway, "submit", str(path), "--json", "--endpoint", "/v1/chat/completions")
    assert created.code == 0, created
    batch = json.loads(created.out)
    assert batch["object"] == "batch" and batch["status"] == "validating"
    batch_id = batch["id"]

    out, errs = tmp_path / "w.out.jsonl", tmp_path / "w.err.jsonl"
    watched = run_cli(
        fast_gateway, "batches", "watch", batch_id, "--interval", "0.1", "--output", str(out), "--errors", str(errs)
    )
    assert watched.code == 0, watched
    assert len(jsonl(out.read_bytes())) == 6

    got = run_cli(fast_gateway, "batches", "get", batch_id, "--json")
    done = json.loads(got.out)
    assert done["id"] == batch_id and done["status"] == "completed" and done["request_counts"]["completed"] == 6
    human = run_cli(fast_gateway, "batches", "get", batch_id)
    assert re.search(rf"^id +{batch_id}$", human.out, re.M) and "6 total, 6 completed, 0 failed" in human.out

    listed = run_cli(fast_gateway, "batches", "list", "--limit", "100")
    assert listed.out.splitlines()[0].split() == [
        "ID",
        "STATUS",
        "CREATED",
        "DONE",
        "FAILED",
        "TOTAL",
        "ENDPOINT",
        "METADATA",
    ]
    row = next(line for line in listed.out.splitlines() if line.startswith(batch_id))
    assert row.split()[1] == "completed"
    assert batch_id in {b["id"] for b in json.loads(run_cli(fast_gateway, "batches", "list", "--json").out)["data"]}

    files = json.loads(run_cli(fast_gateway, "files", "list", "--purpose", "batch_output", "--json").out)["data"]
    assert done["output_file_id"] in {f["id"] for f in files}
    table = run_cli(fast_gateway, "files", "list")
    assert done["input_file_id"] in table.out and "six.jsonl" in table.out

    target = tmp_path / "downloaded.jsonl"
    downloaded = run_cli(fast_gateway, "files", "download", done["output_file_id"], "-o", str(target))
    assert downloaded.code == 0 and target.read_bytes() == out.read_bytes()
    to_stdout = run_cli(fast_gateway, "files", "download", done["input_file_id"], "-o", "-")
    assert to_stdout.out.encode() == path.read_bytes()

    deleted = run_cli(fast_gateway, "files", "delete", done["input_file_id"])
    assert deleted.code == 0 and "deleted" in deleted.out
    remaining = json.loads(run_cli(fast_gateway, "files", "list", "--json").out)["data"]
    assert done["input_file_id"] not in {f["id"] for f in remaining}


def test_unknown_ids_are_a_clear_error(fast_gateway, run_cli):
    result = run_cli(fast_gateway, "batches", "get", "batch_doesnotexist")
    assert result.code == 1
    assert result.err.startswith("error: 404 ")
    assert "Traceback" not in result.err


def test_cancelled_batch_exits_5_with_partial_files(slow_gateway, run_cli, tmp_path):
    client = slow_gateway.client()
    path = write_input(tmp_path, chat_lines(200, max_tokens=20))
    batch_id = run_cli(slow_gateway, "submit", str(path)).out.strip()
    wait_for(client, batch_id, statuses={"in_progress"}, timeout=30)
    cancelled = run_cli(slow_gateway, "batches", "cancel", batch_id)
    assert cancelled.code == 0 and cancelled.out.split() in ([batch_id, "cancelling"], [batch_id, "cancelled"])
    watched = run_cli(
        slow_gateway,
        "batches",
        "watch",
        batch_id,
        "--interval",
        "0.2",
        "--output",
        str(tmp_path / "o.jsonl"),
        "--errors",
        str(tmp_path / "e.jsonl"),
    )
    assert watched.code == 5, watched
    assert f"Batch {batch_id} cancelled" in watched.out
    errors = jsonl((tmp_path / "e.jsonl").read_bytes())
    outputs = jsonl((tmp_path / "o.jsonl").read_bytes()) if (tmp_path / "o.jsonl").exists() else []
    assert len(outputs) + len(errors) == 200
    assert "batch_cancelled" in {e["error"]["code"] for e in errors if e["response"] is None}


def test_ctrl_c_stops_watching_and_leaves_the_batch_running(slow_gateway, run_cli, tmp_path):
    client = slow_gateway.client()
    # About a minute of work at four requests at once: still running whatever the machine's load when it is checked.
    batch_id = run_cli(slow_gateway, "submit", str(write_input(tmp_path, chat_lines(1000, max_tokens=20)))).out.strip()
    watcher = spawn(
        [
            sys.executable,
            "-m",
            "batch_gateway.client",
            "batches",
            "watch",
            batch_id,
            "--interval",
            "0.2",
            "--base-url",
            slow_gateway.base_url,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # As at a terminal: a test run started in the background (a non-interactive shell's `&`) ignores SIGINT, the
        # child would inherit that, and Python installs no KeyboardInterrupt handler for an ignored SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in watcher.stderr], daemon=True)
    reader.start()
    # Its progress display writes to stdout: drained too, so a full pipe can never block it.
    threading.Thread(target=watcher.stdout.read, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while True:  # "status: in_progress" or "status: validating -> in_progress (after 1s)"
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line.startswith("status:") and line.rstrip().split(" (")[0].endswith("in_progress"):
                break
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=30) == 130  # a bound for a loaded machine: it exits at once
        reader.join(timeout=5)
        rest = "".join(lines.get_nowait() for _ in range(lines.qsize()))
        assert "keeps running on the server" in rest
        assert f"batch-gateway batches watch {batch_id} --output {batch_id}.output.jsonl" in rest
        assert f"batch-gateway batches cancel {batch_id}" in rest
        assert client.batches.retrieve(batch_id).status == "in_progress"
        assert not (tmp_path / f"{batch_id}.output.jsonl").exists()
    finally:
        stop(watcher, sig=signal.SIGKILL)
        with contextlib.suppress(openai.ConflictError):  # ended already: the assertion above says why
            client.batches.cancel(batch_id)  # free the slow gateway for the next test


def test_partial_results_arrive_while_the_batch_runs(slow_gateway, run_cli, tmp_path):
    path = write_input(tmp_path, chat_lines(80, max_tokens=24))
    partial = tmp_path / "partial.jsonl"
    result = run_cli(slow_gateway, "submit", str(path), "--wait", "--interval", "0.2", "--partial", str(partial))
    assert result.code == 0, result
    assert "does not offer partial results" not in result.err
    assert f"partial results: writing finished requests to {partial}" in result.err
    early = jsonl(partial.read_bytes())
    final = jsonl((tmp_path / "prompts.output.jsonl").read_bytes())
    assert 0 < len(early) <= 80
    assert len({line["id"] for line in early}) == len(early)  # each line once
    final_by_id = {line["id"]: line for line in final}
    for line in early:  # what arrived early is exactly what the output file holds
        assert final_by_id[line["id"]] == line
