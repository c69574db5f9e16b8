"""API keys from the CLI, tenants, and pagination through the real server."""

from __future__ import annotations

import io
import time

import openai
import pytest

from tests.helpers import chat_lines, wait_for


def test_keys_scope_every_object_to_a_tenant(gateway):
    open_client = gateway.client("anything")
    legacy = open_client.files.create(file=("a.jsonl", io.BytesIO(chat_lines(1))), purpose="batch")

    created = gateway.cli("keys", "create", "--tenant", "alpha")
    assert created.returncode == 0, created.stderr
    alpha_key = created.stdout.strip()
    assert alpha_key.startswith("sk-") and "\n" not in alpha_key
    beta_key = gateway.cli("keys", "create", "--tenant", "beta").stdout.strip()

    deadline = time.monotonic() + 5
    while True:  # the server notices the first key within a couple of seconds
        try:
            open_client.files.list()
        except openai.AuthenticationError as exc:
            assert exc.code == "invalid_api_key"
            break
        assert time.monotonic() < deadline, "a key exists but unauthenticated calls still work"
        time.sleep(0.2)

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
    # The tenant that used the gateway before keys existed is "default"; its objects are not alpha's.
    with pytest.raises(openai.NotFoundError):
        alpha.files.retrieve(legacy.id)

    listing = gateway.cli("keys", "list")
    assert "alpha" in listing.stdout and "beta" in listing.stdout and alpha_key not in listing.stdout
    beta_id = next(line.split()[0] for line in listing.stdout.splitlines() if " beta " in line)
    assert gateway.cli("keys", "revoke", beta_id).returncode == 0
    deadline = time.monotonic() + 5
    while True:  # lookups are cached for a couple of seconds
        try:
            beta.files.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.2)


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
