"""Logs: one renderer for structlog's events and the standard library's records (uvicorn, psycopg_pool, aiohttp)."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from batch_gateway import logs


@pytest.fixture(autouse=True)
def restore_logging():
    """These tests point the loggers at pytest's captured stderr, which closes after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_logs_carry_library_records_in_the_same_shape(capsys):
    logs.configure("json", "info")
    structlog.get_logger("runner").info("runner.claimed", batch_id="batch_1")
    logging.getLogger("psycopg.pool").warning("error connecting in 'pool-1': connection refused")
    logging.getLogger("uvicorn.access").info("GET / 200")  # chatty at INFO: left out
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["event"] for line in lines] == ["runner.claimed", "error connecting in 'pool-1': connection refused"]
    library = lines[1]
    assert (library["logger"], library["level"]) == ("psycopg.pool", "warning") and "timestamp" in library


def test_a_terminal_gets_readable_lines_for_both(capsys):
    logs.configure("console", "info")
    structlog.get_logger("serve").info("serve.listening", url="http://127.0.0.1:8000/v1")
    logging.getLogger("aiohttp.client").error("Unclosed client session")
    err = capsys.readouterr().err
    assert "serve.listening" in err and "url=http://127.0.0.1:8000/v1" in err
    assert "Unclosed client session" in err and "aiohttp.client" in err
    assert not any(line.startswith("{") for line in err.splitlines())
