"""The Go tools scripts/install-tools.sh builds (helm, promtool), at the versions pinned in scripts/tools-versions.env,
from its cache folder. A test that needs one is skipped, naming the script, when it has not been built."""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@cache
def versions() -> dict[str, str]:
    text = (REPO / "scripts" / "tools-versions.env").read_text()
    return dict(re.findall(r"^([A-Z_]+)=(\S+)$", text, re.M))


def cache_dir() -> Path:
    explicit = os.environ.get("BATCH_GATEWAY_TOOLS_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batch-gateway" / "tools"


def path(name: str) -> Path | None:
    """The pinned build of `name` (helm, promtool), or None."""
    version = versions()[f"{name.upper()}_VERSION"]
    candidate = cache_dir() / f"{name}-{version}" / name
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def require(name: str) -> Path:
    """The tool, or skip the test saying how to build it."""
    found = path(name)
    if found is None:
        pytest.skip(f"{name} is not built: run scripts/install-tools.sh {name} (`make test` does)")
    return found
