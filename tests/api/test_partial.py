"""GET /v1/batches/{id}/partial_results (an extension): never a 500, never a line missed."""

from __future__ import annotations

import json

from batch_gateway import ids, wire
from batch_gateway.runner.checkpoint import Checkpoints
from batch_gateway.store.metadata import FileRecord
from batch_gateway.store.objects import batch_prefix, file_key
from batch_gateway.store.parts import Parts, ResultKind
from tests.helpers import chat_lines

ENDPOINT = "/v1/chat/completions"


def result(line: int) -> bytes:
    return json.dumps(
        {"id": f"batch_req_{line}", "custom_id": f"req-{line}", "response": {"status_code": 200}, "error": None}
    ).encode()


def start_batch(server, client) -> str:
    file_id = client.files.create(file=("in.jsonl", chat_lines(2)), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
    moved = server.run(server.services.metadata.transition(batch.id, ["validating"], "in_progress", ids.now()))
    assert moved is not None
    return batch.id


async def finalize(server, batch_id: str, checkpoints: Checkpoints, count: int) -> str:
    """What the runner does at the end: the output file from the parts, the terminal status, then the parts go."""
    services = server.services
    output_id = ids.result_file_id(batch_id, "output")
    size = await checkpoints.write_file(file_key("default", output_id), ResultKind.OUTPUT, count)
    await services.metadata.insert_file(
        FileRecord(
            id=output_id,
            tenant="default",
            bytes=size,
            created_at=ids.now(),
            filename=f"{batch_id}_output.jsonl",
            purpose="batch_output",
            object_key=file_key("default", output_id),
            expires_at=ids.now() + 3600,
        )
    )
    counts = wire.RequestCounts(total=count, completed=count)
    await services.metadata.transition(batch_id, ["in_progress"], "finalizing", ids.now())
    assert await services.metadata.transition(
        batch_id, ["finalizing"], "completed", ids.now(), output_file_id=output_id, request_counts=counts
    )
    await checkpoints.delete()
    return output_id


def partial(server, batch_id: str):
    return server.http().get(f"/v1/batches/{batch_id}/partial_results")


def test_a_deleted_output_file_gives_an_empty_200(server, client):
    batch_id = start_batch(server, client)
    writer = Checkpoints(server.services.objects, batch_prefix("default", batch_id), "runner-a")
    for line in range(3):
        writer.add(line, ResultKind.OUTPUT, None, result(line))
    server.run(writer.flush())
    output_id = server.run(finalize(server, batch_id, writer, 3))
    response = partial(server, batch_id)
    assert response.status_code == 200 and len(response.content.splitlines()) == 3

    client.files.delete(output_id)
    response = partial(server, batch_id)
    assert response.status_code == 200, response.text
    assert response.content == b"" and response.headers["content-type"].startswith("application/jsonl")


def test_a_batch_ending_while_its_parts_are_read_misses_no_line(server, client, monkeypatch):
    batch_id = start_batch(server, client)
    writer = Checkpoints(server.services.objects, batch_prefix("default", batch_id), "runner-a")
    for line in range(10):  # ten parts of one line each
        writer.add(line, ResultKind.OUTPUT, None, result(line))
        server.run(writer.flush())
    listing = Parts.part_keys
    calls = 0

    async def list_then_finalize(self: Parts) -> list[str]:
        nonlocal calls
        calls += 1
        keys = await listing(self)
        if calls == 1:  # the reader has listed the parts; the runner finishes before it reads them
            await finalize(server, batch_id, writer, 10)
        return keys

    monkeypatch.setattr(Parts, "part_keys", list_then_finalize)
    response = partial(server, batch_id)
    assert response.status_code == 200, response.text
    lines = [json.loads(line)["custom_id"] for line in response.content.splitlines()]
    assert sorted(lines) == sorted(f"req-{i}" for i in range(10))  # each once
    assert calls >= 2  # the reader met the deleted parts and listed again
