"""API keys and tenants: `--auth open` makes everyone tenant `default`; `--auth keys` (the default) needs a valid,
unrevoked key whatever happens to the keys, and scopes every object by the key's tenant."""

from __future__ import annotations

import openai
import pytest

from batch_gateway import ids
from batch_gateway.api.auth import CACHE_SECONDS, NO_KEYS_EXIST_MESSAGE, mask_key
from batch_gateway.keys import create_key
from tests.api.forms import assert_envelope
from tests.helpers import chat_lines


def expire_cached_keys(server) -> None:
    """Key lookups and the key count are cached for CACHE_SECONDS: move the cache's clock past them, not wait."""
    later = server.authenticator.clock() + CACHE_SECONDS + 1
    server.authenticator.clock = lambda: later


def new_key(server, tenant: str) -> tuple[str, str]:
    key, record = server.run(create_key(server.services.metadata, tenant))
    return key, record.id


def test_open_mode_makes_any_token_or_none_the_default_tenant(server_factory):
    server = server_factory(auth="open")
    new_key(server, "acme")  # keys are ignored in open mode: the mode is configuration, not state
    a = server.client(api_key="whatever")
    b = server.client(api_key="something-else")
    file_id = a.files.create(file=("x.jsonl", chat_lines(1)), purpose="batch").id
    assert b.files.retrieve(file_id).id == file_id
    response = server.http(api_key=None).get(f"/v1/files/{file_id}")
    assert response.status_code == 200
    record = server.run(server.services.metadata.get_file(file_id, "default"))
    assert record is not None and record.tenant == "default"


def test_keys_mode_without_any_key_refuses_everything_and_says_how_to_create_one(server_factory):
    server = server_factory(auth="keys")
    client = server.client(api_key="anything", max_retries=0)
    for call in (
        lambda: client.files.list(),
        lambda: client.files.create(file=("x.jsonl", chat_lines(1)), purpose="batch"),
        lambda: client.batches.create(input_file_id="file-x", endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.AuthenticationError) as caught:
            call()
        assert caught.value.body["message"] == NO_KEYS_EXIST_MESSAGE
        assert "batch-gateway keys create --tenant NAME" in caught.value.body["message"]
    assert_envelope(server.http(api_key=None).get("/v1/files"), 401, code="invalid_api_key")
    assert server.stored_objects() == []  # the refused upload stored nothing


def test_revoking_every_key_never_opens_the_gateway(server_factory):
    server = server_factory(auth="keys")
    first, first_id = new_key(server, "acme")
    _, second_id = new_key(server, "acme")
    assert server.client(api_key=first).files.list().data == []
    for key_id in (first_id, second_id):  # "revoke, then create" rotation, caught between the two steps
        assert server.run(server.services.metadata.revoke_key(key_id, ids.now()))
    expire_cached_keys(server)
    for api_key in (first, None):
        http = server.http(api_key=api_key)
        assert_envelope(http.get("/v1/files"), 401, code="invalid_api_key")
        assert_envelope(
            http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("x.jsonl", chat_lines(1))}),
            401,
            code="invalid_api_key",
        )
        assert_envelope(
            http.post(
                "/v1/batches",
                json={"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            ),
            401,
            code="invalid_api_key",
        )
    assert server.stored_objects() == []
    replacement, _ = new_key(server, "acme")
    assert server.client(api_key=replacement).files.list().data == []


def test_wrong_or_missing_key_is_401_once_a_key_exists(server_factory):
    server = server_factory(auth="keys")
    good, _ = new_key(server, "acme")
    wrong = "sk-bg-thisisnotarealkey0123456789"
    with pytest.raises(openai.AuthenticationError) as caught:
        server.client(api_key=wrong).files.list()
    error = caught.value.body
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("Incorrect API key provided: sk-")
    assert wrong not in error["message"] and mask_key(wrong) in error["message"]
    assert server.count("GET", "/v1/files") == 1  # 401 is not retried
    assert_envelope(server.http(api_key=None).get("/v1/batches"), 401, code="invalid_api_key")
    assert_envelope(server.http(api_key=None).get("/v1/batches", headers={"Authorization": f"Basic {good}"}), 401)
    assert server.client(api_key=good).files.list().data == []


def test_every_object_is_scoped_to_the_key_tenant(server_factory):
    server = server_factory(auth="keys")
    key_a, _ = new_key(server, "tenant-a")
    key_b, _ = new_key(server, "tenant-b")
    a, b = server.client(api_key=key_a), server.client(api_key=key_b)

    file_id = a.files.create(file=("x.jsonl", chat_lines(2)), purpose="batch").id
    batch = a.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert server.executor.submitted == [(batch.id, "tenant-a")]
    assert server.run(server.services.metadata.get_file(file_id, None)).object_key.startswith("tenant-a/")

    for call in (
        lambda: b.files.retrieve(file_id),
        lambda: b.files.content(file_id),
        lambda: b.files.delete(file_id),
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert b.files.list().data == [] and b.batches.list().data == []
    with pytest.raises(openai.BadRequestError) as caught:  # another tenant's file cannot feed a batch
        b.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert caught.value.param == "input_file_id"

    # nothing of tenant a was touched by tenant b's attempts
    assert a.files.retrieve(file_id).id == file_id
    assert a.batches.retrieve(batch.id).status == "validating"
    assert [f.id for f in a.files.list()] == [file_id] and [x.id for x in a.batches.list()] == [batch.id]


def test_revoked_key_stops_working(server_factory):
    server = server_factory(auth="keys")
    keep, _ = new_key(server, "t")
    revoked, key_id = new_key(server, "t")
    assert server.client(api_key=revoked).batches.list().data == []
    server.run(server.services.metadata.revoke_key(key_id, ids.now()))
    expire_cached_keys(server)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key=revoked, max_retries=0).batches.list()
    assert server.client(api_key=keep).batches.list().data == []


def test_probes_need_no_key(server_factory):
    server = server_factory(auth="keys")
    new_key(server, "t")
    http = server.http(api_key=None)
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200


def test_openai_organization_project_and_stainless_headers_are_ignored(server):
    client = server.client(organization="org-123", project="proj_456", default_headers={"X-Stainless-Custom": "x"})
    assert client.files.create(file=("x.jsonl", chat_lines(1)), purpose="batch").status == "processed"


def test_mask_key_never_shows_the_whole_key():
    assert mask_key("sk-bg-abcdefghijklmnop") == "sk-" + "*" * 15 + "mnop"
    assert mask_key("short") == "*****"
