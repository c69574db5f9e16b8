"""The per-endpoint circuit: "not now" opens it, one probe at a time tests the endpoint, any answer closes it."""

from __future__ import annotations

from batch_gateway.runner.circuit import PROBE_BASE, PROBE_CAP, Circuit, CircuitState


def circuit() -> Circuit:
    return Circuit(jitter=lambda: 1.0)  # no randomness: waits are exactly PROBE_BASE * 2^n


def test_not_now_opens_and_the_probe_waits_its_turn():
    c = circuit()
    assert c.closed and c.seconds_to_probe(0.0) is None
    assert c.on_unavailable(10.0, send=1, probe=False)
    assert c.state is CircuitState.OPEN and c.seconds_to_probe(10.0) == PROBE_BASE
    assert not c.try_probe(10.0 + PROBE_BASE / 2)
    assert c.try_probe(10.0 + PROBE_BASE)
    assert c.state is CircuitState.PROBING and not c.try_probe(11.0)  # one probe at a time
    c.on_answer(11.0, send=2)
    assert c.closed and c.openings == 1 and c.snapshot(11.0)["open_seconds"] == 1.0


def test_failed_probes_back_off_exponentially_up_to_the_cap():
    c = circuit()
    c.on_unavailable(0.0, send=1, probe=False)
    now, waits = 0.0, []
    for send in range(2, 12):
        now += c.seconds_to_probe(now)
        assert c.try_probe(now)
        c.on_unavailable(now, send=send, probe=True)
        waits.append(c.seconds_to_probe(now))
    assert waits[:3] == [2 * PROBE_BASE, 4 * PROBE_BASE, 8 * PROBE_BASE]
    assert max(waits) == PROBE_CAP


def test_retry_after_sets_the_wait():
    c = circuit()
    c.on_unavailable(0.0, send=1, probe=False, retry_after=7.0)
    assert c.seconds_to_probe(0.0) == 7.0


def test_a_stale_not_now_does_not_open_a_circuit_that_answered_since():
    c = circuit()
    c.on_answer(1.0, send=5)  # request 5 was answered...
    assert not c.on_unavailable(1.1, send=4, probe=False)  # ...so request 4's reset says nothing new
    assert c.closed
    assert c.on_unavailable(1.2, send=6, probe=False)


def test_failures_of_requests_sent_before_the_opening_do_not_extend_it():
    c = circuit()
    c.on_unavailable(0.0, send=10, probe=False)
    c.on_unavailable(0.2, send=11, probe=False)
    assert c.seconds_to_probe(0.2) == PROBE_BASE - 0.2 and c.openings == 1


def test_an_abandoned_probe_lets_the_next_one_go_at_once():
    c = circuit()
    c.on_unavailable(0.0, send=1, probe=False)
    assert c.try_probe(PROBE_BASE)
    c.abandon_probe(PROBE_BASE)
    assert c.state is CircuitState.OPEN and c.try_probe(PROBE_BASE)
