"""The layering docs/architecture.md states, checked: the API, the runner and gc never import one another, and what
they share (storage, the upstreams, the executor, the vocabulary) imports none of them.

Two checks, as the runner's import-budget test (tests/runner/test_imports.py) does it: every import statement of the
package, read from the source (function-level imports included; type-only ones under `if TYPE_CHECKING:` are not
dependencies at run time), and what a fresh interpreter really loads when it imports each room.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batch_gateway"
ROOMS = ("api", "runner", "gc")
# The processes' entry points wire the rooms together; they may import anything, and nothing imports them.
WIRING = frozenset(
    {"batch_gateway.__main__", "batch_gateway.cli", "batch_gateway.server", "batch_gateway.runner.__main__"}
)
# The one room module the shared code may import: the runner's exit codes, which the executors read.
SHARED_WITH_EXECUTORS = frozenset({"batch_gateway.runner.exits"})


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "batch_gateway" and len(parts) > 1 and parts[1] in ROOMS else None


def runtime_imports(tree: ast.AST) -> set[str]:
    """The package modules a module imports when it runs, wherever the import statement is."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name.split(".")[0] == "batch_gateway" and _exists(name)}


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def violations(module: str, imported: set[str]) -> list[str]:
    if module in WIRING:
        return []
    room = room_of(module)
    found = []
    for target in sorted(imported):
        target_room = room_of(target)
        if target in WIRING:
            found.append(f"{module} imports {target}, which wires the whole process")
        elif room is not None and target_room not in (None, room):
            found.append(f"{module} (the {room}) imports {target} (the {target_room})")
        elif room is None and target_room is not None and target not in SHARED_WITH_EXECUTORS:
            found.append(f"{module} (shared) imports {target} (the {target_room})")
    return found


def test_the_rooms_never_import_one_another() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        found += violations(module, runtime_imports(ast.parse(path.read_text(), str(path))))
    assert not found, "\n".join(found)


def test_the_check_sees_a_room_importing_another() -> None:
    # What this test exists to catch, in the form it took before: the API reading checkpoints through the runner.
    source = "async def partial_results():\n    from batch_gateway.runner.checkpoint import Checkpoints\n"
    assert violations("batch_gateway.api.partial", runtime_imports(ast.parse(source))) == [
        "batch_gateway.api.partial (the api) imports batch_gateway.runner.checkpoint (the runner)"
    ]
    type_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from batch_gateway.runner import run\n"
    assert violations("batch_gateway.tracing", runtime_imports(ast.parse(type_only))) == []


@pytest.mark.process  # fresh interpreters
@pytest.mark.parametrize(
    ("entry", "room"),
    [
        ("batch_gateway.api.app", "api"),
        ("batch_gateway.runner.process", "runner"),
        ("batch_gateway.gc.collector", "gc"),
    ],
)
def test_importing_a_room_loads_no_other_room(entry: str, room: str) -> None:
    # A fresh interpreter: the test session itself has imported everything.
    code = f"import json, sys\nimport {entry}\nprint(json.dumps(sorted(sys.modules)))\n"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    others = sorted(name for name in loaded if room_of(name) not in (None, room) and name not in SHARED_WITH_EXECUTORS)
    assert not others, f"importing {entry} loads {others}"
