"""Settings: flags, environment variables, the runner hand-over, and the generated reference."""

import argparse
from pathlib import Path

import pytest

from batch_gateway import settings as settings_mod
from batch_gateway.settings import Settings


def parse(argv, env=None, monkeypatch=None):
    parser = argparse.ArgumentParser()
    settings_mod.add_arguments(parser)
    return settings_mod.from_args(parser.parse_args(argv))


def test_flag_beats_env_beats_default(monkeypatch):
    monkeypatch.setenv("BATCH_GATEWAY_PORT", "9001")
    monkeypatch.setenv("BATCH_GATEWAY_SIMULATE", "true")
    monkeypatch.setenv("BATCH_GATEWAY_UPSTREAM", "http://a:1\nm=http://b:2")
    assert parse([]).port == 9001
    assert parse(["--port", "9002"]).port == 9002
    assert parse([]).simulate is True
    assert parse(["--no-simulate"]).simulate is False
    assert parse([]).upstream == ["http://a:1", "m=http://b:2"]
    assert parse(["--upstream", "x=http://c"]).upstream == ["x=http://c"]
    assert Settings.from_env({}).port == 8000


def test_bad_env_value_is_a_clear_error():
    with pytest.raises(ValueError, match="BATCH_GATEWAY_SIMULATE"):
        Settings.from_env({"BATCH_GATEWAY_SIMULATE": "maybe"})


def test_to_env_round_trips():
    original = Settings(port=1234, upstream=["http://a", "m=http://b,http://c"], simulate=True, retry_budget=0.5)
    assert Settings.from_env(original.to_env()) == original


def test_every_flag_names_its_env_var_in_help():
    parser = argparse.ArgumentParser()
    settings_mod.add_arguments(parser)
    text = parser.format_help()
    for name in Settings.__dataclass_fields__:
        assert settings_mod.env_name(name) in text


def test_configuration_reference_is_up_to_date():
    doc = Path(__file__).parent.parent / "docs" / "configuration.md"
    assert doc.read_text() == settings_mod.reference_markdown(), (
        "run: batch-gateway config-reference > docs/configuration.md"
    )


def test_serve_refuses_runner_settings_every_runner_would_refuse(tmp_path):
    import asyncio

    from batch_gateway.server import serve
    from batch_gateway.settings import Settings

    for bad in ({"interactive_slowdown": 1.0}, {"priority_hints": ["llm-d,fast-lane"]}):
        assert asyncio.run(serve(Settings(data_dir=str(tmp_path), **bad))) == 2
