"""One reading of an engine's gauges: what engine_metrics.py reads from `/metrics` and the controller acts on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineReading:
    """One reading of the engine's gauges (summed over its label sets)."""

    running: float
    waiting: float
    kv_usage: float | None = None
    step_seconds: float | None = None  # mean inter-token latency since the previous reading, if the engine says
    step_tokens: float | None = None  # ...and the tokens it is the mean over
    running_mean: float | None = None  # sequences decoding on average over that time (its ITL sum / the time)
    completed: float | None = None  # requests it finished, all clients, since it started
    # Output tokens of the requests it finished, all clients, since it started, where the engine counts them as each
    # request ends (llama.cpp): users' share of them shows users that publish no count of finished requests.
    finished_tokens: float | None = None
    queue_seconds: float | None = None  # mean time the requests admitted since the previous reading had waited
    prompt_per_step: float | None = None  # prompt tokens it computed per step since then (not found in its cache)
    # Its waiting requests found every slot taken (llama.cpp's deferred requests), rather than being arrivals the
    # engine has not yet scheduled (vLLM's waiting requests, which include those between two steps).
    waiting_means_full: bool = False

    @property
    def counted_at_end(self) -> bool:
        """The step time is the mean over the requests that ended since the previous reading, each over its whole
        decoding (llama.cpp), not over the time since that reading (vLLM's histograms, counted as tokens are made)."""
        return self.finished_tokens is not None
