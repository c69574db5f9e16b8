"""`batch-gateway sim` as a real process, the flags, and the zero-latency mode's per-request overhead."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from batch_gateway.sim import SimConfig
from batch_gateway.sim.cli import add_arguments, config_from_args
from tests.fixtures.processes import http_ok, spawn, stop
from tests.helpers import free_port
from tests.sim.conftest import chat, stats


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_config_knob_is_a_flag():
    args = _parse(
        "--model",
        "a",
        "--model",
        "b",
        "--max-num-seqs",
        "7",
        "--time-scale",
        "0.5",
        "--error-rate-429",
        "0.1",
        "--scheduling-policy",
        "priority",
        "--hide-cache-info",
    )
    config = config_from_args(args)
    assert config.models == ["a", "b"] and config.max_num_seqs == 7 and config.time_scale == 0.5
    assert config.error_rate_429 == 0.1 and config.scheduling_policy == "priority" and config.hide_cache_info
    assert not config_from_args(_parse("--no-hide-cache-info")).hide_cache_info  # switches are --x / --no-x
    assert config_from_args(_parse()) == SimConfig()
    assert (args.host, args.port) == ("127.0.0.1", 8100)


@pytest.mark.parametrize(
    "argv",
    [
        ("--max-num-seqs", "0"),
        ("--error-rate-500", "1.5"),
        ("--time-scale", "-1"),
        ("--error-rate-429", "0.6", "--error-rate-503", "0.6"),
    ],
)
def test_bad_values_are_refused_with_the_reason(argv):
    with pytest.raises(ValueError, match="invalid simulator config"):
        config_from_args(_parse(*argv))


def test_scheduling_policy_is_fcfs_or_priority(capsys):
    assert SimConfig().scheduling_policy == "fcfs"  # vLLM's default
    with pytest.raises(SystemExit) as exited:
        _parse("--scheduling-policy", "lifo")
    assert exited.value.code == 2 and "invalid choice: 'lifo'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, priority"):
        SimConfig(scheduling_policy="lifo")


@pytest.mark.process
def test_sim_command_serves_until_ctrl_c():
    port = free_port()
    process = spawn(
        [sys.executable, "-m", "batch_gateway", "sim", "--port", str(port), "--model", "m1", "--time-scale", "0"],
        ready=http_ok(f"http://127.0.0.1:{port}/health"),
        timeout=20,
        what="the simulator",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat(model="m1"))
        assert response.status_code == 200 and response.json()["model"] == "m1"
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 0
        assert b"vLLM simulator on http://127.0.0.1:" in process.stderr.read()
    finally:
        stop(process, sig=signal.SIGKILL)


@pytest.mark.process
def test_bad_flag_value_exits_2():
    result = subprocess.run(
        [sys.executable, "-m", "batch_gateway", "sim", "--kv-blocks", "0"], capture_output=True, timeout=30
    )
    assert result.returncode == 2 and b"kv_blocks must be at least 1" in result.stderr


def test_zero_latency_mode_answers_at_once(start_sim):
    server = start_sim(step_base_ms=0, per_seq_ms=0, prefill_ms_per_token=0, context_ms_per_token=0)
    with httpx.Client(base_url=server.url) as http:
        http.post("/v1/chat/completions", json=chat(max_tokens=512))  # warm the connection
        latencies = []
        for i in range(200):
            started = time.perf_counter()
            response = http.post("/v1/chat/completions", json=chat(str(i), max_tokens=512))
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 512
    latencies.sort()
    assert latencies[100] < 0.02  # the default model would take 5 s for these 512 tokens; here ~1 ms, client included
    assert stats(server)["steps"] == 201  # one step per request: all of its output at once
