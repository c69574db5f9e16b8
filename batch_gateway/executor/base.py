"""How a batch gets a runner: one short-lived runner process per batch, started by an executor.

`local.py` starts a subprocess on this machine; `argo.py` creates an Argo Workflow that starts one runner pod.
Executors are idempotent: submitting a batch twice starts one runner (the runner's lease makes sure of it too).
"""

from __future__ import annotations

import abc
import enum
import math

from batch_gateway import ids, wire
from batch_gateway.admission import Place
from batch_gateway.store.metadata import MetadataStore


class RunState(enum.Enum):
    RUNNING = "running"  # a runner is (or will shortly be) working on the batch
    FINISHED = "finished"  # the runner exited (succeeded or not)
    FAILED = "failed"  # the run failed or errored without finishing the batch
    UNKNOWN = "unknown"  # the executor has no record of the batch (never submitted, or the record vanished)


class Executor(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None:
        """Get ready to accept submissions."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop accepting work. Runners already started keep going (they resume after a restart anyway)."""

    @abc.abstractmethod
    async def submit(self, batch_id: str, *, tenant: str, model: str | None = None, deadline: float = math.inf) -> None:
        """Arrange for one runner to run the batch, when admission (`admission.py`) lets it start: `deadline` is its
        expires_at. Calling it again for the same batch is a no-op."""

    @abc.abstractmethod
    async def cancel(self, batch_id: str) -> None:
        """Ask the batch's runner to stop gracefully (it finalises partial results). Best effort: the runner also
        watches the batch status."""

    @abc.abstractmethod
    async def state(self, batch_id: str) -> RunState:
        """What the executor knows of the batch's run, for the reconciler."""

    def queue_place(self, batch_id: str) -> Place | None:
        """The batch's place in the admission queue as of the last admission pass (None: not waiting)."""
        return None

    def queue(self) -> list[Place]:
        """The waiting batches in the order they will start, as of the last admission pass."""
        return []


# What the tenant reads when even the runner that gives up crashed: nothing of the executor's internals (Workflow
# names, namespaces, Kubernetes' messages), which go to the operator's logs with the batch id.
UNPUBLISHED = (
    "The batch runner crashed repeatedly and its results could not be published; the operator can find why in the "
    "runner's logs for this batch id."
)


async def end_unpublished(metadata: MetadataStore, batch_id: str) -> None:
    """The last resort, when the runner that publishes what finished and ends the batch crashed too: the batch ends
    without its files, `failed`, or `cancelled` if its tenant cancelled it (a cancelled batch ends cancelled)."""
    errors = [wire.BatchError(code="runner_failed", message=UNPUBLISHED)]
    running = [wire.BatchStatus.VALIDATING, wire.BatchStatus.IN_PROGRESS, wire.BatchStatus.FINALIZING]
    now = ids.now()
    if await metadata.transition(batch_id, running, wire.BatchStatus.FAILED, now, errors=errors) is None:
        await metadata.transition(
            batch_id, [wire.BatchStatus.CANCELLING], wire.BatchStatus.CANCELLED, now, errors=errors
        )
