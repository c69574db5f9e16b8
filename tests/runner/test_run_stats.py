"""The figures GET /v1/batches/{id}/run_stats shows: how dispatch went, and the batch's totals."""

from __future__ import annotations

import msgspec

from batch_gateway import wire
from batch_gateway.runner.checkpoint import Totals
from batch_gateway.runner.run_stats import DispatchStats, final_stats
from batch_gateway.runner.stop import StopReason


def test_a_run_that_dispatched_shows_how_it_ended_and_its_endpoints_by_name():
    dispatch = DispatchStats(
        dispatch_seconds=1.5,
        requests_sent_this_run=3,
        resumed_with_done=1,
        retries=2,
        preempted=0,
        preempted_tokens_estimate=0,
        prefix_warm_ups=0,
        prefix_warm_ups_failed=0,
        prefix_joins=0,
        ended=StopReason.CANCELLED,
        deadline={"at_risk": True, "unreachable": False},
        endpoints={"endpoint-0": {"limit": 4}},
    )
    usage = wire.Usage(input_tokens=10, input_tokens_details=wire.InputTokensDetails(cached_tokens=4))
    stats = msgspec.json.decode(final_stats(dispatch, Totals(completed=2, failed=1, usage=usage)))
    assert stats["ended"] == "cancelled" and stats["endpoints"] == {"endpoint-0": {"limit": 4}}
    assert stats["deadline"] == {"at_risk": True, "unreachable": False}  # the deadline tracker's summary
    assert (stats["completed"], stats["failed"], stats["prefix_cache_hit_rate"]) == (2, 1, 0.4)
    assert "endpoints" not in dispatch.loggable() and dispatch.loggable()["retries"] == 2


def test_a_run_that_sent_nothing_shows_the_totals_alone():
    assert msgspec.json.decode(final_stats(None, Totals(completed=5))) == {
        "completed": 5,
        "failed": 0,
        "prefix_cache_hit_rate": None,
    }
