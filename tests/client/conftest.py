"""Running the client CLI in-process (`batch_gateway.client.cli.main(argv)`) and capturing what it prints."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from batch_gateway.client.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """Run the client in-process against a gateway; returns exit code, stdout and stderr."""

    def run(gateway, *argv: str) -> Result:
        capsys.readouterr()
        code = main([*argv, "--base-url", gateway.base_url])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
