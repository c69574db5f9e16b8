"""API keys from the CLI, tenants, and pagination through the real server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.helpers import chat_lines, free_port, wait_for

pytestmark = pytest.mark.e2e


def test_keys_scope_every_object_to_a_tenant(gateway_factory, sim):
    # A single user's gateway in open mode first, then the same data served with keys.
    open_gateway = gateway_factory(sim.url)
    legacy = open_gateway.client("anything").files.create(file=("a.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
    open_gateway.stop()
    gateway = gateway_factory(sim.url, env={"BATCH_GATEWAY_AUTH": "keys"})
    assert gateway.data_dir == open_gateway.data_dir
    with pytest.raises(openai.AuthenticationError) as caught:  # no key exists yet: nobody gets in
        gateway.client("anything", max_retries=0).files.list()
    assert "batch-gateway keys create --tenant NAME" in caught.value.message

    created = gateway.cli("keys", "create", "--tenant", "alpha")
    assert created.returncode == 0, created.stderr
    alpha_key = created.stdout.strip()
    assert alpha_key.startswith("sk-") and "\n" not in alpha_key
    beta_key = gateway.cli("keys", "create", "--tenant", "beta").stdout.strip()

    alpha = gateway.client(alpha_key, max_retries=0)
    beta = gateway.client(beta_key, max_retries=0)
    file = alpha.files.create(file=("in.jsonl", io.BytesIO(chat_lines(3))), purpose="batch")
    batch = alpha.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert wait_for(alpha, batch.id).status == "completed"

    with pytest.raises(openai.NotFoundError):
        beta.files.retrieve(file.id)
    with pytest.raises(openai.NotFoundError):
        beta.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        beta.files.content(file.id)
    with pytest.raises(openai.NotFoundError):
        beta.batches.cancel(batch.id)
    assert [b.id for b in beta.batches.list()] == []
    assert file.id not in {f.id for f in beta.files.list()}
    # The tenant that used the gateway in open mode is "default"; its objects are not alpha's.
    with pytest.raises(openai.NotFoundError):
        alpha.files.retrieve(legacy.id)

    listing = gateway.cli("keys", "list")
    assert "alpha" in listing.stdout and "beta" in listing.stdout and alpha_key not in listing.stdout
    # Revoke every key ("revoke, then create" rotation): the gateway stays shut, uploads included.
    for key_id in [line.split()[0] for line in listing.stdout.splitlines()[1:]]:
        assert gateway.cli("keys", "revoke", key_id).returncode == 0
    for client in (beta, gateway.client("anything", max_retries=0)):
        deadline = time.monotonic() + 5
        while True:  # lookups are cached for a couple of seconds
            try:
                client.files.create(file=("x.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
            except openai.AuthenticationError:
                break
            assert client is beta and time.monotonic() < deadline, "a revoked key (or no key) still works"
            time.sleep(0.2)
    anonymous = httpx.get(f"{gateway.base_url}/files")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"


def test_open_mode_is_refused_on_a_non_loopback_host(tmp_path):
    serve = [sys.executable, "-m", "batch_gateway", "serve", "--data-dir", str(tmp_path), "--port", str(free_port())]
    for extra, env in (
        (["--auth", "open", "--host", "0.0.0.0"], {}),
        (["--host", "0.0.0.0"], {"BATCH_GATEWAY_AUTH": "open"}),
    ):
        result = subprocess.run(
            [*serve, *extra],
            env={**os.environ, **env, "BATCH_GATEWAY_LOG_FORMAT": "json"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stdout + result.stderr
        refused = next(json.loads(line) for line in result.stderr.splitlines() if '"serve.refused"' in line)
        assert "--auth keys" in refused["reason"] and "keys create --tenant NAME" in refused["reason"]
    bogus = subprocess.run([*serve, "--auth", "none"], capture_output=True, text=True, timeout=60)
    assert bogus.returncode == 2 and "invalid choice: 'none'" in bogus.stderr


def test_batches_list_paginates_newest_first(client):
    file = client.files.create(file=("in.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")
    ids = [
        client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h").id
        for _ in range(7)
    ]
    page = client.batches.list(limit=3)
    assert [b.id for b in page.data] == ids[::-1][:3]
    assert page.has_more
    assert [b.id for b in client.batches.list(limit=3)] == ids[::-1]  # SDK auto-pagination across 3 pages
