"""`batch-gateway keys tenant` and `keys create --weight/--max-running`: a tenant's admission policy, stored."""

from __future__ import annotations

import asyncio

import pytest
import structlog

from batch_gateway.cli import main
from batch_gateway.store.metadata import TenantPolicy
from batch_gateway.store.sqlite import SqliteStore


@pytest.fixture(autouse=True)
def _restore_logging():
    """main() configures structlog for the process, writing to the stdout pytest captures here: undo it after."""
    config = structlog.get_config()
    yield
    structlog.configure(**config)


def policies(data_dir) -> dict[str, TenantPolicy]:
    async def read() -> dict[str, TenantPolicy]:
        store = SqliteStore(str(data_dir / "metadata.sqlite3"))
        await store.open()
        try:
            return await store.tenant_policies()
        finally:
            await store.close()

    return asyncio.run(read())


def test_a_tenants_weight_and_cap_are_set_with_its_key_and_changed_later(tmp_path, capsys):
    storage = ["--data-dir", str(tmp_path)]
    assert main(["keys", "create", "--tenant", "acme", "--weight", "2", "--max-running", "3", *storage]) == 0
    assert capsys.readouterr().out.startswith("sk-")
    assert main(["keys", "create", "--tenant", "globex", *storage]) == 0  # no options: the defaults, nothing stored
    capsys.readouterr()
    assert policies(tmp_path) == {"acme": TenantPolicy(2.0, 3)}

    assert main(["keys", "tenant", "acme", "--weight", "0.5", *storage]) == 0  # the cap stays
    assert capsys.readouterr().out.strip() == "tenant acme: weight 0.5, max running 3"
    assert main(["keys", "tenant", "acme", "--max-running", "0", *storage]) == 0  # 0 removes the cap
    assert main(["keys", "tenant", "globex", *storage]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "tenant globex: weight 1, max running none"
    assert policies(tmp_path) == {"acme": TenantPolicy(0.5, None)}

    assert main(["keys", "list", *storage]) == 0
    rows = {line.split()[1]: line.split()[-2:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {"acme": ["0.5", "-"], "globex": ["1", "-"]}

    assert main(["keys", "tenant", "acme", "--weight", "0", *storage]) == 2
    assert "--weight must be above 0" in capsys.readouterr().err
    assert policies(tmp_path) == {"acme": TenantPolicy(0.5, None)}
