"""/v1/batches through the real `openai` SDK."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import msgspec
import openai
import pytest

from batch_gateway import ids, wire
from batch_gateway.api import batches as batches_module
from batch_gateway.api.batch_create import parse_batch_create
from batch_gateway.store.signals import NullSignals
from tests.api.forms import BATCH_KEYS, assert_envelope
from tests.helpers import chat_lines

ENDPOINT = "/v1/chat/completions"


def upload(client, n: int = 2, purpose: str = "batch") -> str:
    return client.files.create(file=("in.jsonl", chat_lines(n)), purpose=purpose).id


def create(client, file_id: str, **kwargs):
    return client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h", **kwargs)


def set_status(server, batch_id: str, status: str, **changes) -> None:
    """Move a stored batch on as a runner would (compare-and-set from wherever it is)."""
    statuses = ("validating", "in_progress", "finalizing", "cancelling", "completed", "failed", "expired", "cancelled")
    moved = server.run(server.services.metadata.transition(batch_id, statuses, status, ids.now(), **changes))
    assert moved is not None and moved.status == status


# --- create ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("real_http", [False, pytest.param(True, marks=pytest.mark.e2e)], ids=["in_process", "http"])
def test_create_returns_a_complete_validating_batch_and_submits_it(server_factory, real_http):
    server = server_factory(real_http=real_http)  # the SDK end to end over real HTTP too: the two agree
    client = server.client()
    file_id = upload(client)
    batch = create(
        client,
        file_id,
        metadata={"project": "demo"},
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert batch.status == "validating" and batch.object == "batch" and batch.id.startswith("batch_")
    assert (batch.endpoint, batch.input_file_id, batch.completion_window) == (ENDPOINT, file_id, "24h")
    assert batch.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}
    assert batch.expires_at == batch.created_at + 86400
    assert batch.metadata == {"project": "demo"}
    assert server.executor.submitted == [(batch.id, "default")]

    raw = server.http().get(f"/v1/batches/{batch.id}").json()
    assert set(raw) == BATCH_KEYS
    for key in ("model", "errors", "output_file_id", "error_file_id", "in_progress_at", "finalizing_at",
                "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "usage"):  # fmt: skip
        assert raw[key] is None, key
    stored = server.run(server.services.metadata.get_batch(batch.id, "default"))
    assert stored.output_expires_after == 7200 and stored.fingerprint


def test_metadata_none_is_accepted(client):
    assert create(client, upload(client), metadata=None).metadata is None


def test_batch_is_kept_and_answered_200_when_the_executor_fails(server, client):
    server.executor.fail_submit = True
    batch = create(client, upload(client))
    assert batch.status == "validating"
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert server.count("POST", "/v1/batches") == 1


@pytest.mark.parametrize(
    ("body", "param", "code", "message"),
    [
        ({"endpoint": ENDPOINT, "completion_window": "24h"}, "input_file_id", "missing_required_parameter",
         "Missing required parameter: 'input_file_id'."),
        ({"input_file_id": None, "endpoint": ENDPOINT, "completion_window": "24h"}, "input_file_id",
         "missing_required_parameter", None),
        ({"input_file_id": "$FILE", "completion_window": "24h"}, "endpoint", "missing_required_parameter",
         "Missing required parameter: 'endpoint'."),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT}, "completion_window", "missing_required_parameter", None),
        ({"input_file_id": 42, "endpoint": ENDPOINT, "completion_window": "24h"}, "input_file_id", "invalid_type",
         "Invalid type for 'input_file_id': expected a string, but got an integer instead."),
        ({"input_file_id": "", "endpoint": ENDPOINT, "completion_window": "24h"}, "input_file_id", "invalid_value",
         None),
        ({"input_file_id": "$FILE", "endpoint": "/v1/invalid/endpoint", "completion_window": "24h"}, "endpoint",
         "invalid_value",
         "Invalid value: '/v1/invalid/endpoint'. Supported values are: '/v1/chat/completions', '/v1/completions', "
         "'/v1/embeddings', '/v1/responses', '/v1/moderations', '/v1/images/generations', '/v1/images/edits', and "
         "'/v1/videos'."),
        ({"input_file_id": "$FILE", "endpoint": ["x"], "completion_window": "24h"}, "endpoint", "invalid_type", None),
        *[({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": window}, "completion_window",
           "invalid_value", f"Invalid value: '{window}'. Supported values are: '24h'.")
          for window in ("1h", "48h", "invalid", "")],
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h", "metadata": "tags"},
         "metadata", "invalid_type", "Invalid type for 'metadata': expected an object, but got a string instead."),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h", "metadata": {"tags": ["a"]}},
         "metadata.tags", "invalid_type",
         "Invalid type for 'metadata.tags': expected a string, but got an array instead."),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h", "metadata": {"n": 1}},
         "metadata.n", "invalid_type", None),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h",
          "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value", None),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h", "metadata": {"k" * 65: "v"}},
         "metadata", "invalid_value", None),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h", "metadata": {"k": "v" * 513}},
         "metadata.k", "invalid_value", None),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h",
          "output_expires_after": {"anchor": "created_at", "seconds": 60}}, "output_expires_after.seconds",
         "invalid_value", None),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h",
          "output_expires_after": {"anchor": "created_at", "seconds": 2_592_001}}, "output_expires_after.seconds",
         "invalid_value", None),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h",
          "output_expires_after": {"anchor": "created_at", "seconds": "7200"}}, "output_expires_after.seconds",
         "invalid_type", None),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h",
          "output_expires_after": {"anchor": "completed_at", "seconds": 7200}}, "output_expires_after.anchor",
         "invalid_value", None),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h",
          "output_expires_after": {"seconds": 7200}}, "output_expires_after.anchor", "missing_required_parameter",
         None),
        ({"input_file_id": "$FILE", "endpoint": ENDPOINT, "completion_window": "24h", "output_expires_after": 7200},
         "output_expires_after", "invalid_type", None),
        ({"input_file_id": "file-nosuchfile", "endpoint": ENDPOINT, "completion_window": "24h"}, "input_file_id",
         "invalid_value", None),
    ],
)  # fmt: skip
def test_create_errors_are_400_with_openai_code_and_param(server, client, body, param, code, message):
    file_id = upload(client)
    body = {k: (file_id if v == "$FILE" else v) for k, v in body.items()}
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/batches", body=body, cast_to=object)
    error = caught.value.body
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    if message is not None:
        assert error["message"] == message
    assert caught.value.request_id
    assert client.batches.list().data == []
    assert server.executor.submitted == []
    assert server.count("POST", "/v1/batches") == 1  # 400 is final: the SDK did not retry


def test_input_file_must_have_purpose_batch(server, client):
    file_id = upload(client, purpose="user_data")
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, file_id)
    assert caught.value.param == "input_file_id" and "purpose 'batch'" in caught.value.body["message"]
    assert client.batches.list().data == []


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[]", b"null", b'"batch"', b"42", b"\xff\xfe", b'{"input_file_id": "a", }', b"{}" * 3],
)
def test_malformed_create_bodies_are_400_never_500(server, body):
    response = server.http().post("/v1/batches", content=body, headers={"Content-Type": "application/json"})
    assert_envelope(response, 400)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"input_file_id": "file-x", "metadata": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
    ],
    ids=["arrays", "objects", "inside-a-field"],
)
def test_deeply_nested_json_is_400_like_any_invalid_json(server, body):
    http = server.http()
    invalid = assert_envelope(http.post("/v1/batches", content=b"{", headers={"Content-Type": "application/json"}), 400)
    nested = assert_envelope(http.post("/v1/batches", content=body, headers={"Content-Type": "application/json"}), 400)
    assert nested == invalid


def test_oversized_create_body_is_413(server):
    body = json.dumps({"metadata": {"k": "v" * (2 * 1024 * 1024)}}).encode()
    assert_envelope(server.http().post("/v1/batches", content=body), 413)


# --- no duplicates on retries -------------------------------------------------------------------------


@pytest.mark.e2e
def test_sdk_retry_after_a_lost_response_returns_the_same_batch(server_factory):
    """The first response is held back until the SDK times out (over real HTTP: only a socket times out); its retry
    must not create a second batch."""
    server = server_factory(real_http=True)
    client = server.client(timeout=1.0, max_retries=2)
    file_id = upload(client)
    server.delayed_responses[("POST", "/v1/batches")] = [2.0]
    batch = create(client, file_id)
    assert server.count("POST", "/v1/batches") == 2  # the original and one retry
    assert [b.id for b in client.batches.list()] == [batch.id]


def test_requests_marked_as_retries_are_folded(server, client):
    file_id = upload(client)
    first = create(client, file_id, metadata={"run": "1"})
    again = create(client, file_id, metadata={"run": "1"}, extra_headers={"x-stainless-retry-count": "1"})
    assert again.id == first.id
    # a different request, even marked as a retry, is a new batch
    other = create(client, file_id, metadata={"run": "2"}, extra_headers={"x-stainless-retry-count": "1"})
    assert other.id != first.id
    # a request not marked as a retry is the user asking for another batch
    fresh = create(client, file_id, metadata={"run": "1"})
    assert fresh.id != first.id
    assert len(client.batches.list().data) == 3


def test_concurrent_retries_make_one_batch_and_first_tries_one_each(server, client):
    file_id = upload(client)

    def together(retry_count: str, n: int) -> set[str]:
        barrier = threading.Barrier(n)

        def one(_: int) -> str:
            barrier.wait()
            return create(client, file_id, extra_headers={"x-stainless-retry-count": retry_count}).id

        with ThreadPoolExecutor(n) as pool:
            return set(pool.map(one, range(n)))

    assert len(together("1", 20)) == 1
    assert len(together("0", 2)) == 2
    assert len(client.batches.list().data) == 3


def test_a_retry_takes_over_a_claim_whose_batch_never_appears(server, client, monkeypatch):
    monkeypatch.setattr(batches_module, "FOLD_WAIT_SECONDS", 0.3)
    file_id = upload(client)
    body = json.dumps({"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"}).encode()
    fingerprint = parse_batch_create(body).fingerprint("default")
    # A request claimed the fold and died before it stored its batch.
    server.run(server.services.metadata.claim_fold("default", fingerprint, "batch_never_stored", ids.now(), None))
    batch = create(client, file_id, extra_headers={"x-stainless-retry-count": "1"})
    assert batch.id != "batch_never_stored" and [b.id for b in client.batches.list()] == [batch.id]
    assert create(client, file_id, extra_headers={"x-stainless-retry-count": "2"}).id == batch.id


def test_retry_folding_is_per_tenant(server_factory):
    server = server_factory(auth="keys")
    keys = {tenant: server.run(_create_key(server, tenant)) for tenant in ("a", "b")}
    data = chat_lines(1)
    a, b = server.client(keys["a"]), server.client(keys["b"])
    # identical requests (even the same file id cannot collide: ids are random) from two tenants
    first = create(a, a.files.create(file=("x.jsonl", data), purpose="batch").id)
    b_file = b.files.create(file=("x.jsonl", data), purpose="batch").id
    second = create(b, b_file, extra_headers={"x-stainless-retry-count": "1"})
    assert first.id != second.id


async def _create_key(server, tenant: str) -> str:
    from batch_gateway.keys import create_key

    key, _ = await create_key(server.services.metadata, tenant)
    return key


def test_idempotency_key_returns_the_first_batch(server, client):
    file_id = upload(client)
    headers = {"Idempotency-Key": "job-17"}
    first = create(client, file_id, extra_headers=headers)
    again = create(client, file_id, extra_headers=headers)
    assert again.id == first.id
    assert create(client, file_id, extra_headers={"Idempotency-Key": "job-18"}).id != first.id
    assert len(client.batches.list().data) == 2
    stored = server.run(server.services.metadata.get_batch(first.id, "default"))
    assert stored.idempotency_key == "job-17"


def test_idempotency_key_reused_for_another_request_is_409_without_retry(server, client):
    file_id = upload(client)
    first = create(client, file_id, extra_headers={"Idempotency-Key": "job-1"})
    with pytest.raises(openai.ConflictError) as caught:
        create(client, file_id, metadata={"changed": "yes"}, extra_headers={"Idempotency-Key": "job-1"})
    assert caught.value.code == "idempotency_key_reused"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert server.count("POST", "/v1/batches") == 2  # the SDK retries 409s unless told not to
    assert [b.id for b in client.batches.list()] == [first.id]


# --- list and retrieve --------------------------------------------------------------------------------


def test_list_batches_newest_first_with_auto_pagination(server, client):
    file_id = upload(client)
    created = [create(client, file_id, metadata={"i": str(i)}).id for i in range(5)]
    newest_first = list(reversed(created))

    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2] and page.has_more is True
    before = server.count("GET", "/v1/batches")
    assert [b.id for b in client.batches.list(limit=2)] == newest_first
    assert server.count("GET", "/v1/batches") - before == 3
    assert [b.id for b in client.batches.list(after=newest_first[1])] == newest_first[2:]
    last = client.batches.list(limit=5)
    assert last.has_more is False and len(last.data) == 5

    raw = server.http().get("/v1/batches", params={"limit": 2}).json()
    assert (raw["object"], raw["first_id"], raw["last_id"], raw["has_more"]) == (
        "list",
        newest_first[0],
        newest_first[1],
        True,
    )
    assert all(set(b) == BATCH_KEYS for b in raw["data"])


def test_list_batches_default_limit_is_20(server, client):
    file_id = upload(client)
    for i in range(21):
        create(client, file_id, metadata={"i": str(i)})
    page = client.batches.list()
    assert len(page.data) == 20 and page.has_more is True
    assert server.http().get("/v1/batches").json()["has_more"] is True


def test_empty_batch_list(server):
    raw = server.http().get("/v1/batches").json()
    assert raw == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


@pytest.mark.parametrize(("limit", "code"), [(0, "invalid_value"), (101, "invalid_value"), ("x", "invalid_type")])
def test_bad_batch_list_limit_is_400(server, limit, code):
    assert_envelope(server.http().get("/v1/batches", params={"limit": limit}), 400, param="limit", code=code)


def test_unknown_batch_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.batches.retrieve("batch_nope")
    assert caught.value.body["message"] == "No such Batch object: batch_nope" and caught.value.param == "id"
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")


class StaticSignals(NullSignals):
    """Live progress as a Valkey-backed runner would publish it."""

    def __init__(self) -> None:
        self.progress: dict[str, tuple[wire.RequestCounts, wire.Usage | None]] = {}

    async def read_progress(self, batch_ids):
        return {b: self.progress[b] for b in batch_ids if b in self.progress}


def test_running_batches_show_live_progress_the_larger_count_winning(server_factory):
    signals = StaticSignals()
    server = server_factory(signals=signals)
    client = server.client()
    batch = create(client, upload(client))
    set_status(server, batch.id, "in_progress", request_counts=wire.RequestCounts(total=10, completed=2, failed=3))
    signals.progress[batch.id] = (
        wire.RequestCounts(total=10, completed=7, failed=1),
        wire.Usage(input_tokens=50, output_tokens=20, total_tokens=70),
    )
    live = client.batches.retrieve(batch.id)
    assert live.request_counts.model_dump() == {"total": 10, "completed": 7, "failed": 3}
    assert live.usage.total_tokens == 70 and live.usage.input_tokens == 50
    assert client.batches.list().data[0].request_counts.completed == 7
    # finished batches show what the database says, whatever is left in the live channel
    set_status(server, batch.id, "completed", request_counts=wire.RequestCounts(total=10, completed=6, failed=4))
    assert client.batches.retrieve(batch.id).request_counts.model_dump() == {"total": 10, "completed": 6, "failed": 4}


# --- cancel -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["validating", "in_progress", "finalizing"])
def test_cancel_moves_a_running_batch_to_cancelling(server, client, status):
    batch = create(client, upload(client))
    if status != "validating":
        set_status(server, batch.id, status)
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None
    assert server.executor.cancelled == [batch.id]
    assert client.batches.retrieve(batch.id).status == "cancelling"


def test_cancel_accepts_an_empty_json_body(server, client):
    batch = create(client, upload(client))
    response = server.http().post(
        f"/v1/batches/{batch.id}/cancel", headers={"Content-Type": "application/json", "Content-Length": "0"}
    )
    assert response.status_code == 200 and response.json()["status"] == "cancelling"


def test_cancel_again_is_200(server, client):
    batch = create(client, upload(client))
    client.batches.cancel(batch.id)
    assert client.batches.cancel(batch.id).status == "cancelling"
    set_status(server, batch.id, "cancelled")
    assert client.batches.cancel(batch.id).status == "cancelled"
    assert server.executor.cancelled == [batch.id]  # only the first cancel had anything to stop


@pytest.mark.parametrize("status", ["completed", "failed", "expired"])
def test_cancel_of_a_finished_batch_is_409_and_not_retried(server, client, status):
    batch = create(client, upload(client))
    set_status(server, batch.id, status)
    with pytest.raises(openai.ConflictError) as caught:
        client.batches.cancel(batch.id)
    assert caught.value.body == {
        "message": f"Cannot cancel a batch with status '{status}'.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert server.count("POST", f"/v1/batches/{batch.id}/cancel") == 1
    assert client.batches.retrieve(batch.id).status == status


# --- parity: the operator's window, the spec's endpoints ----------------------------------------------------------


def test_completion_window_shows_the_window_the_batch_really_has(server_factory):
    from batch_gateway.api.batch_create import window_label

    assert [window_label(s) for s in (86400, 3600, 172800, 5400, 45)] == ["24h", "1h", "48h", "90m", "45s"]
    server = server_factory(completion_window_seconds=3600)
    client = server.client()
    batch = create(client, upload(client))  # clients still ask for "24h", the only value OpenAI accepts
    assert (batch.completion_window, batch.expires_at - batch.created_at) == ("1h", 3600)
    assert client.batches.retrieve(batch.id).completion_window == "1h"


def test_operators_may_allow_other_completion_windows_and_each_batch_shows_its_own(server_factory):
    server = server_factory(completion_windows="1h,4h,24h,72h")
    client = server.client()
    file_id = upload(client)
    for asked, seconds in (("1h", 3600), ("4h", 4 * 3600), ("24h", 86400), ("72h", 72 * 3600)):
        batch = client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window=asked)
        assert (batch.completion_window, batch.expires_at - batch.created_at) == (asked, seconds)
        stored = client.batches.retrieve(batch.id)
        assert (stored.completion_window, stored.expires_at) == (asked, batch.expires_at)
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="2h")
    assert caught.value.body["param"] == "completion_window"
    assert caught.value.body["message"] == "Invalid value: '2h'. Supported values are: '1h', '4h', '24h', and '72h'."


def test_completion_windows_setting_refuses_what_is_not_a_window():
    from batch_gateway.api.batch_create import completion_windows

    assert completion_windows("1h, 24h,90m,3d", 7200) == {"1h": 3600, "24h": 7200, "90m": 5400, "3d": 259200}
    for bad in ("", "1x", "0h", "24", "1h,,4h"):
        with pytest.raises(ValueError, match="--completion-windows"):
            completion_windows(bad, 86400)


def test_every_endpoint_of_the_spec_is_accepted_when_an_upstream_serves_it(server_factory):
    from batch_gateway.sim import SimConfig, SimServer

    with SimServer(SimConfig(time_scale=0)) as sim:
        server = server_factory(upstream=[sim.url])
        client = server.client(max_retries=0)
        file_id = upload(client)
        for endpoint in (
            "/v1/chat/completions",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/responses",
            "/v1/moderations",
        ):
            batch = client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
            assert batch.endpoint == endpoint
        for endpoint in ("/v1/images/generations", "/v1/images/edits", "/v1/videos"):
            with pytest.raises(openai.BadRequestError) as caught:
                client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h")
            assert caught.value.param == "endpoint" and caught.value.code == "invalid_value"
            assert f"The endpoint '{endpoint}' cannot be used with this gateway" in caught.value.message
            assert sim.url not in caught.value.message and "127.0.0.1" not in caught.value.message
        assert len(client.batches.list().data) == 5


def test_an_upstream_that_does_not_answer_does_not_block_batches(server_factory):
    server = server_factory(upstream=["http://127.0.0.1:9"])  # down: its lines will wait for it, as always
    client = server.client(max_retries=0)
    batch = client.batches.create(input_file_id=upload(client), endpoint="/v1/images/edits", completion_window="24h")
    assert batch.status == "validating"


def test_an_unknown_parameter_is_refused_as_openai_does(server, client):
    """OpenAI answers a body parameter it does not know with 400 `unknown_parameter` naming it (its JSON endpoints
    never ignore one); so do POST /v1/batches and the Uploads bodies, nested objects included."""
    upload = client.files.create(file=("in.jsonl", chat_lines(1)), purpose="batch")
    base = {"input_file_id": upload.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    with server.http() as http:
        for body, param in [
            ({**base, "priority": "high"}, "priority"),
            (
                {**base, "output_expires_after": {"anchor": "created_at", "seconds": 3600, "unit": "s"}},
                "output_expires_after.unit",
            ),
        ]:
            response = http.post("/v1/batches", json=body)
            assert_envelope(response, 400)
            assert response.json()["error"] == {
                "message": f"Unknown parameter: '{param}'.",
                "type": "invalid_request_error",
                "param": param,
                "code": "unknown_parameter",
            }
        response = http.post(
            "/v1/uploads",
            json={"bytes": 1, "filename": "a.jsonl", "purpose": "batch", "mime_type": "text/jsonl", "colour": "red"},
        )
        assert_envelope(response, 400, code="unknown_parameter", param="colour")
        error = assert_envelope(http.post("/v1/batches", json=[base]), 400)  # JSON, but no object: never a 500
        assert "could not parse the JSON body" in error["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(**base, extra_body={"priority": "high"})
    assert refused.value.code == "unknown_parameter"
    assert client.batches.list().data == [], "nothing was created"


# --- deadlines: run_stats and metrics of a batch that has not ended -----------------------------------------------


def test_run_stats_of_a_running_batch_show_its_runners_forecast_and_so_do_the_metrics(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    from batch_gateway.store.metadata import BatchForecast

    batch = create(client, upload(client))
    waiting = server.http().get(f"/v1/batches/{batch.id}/run_stats").json()
    assert waiting == {
        "ended": None,
        "status": "validating",
        "expires_at": batch.expires_at,
        "queue": None,  # this test's executor keeps no queue
        "deadline": None,
    }
    set_status(server, batch.id, "in_progress")
    forecast = BatchForecast(
        at=1.0, remaining=40, projected_end_at=batch.expires_at + 60.0, need_share=1.5, at_risk=True, unreachable=True
    )
    server.run(server.services.metadata.save_forecast(batch.id, forecast))
    running = server.http().get(f"/v1/batches/{batch.id}/run_stats").json()
    assert running["status"] == "in_progress" and running["deadline"] == msgspec.to_builtins(forecast)

    samples = {
        (s.name, s.labels.get("batch_id")): s.value
        for family in text_string_to_metric_families(server.http().get("/metrics").text)
        for s in family.samples
    }
    assert samples[("batch_gateway_batch_projected_completion_timestamp_seconds", batch.id)] == batch.expires_at + 60
    assert samples[("batch_gateway_batch_deadline_at_risk", batch.id)] == 1
    assert samples[("batch_gateway_batch_deadline_unreachable", batch.id)] == 1
    set_status(server, batch.id, "completed")  # an ended batch drops out of the per-batch series
    text = server.http().get("/metrics").text
    assert batch.id not in text
    # Another tenant's batch is not found, whatever it stands.
    assert server.http().get("/v1/batches/batch_missing/run_stats").status_code == 404


def test_a_long_queue_has_series_for_its_head_and_a_count_for_each_tenant(server, monkeypatch):
    """Per-batch series stay bounded however many batches wait: the first QUEUE_SERIES of the queue, and each tenant's
    count of the rest with them (run_stats gives any batch's place)."""
    from prometheus_client.parser import text_string_to_metric_families

    from batch_gateway.admission import Place, Waiting
    from batch_gateway.api.metrics import QUEUE_SERIES

    queue = [
        Place(Waiting(f"batch_{i:04d}", "globex" if i % 3 == 0 else "acme", 0.0, 0.0), i + 1, None)
        for i in range(QUEUE_SERIES + 150)
    ]
    monkeypatch.setattr(server.services.executor, "queue", lambda: queue)
    samples = [
        s for family in text_string_to_metric_families(server.http().get("/metrics").text) for s in family.samples
    ]
    positions = {s.labels["batch_id"]: s.value for s in samples if s.name == "batch_gateway_batch_queue_position"}
    assert positions == {f"batch_{i:04d}": i + 1 for i in range(QUEUE_SERIES)}
    waiting = {s.labels["tenant"]: s.value for s in samples if s.name == "batch_gateway_batches_waiting"}
    assert waiting == {"globex": 84, "acme": 166}
