"""The runner process stays lean: its start-up imports none of the heavy packages only other commands need."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.process  # a fresh interpreter

HEAVY = ("openai", "uvicorn", "litestar", "kubernetes")


def test_runner_startup_does_not_import_heavy_packages() -> None:
    # A fresh interpreter: the test session itself has imported everything.
    code = (
        "import json, sys\n"
        "from batch_gateway.cli import build_parser\n"
        "build_parser().parse_args(['runner', '--batch-id', 'batch_x'])\n"
        "import batch_gateway.runner.process\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert not loaded & set(HEAVY), f"the runner imports {sorted(loaded & set(HEAVY))} at start-up"
