"""Client errors that need no gateway: bad arguments, missing files, an unreachable server."""

from __future__ import annotations

import pytest

from batch_gateway.client.cli import main
from tests.helpers import free_port


def test_missing_input_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["submit", str(tmp_path / "nope.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: {tmp_path / 'nope.jsonl'}: no such file"


def test_empty_input_file_is_refused_before_upload(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["submit", str(tmp_path / "empty.jsonl"), "--base-url", f"http://127.0.0.1:{free_port()}/v1"]) == 1
    assert "has no request lines" in capsys.readouterr().err


def test_bad_metadata_is_refused(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text('{"custom_id":"a"}\n')
    assert main(["submit", str(tmp_path / "in.jsonl"), "--metadata", "novalue"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_unreachable_server_says_where_it_looked(capsys, monkeypatch):
    base_url = f"http://127.0.0.1:{free_port()}/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)  # the env var is honoured when no flag is given
    assert main(["batches", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot reach {base_url}")
    assert "Traceback" not in err


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["batches", "explode"])
    assert caught.value.code == 2
