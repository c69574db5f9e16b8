"""vLLM's request `priority` over real HTTP: ignored by a fcfs engine, and with --scheduling-policy priority, a request
of higher priority overtakes a full engine by preempting a lower one."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.helpers import eventually
from tests.sim.conftest import chat, stats

pytestmark = pytest.mark.slow  # the simulator's engine, in real time


def _error(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"])
def test_fcfs_ignores_a_priority_as_vllm_v1_does(sim, path):
    # vLLM's V0 engines answered "Got priority 10 but Priority scheduling is not enabled." with a 400; V1 engines
    # ignore the field, so a batch sent with priority hints to an engine without the policy still runs.
    body = {
        "model": "sim-model",
        "messages": [{"role": "user", "content": "hi"}],
        "prompt": "hi",
        "input": "hi",
        "max_tokens": 2,
        "priority": 10,
    }
    assert httpx.post(sim.url + path, json=body).status_code == 200


@pytest.mark.parametrize("value", ["1", 1.5, True, None, [1]])
def test_priority_must_be_an_integer(start_sim, value):
    server = start_sim(time_scale=0, scheduling_policy="priority")
    error = _error(httpx.post(server.url + "/v1/chat/completions", json={**chat(), "priority": value}))
    assert error["param"] == "priority" and error["message"] == "priority must be an integer."


def _overtake(server, priority: dict) -> tuple[dict, dict, list[dict]]:
    """Fill the engine (4 slots) with 12 long priority-10 requests, hold the scheduler while one more arrives, release.

    The newcomer's response, the counters the moment it came back, and the long requests' responses."""
    long = {**chat(max_tokens=300), "priority": 10} if priority else chat(max_tokens=300)

    async def run() -> tuple[dict, dict, list[dict]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await http.post("/sim/pause")
            batch = [
                asyncio.ensure_future(
                    http.post(
                        "/v1/chat/completions", json={**long, "messages": [{"role": "user", "content": f"long {i}"}]}
                    )
                )
                for i in range(12)
            ]
            while (await http.get("/sim/stats")).json()["waiting"] < 12:
                await asyncio.sleep(0.002)
            await http.post("/sim/resume")
            while (await http.get("/sim/stats")).json()["running"] < 4:
                await asyncio.sleep(0.002)
            await http.post("/sim/pause")  # 4 running, 8 waiting, each with ~300 tokens to go
            newcomer = asyncio.ensure_future(
                http.post("/v1/chat/completions", json={**chat("urgent", max_tokens=2), **priority})
            )
            while (await http.get("/sim/stats")).json()["waiting"] < 9:
                await asyncio.sleep(0.002)
            await http.post("/sim/resume")
            answer = await newcomer
            counters = (await http.get("/sim/stats")).json()
            rest = await asyncio.gather(*batch)
        assert answer.status_code == 200 and all(r.status_code == 200 for r in rest)
        return answer.json(), counters, [r.json() for r in rest]

    return asyncio.run(run())


def test_a_higher_priority_request_overtakes_a_full_engine(start_sim):
    server = start_sim(scheduling_policy="priority", max_num_seqs=4, time_scale=0.1)  # 1 ms steps
    answer, when_answered, batch = _overtake(server, {"priority": 0})
    assert answer["usage"]["completion_tokens"] == 2
    assert when_answered["completed"] == 1  # its own two steps: none of the 300-token requests finished before it
    assert when_answered["preemptions"] == 1  # one slot needed, one lower-priority request gave it up
    # The preempted request recomputed and still produced all of its output.
    assert [r["usage"]["completion_tokens"] for r in batch] == [300] * 12
    metrics = httpx.get(server.url + "/metrics").text
    assert 'vllm:num_preemptions_total{model_name="sim-model",engine="0"} 1.0' in metrics


def test_with_fcfs_it_waits_its_turn(start_sim):
    server = start_sim(max_num_seqs=4, time_scale=0.1)
    _, when_answered, batch = _overtake(server, {})
    assert when_answered["completed"] == 13  # it waited for the twelve that arrived before it: three rounds of four
    assert when_answered["preemptions"] == 0
    assert [r["usage"]["completion_tokens"] for r in batch] == [300] * 12


def test_priority_orders_the_queue_and_ties_go_by_arrival(start_sim):
    # The order is read as the client gets the answers: 5 ms steps, so that one request ends 100 ms after the one
    # before and a busy client cannot take two answers in the other order (1 ms steps, 3 ms apart, once did).
    server = start_sim(scheduling_policy="priority", max_num_seqs=1, time_scale=0.5)
    httpx.post(server.url + "/sim/pause")
    order: list[str] = []

    async def one(http: httpx.AsyncClient, name: str, priority: int) -> None:
        response = await http.post("/v1/chat/completions", json={**chat(name, max_tokens=20), "priority": priority})
        assert response.status_code == 200
        order.append(name)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            tasks = []
            for count, (name, priority) in enumerate([("c", 5), ("a", -1), ("b", 3), ("a2", -1)], start=1):
                tasks.append(asyncio.ensure_future(one(http, name, priority)))
                while (await http.get("/sim/stats")).json()["waiting"] < count:  # arrivals in this order
                    await asyncio.sleep(0.002)
            await http.post("/sim/resume")
            await asyncio.gather(*tasks)

    asyncio.run(run())
    assert order == ["a", "a2", "b", "c"]
    assert stats(server)["preemptions"] == 0  # all waiting, a free slot each time: nothing to preempt


def test_equal_priorities_never_preempt_each_other(start_sim):
    server = start_sim(scheduling_policy="priority", max_num_seqs=1, time_scale=0.1)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        import threading

        first = threading.Thread(
            target=http.post,
            args=("/v1/chat/completions",),
            kwargs={"json": {**chat("one", max_tokens=100), "priority": 3}},
        )
        first.start()
        eventually(lambda: stats(server)["running"] == 1, timeout=5, interval=0.005)
        assert http.post("/v1/chat/completions", json={**chat("two", max_tokens=2), "priority": 3}).status_code == 200
        first.join()
    assert stats(server)["preemptions"] == 0
