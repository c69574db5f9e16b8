"""Priority hints for serving stacks that can put batch work behind interactive work. Opt-in, per model.

`--priority-hints [MODEL=]HINT[,HINT]`, where a HINT is:

* `llm-d[:OBJECTIVE]`: llm-d's inference gateway headers. `x-gateway-inference-objective: OBJECTIVE` names the
  InferenceObjective whose priority the gateway applies (default `batch`; configure it below your interactive one,
  so flow control sheds batch first), `x-gateway-inference-fairness-id` is the batch's tenant, and
  `x-slo-ttft-ms` the milliseconds left before the batch's deadline (`expires_at`).
* `vllm-priority[:N]`: vLLM's request `priority` (lower runs first; interactive requests default to 0), for engines
  started with `--scheduling-policy priority`, which then preempt batch sequences for interactive ones. Default N
  is 10. It is spliced into the body's bytes, never re-serialised, and a line that sets its own `priority` keeps it.

Request bodies are otherwise forwarded byte for byte; headers never carry anything but the above.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from batch_gateway.upstreams.routes import DEFAULT_MODEL

LLM_D_OBJECTIVE = "batch"
VLLM_PRIORITY = 10


class _Priority(msgspec.Struct):
    priority: object = msgspec.UNSET


_priority_decoder = msgspec.json.Decoder(_Priority)


@dataclass(frozen=True)
class Hints:
    llm_d_objective: str | None = None
    vllm_priority: int | None = None

    def apply(
        self, body: bytes, *, tenant: str, expires_at: float, now: float | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """The body and extra headers to send for one request of the batch."""
        headers: dict[str, str] = {}
        if self.llm_d_objective is not None:
            left = max(0.0, expires_at - (time.time() if now is None else now))
            headers = {
                "x-gateway-inference-objective": self.llm_d_objective,
                "x-gateway-inference-fairness-id": tenant,
                "x-slo-ttft-ms": str(int(left * 1000)),
            }
        if self.vllm_priority is not None:
            body = with_priority(body, self.vllm_priority)
        return body, headers


def with_priority(body: bytes, priority: int) -> bytes:
    """`body` (a JSON object) with `"priority": priority` added in front, unless it sets a priority itself."""
    try:
        if _priority_decoder.decode(body).priority is not msgspec.UNSET:
            return body
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return body
    start = body.index(b"{") + 1
    rest = body[start:].lstrip()
    separator = b"" if rest.startswith(b"}") else b","
    return b'{"priority":%d%s%s' % (priority, separator, body[start:])


def parse_hints(items: list[str]) -> dict[str, Hints]:
    """`["llm-d", "llama=vllm-priority:5,llm-d:bulk"]` → hints by model (`*` for every model without its own)."""
    by_model: dict[str, Hints] = {}
    for item in items:
        model, sep, spec = item.partition("=")
        if not sep:
            model, spec = DEFAULT_MODEL, item
        objective: str | None = None
        priority: int | None = None
        for hint in (h.strip() for h in spec.split(",") if h.strip()):
            name, _, value = hint.partition(":")
            if name == "llm-d":
                objective = value or LLM_D_OBJECTIVE
            elif name == "vllm-priority":
                try:
                    priority = int(value) if value else VLLM_PRIORITY
                except ValueError:
                    raise ValueError(
                        f"--priority-hints {item!r}: vllm-priority takes an integer, got {value!r}"
                    ) from None
            else:
                raise ValueError(
                    f"--priority-hints {item!r}: unknown hint {name!r}; use llm-d[:OBJECTIVE] or vllm-priority[:N]"
                )
        by_model[model.strip()] = Hints(objective, priority)
    return by_model


def hints_for(by_model: Mapping[str, Hints], model: str) -> Hints:
    return by_model.get(model) or by_model.get(DEFAULT_MODEL) or Hints()
