"""Versioned schema migrations: numbered SQL files per backend, recorded in `schema_migrations`.

`sql/<dialect>/NNNN_name.sql` holds one migration. The files are append-only: a migration that has shipped is never
edited, a change is a new file. Each backend applies the pending ones in one transaction under a lock, so several
processes opening the same database at once apply each migration exactly once.

Numbers run 0001, 0002, ... without gaps: a gap is a migration file missing from the package.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources

_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
DIALECTS = ("sqlite", "postgres")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(dialect: str) -> list[Migration]:
    """Every migration of `dialect` (sqlite or postgres), in order."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}")
    folder = resources.files("batch_gateway.store") / "sql" / dialect
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{dialect} migrations must be numbered 0001, 0002, ... without gaps: {versions}")
    return found


def pending(dialect: str, applied: Collection[int], target: int | None = None) -> list[Migration]:
    """The migrations still to apply to reach `target` (default: the newest), in order."""
    known = migrations(dialect)
    if target is not None and not 0 <= target <= len(known):
        raise ValueError(f"no {dialect} schema version {target}; versions run from 1 to {len(known)}")
    return [m for m in known if m.version not in applied and (target is None or m.version <= target)]


def versions(dialect: str) -> list[int]:
    return [m.version for m in migrations(dialect)]


def latest_version(dialect: str) -> int:
    return max(versions(dialect), default=0)
