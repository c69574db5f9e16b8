"""The metadata store: files, uploads, batches, runner leases and API keys.

One interface, implemented once in SQL (`sql_store.py`) for SQLite and PostgreSQL. Every query is scoped by tenant where
a tenant is given (`tenant=None` is the service's own view, used by runners and gc). Every status change is a
compare-and-set in one statement, so a cancel racing a completion can never produce an illegal transition.

A file deleted while an unfinished batch reads it as input is *hidden*: no read returns it any more, but its row and
bytes stay (the runner reads the bytes by key) until gc finds no unfinished batch reading it.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Collection
from typing import Any

import msgspec

from batch_gateway import wire


class FileRecord(msgspec.Struct):
    id: str
    tenant: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object_key: str
    expires_at: int | None = None
    status: str = "processed"

    def to_wire(self) -> wire.FileObject:
        return wire.FileObject(
            id=self.id,
            bytes=self.bytes,
            created_at=self.created_at,
            filename=self.filename,
            purpose=self.purpose,
            status=self.status,
            expires_at=self.expires_at,
        )


class BatchRecord(msgspec.Struct):
    id: str
    tenant: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: wire.BatchStatus
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    output_expires_after: int | None = None  # seconds after the output file's creation
    model: str | None = None
    errors: list[wire.BatchError] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: wire.RequestCounts = msgspec.field(default_factory=wire.RequestCounts)
    usage: wire.Usage | None = None
    fingerprint: str | None = None  # hash of the create request, to fold SDK retries into one batch
    idempotency_key: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in wire.TERMINAL_STATUSES

    def to_wire(self) -> wire.Batch:
        return wire.Batch(
            id=self.id,
            endpoint=self.endpoint,
            input_file_id=self.input_file_id,
            completion_window=self.completion_window,
            status=self.status,
            created_at=self.created_at,
            model=self.model,
            errors=wire.BatchErrors(data=self.errors) if self.errors else None,
            output_file_id=self.output_file_id,
            error_file_id=self.error_file_id,
            in_progress_at=self.in_progress_at,
            expires_at=self.expires_at,
            finalizing_at=self.finalizing_at,
            completed_at=self.completed_at,
            failed_at=self.failed_at,
            expired_at=self.expired_at,
            cancelling_at=self.cancelling_at,
            cancelled_at=self.cancelled_at,
            request_counts=self.request_counts,
            usage=self.usage,
            metadata=self.metadata,
        )


class UploadStatus(enum.StrEnum):
    """An upload's stored status. `completing` is shown to clients as `pending`; a pending upload past its
    `expires_at` is shown as `expired` before gc gets to it."""

    PENDING = "pending"  # parts may be added
    COMPLETING = "completing"  # one complete request is assembling the file
    COMPLETED = "completed"  # the File exists (file_id)
    CANCELLED = "cancelled"
    EXPIRED = "expired"


# Uploads whose parts are still needed.
OPEN_UPLOAD_STATUSES: tuple[str, ...] = (UploadStatus.PENDING.value, UploadStatus.COMPLETING.value)


class UploadRecord(msgspec.Struct):
    """An upload (POST /v1/uploads): a file of `bytes` bytes that arrives in parts."""

    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int  # as declared at creation; the parts must add up to it
    mime_type: str
    status: str
    created_at: int
    expires_at: int  # the upload's own expiry (an hour), not the File's
    file_expires_after: int | None = None  # the File's expiry policy, in seconds after its creation
    file_id: str | None = None

    def shown_status(self, now: int) -> str:
        if self.status in OPEN_UPLOAD_STATUSES:
            return UploadStatus.EXPIRED.value if now >= self.expires_at else UploadStatus.PENDING.value
        return self.status


class UploadPartRecord(msgspec.Struct):
    id: str
    upload_id: str
    tenant: str
    bytes: int
    created_at: int
    object_key: str


class ApiKeyRecord(msgspec.Struct):
    id: str
    tenant: str
    key_hash: str
    prefix: str  # the first characters, so an operator can tell keys apart in `keys list`
    created_at: int
    revoked_at: int | None = None


class WebhookState(enum.Enum):
    PENDING = "pending"  # waiting for (another) delivery attempt
    DELIVERED = "delivered"  # the receiver answered 2xx
    DROPPED = "dropped"  # the tenant has no webhook: nothing to send
    FAILED = "failed"  # retried for the whole retry window without success


class WebhookEventRecord(msgspec.Struct):
    """A webhook event in the outbox, as a claim hands it out. The id is the event's `evt_...` id: it stays the same
    on every attempt, so receivers can drop duplicates."""

    id: str
    batch_id: str
    tenant: str
    type: str  # batch.completed | batch.failed | batch.expired | batch.cancelled
    created_at: int  # when the batch reached its terminal status
    attempts: int  # delivery attempts started, the one this claim is for included


class RunnerLoad(msgspec.Struct, frozen=True):
    """One batch runner's use of one upstream endpoint, as published on the load board."""

    owner: str
    inflight: int  # requests sent and not yet answered
    limit: int  # what it may have in flight: it fills up to this within moments, or drains down to it
    demand: int  # requests it could have in flight now (its limit if it has the work, else its remaining work)
    completed: int  # its requests answered on the endpoint, all time
    weight: float = 1.0
    at: float = 0.0  # when it was published (Unix seconds)
    tenant: str = ""  # whose batch it runs: a tenant's runners on one engine share the tenant's weight
    budget: float = 0.0  # sequences all batch work may run within the interactive budget, by its own fit (0: none)


class TenantPolicy(msgspec.Struct, frozen=True):
    """How a tenant's batches are admitted (`batch-gateway keys tenant NAME --weight W --max-running N`)."""

    weight: float = 1.0  # its share of the runner slots and of an engine's batch share, against other tenants'
    max_running: int | None = None  # most of its batches running at once (None: no cap beyond the fair share)


class BatchForecast(msgspec.Struct, frozen=True):
    """A running batch's outlook, as its runner last saw it (refreshed every few seconds)."""

    at: float  # when it was made (Unix seconds)
    remaining: int  # requests without a result
    projected_end_at: float | None  # when it ends at its current pace (None: no pace measured yet)
    need_share: float | None  # share of the engine's whole batch share it needs to end in time (>1: it cannot)
    at_risk: bool  # at its current pace it ends after its deadline
    unreachable: bool  # even the whole batch share of its engine would not end it in time


class StorageStats(msgspec.Struct):
    batches_by_status: dict[str, int]
    files_by_purpose: dict[str, tuple[int, int]]  # purpose → (count, bytes)
    overdue_batches: int = 0  # not terminal, past expires_at: no runner or gc is ending them
    near_deadline_batches: int = 0  # not terminal, in the last fifth of their completion window


# A batch is "near its deadline" in the last 1/NEAR_DEADLINE_FRACTION of its window (created_at to expires_at).
NEAR_DEADLINE_FRACTION = 5


# Columns a transition may change besides the status and its timestamp.
TRANSITION_FIELDS = frozenset({"model", "errors", "output_file_id", "error_file_id", "request_counts", "usage"})


class MetadataStore(abc.ABC):
    """Async access to the metadata. Implementations translate driver errors into `StorageUnavailable`."""

    # --- lifecycle ---
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending schema migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise `StorageUnavailable` when the database cannot answer."""

    # --- files ---
    @abc.abstractmethod
    async def insert_file(self, record: FileRecord) -> None:
        """Insert a file; inserting the same id again is a no-op (result files are written idempotently)."""

    @abc.abstractmethod
    async def get_file(self, file_id: str, tenant: str | None) -> FileRecord | None:
        """The file, unless it is missing, another tenant's or hidden."""

    @abc.abstractmethod
    async def list_files(
        self, tenant: str, *, purpose: str | None, order: str, after: str | None, limit: int
    ) -> tuple[list[FileRecord], bool]:
        """A page of files (hidden ones left out) in creation order (`asc` or `desc`) after the file `after`, and
        whether more follow."""

    @abc.abstractmethod
    async def delete_file(self, file_id: str, tenant: str | None) -> bool:
        """Delete the file's row, hidden or not, keeping its place in its tenant's list for cursors a while
        (`forget_file_cursors`)."""

    @abc.abstractmethod
    async def hide_file(self, file_id: str, tenant: str | None, now: int) -> FileRecord | None:
        """Hide the file from every read (the first step of deleting it); returns it, or None if it was missing,
        another tenant's or hidden already."""

    @abc.abstractmethod
    async def file_in_use(self, file_id: str) -> bool:
        """Whether an unfinished batch reads this file as its input."""

    @abc.abstractmethod
    async def forget_file_cursors(self, deleted_before: int) -> int:
        """Forget the list places of files deleted before then (a list's `after` naming one gives an empty page);
        returns how many."""

    @abc.abstractmethod
    async def deletable_hidden_files(self, limit: int) -> list[FileRecord]:
        """Hidden files that no unfinished batch reads any more, hidden longest first."""

    @abc.abstractmethod
    async def expired_files(self, now: int, limit: int) -> list[FileRecord]:
        """Files (hidden ones left out) whose `expires_at` has passed, oldest expiry first."""

    # --- uploads: a file sent in parts ---
    @abc.abstractmethod
    async def insert_upload(self, record: UploadRecord) -> None: ...

    @abc.abstractmethod
    async def get_upload(self, upload_id: str, tenant: str | None) -> UploadRecord | None: ...

    @abc.abstractmethod
    async def add_upload_part(self, part: UploadPartRecord, now: int) -> bool:
        """Record a part whose bytes are stored, only while its upload (of the part's tenant) is pending and has not
        expired by `now`. False: it is not (the caller deletes the bytes again)."""

    @abc.abstractmethod
    async def upload_parts(self, upload_id: str) -> list[UploadPartRecord]:
        """The upload's parts, in the order they were recorded."""

    @abc.abstractmethod
    async def transition_upload(
        self,
        upload_id: str,
        tenant: str | None,
        from_statuses: Collection[str],
        to_status: str,
        *,
        unexpired_at: int | None = None,
    ) -> UploadRecord | None:
        """Compare-and-set the upload's status; with `unexpired_at`, only an upload that has not expired by then
        moves. Returns the updated upload, or None if it did not match."""

    @abc.abstractmethod
    async def complete_upload(self, upload_id: str, file: FileRecord) -> UploadRecord | None:
        """In one transaction: move the upload from `completing` to `completed`, naming `file`, and insert `file`.
        None (and no file) when the upload was not `completing` any more (gc expired it)."""

    @abc.abstractmethod
    async def expire_uploads(self, now: int, limit: int) -> list[UploadRecord]:
        """Move up to `limit` open uploads (pending, completing) whose `expires_at` has passed to `expired`, and
        return them."""

    @abc.abstractmethod
    async def stale_upload_parts(self, limit: int) -> list[UploadPartRecord]:
        """Parts of uploads that are no longer open (completed, cancelled, expired), oldest first."""

    @abc.abstractmethod
    async def delete_upload_part(self, part_id: str) -> None: ...

    # --- batches ---
    @abc.abstractmethod
    async def insert_batch(self, record: BatchRecord) -> tuple[BatchRecord, bool]:
        """Insert a batch. If the tenant already has a batch with the same `idempotency_key`, return that one and
        False instead."""

    @abc.abstractmethod
    async def claim_fold(
        self, tenant: str, fingerprint: str, batch_id: str, now: int, older_than: int | None
    ) -> str | None:
        """SDK retry folding: record that `batch_id` is (about to be) created from the request `fingerprint`, and
        return the batch that request belongs to. With `older_than=None` (a first try) `batch_id` always takes the
        fingerprint over; otherwise (a retry) only from a batch recorded before `older_than`, and when a newer one
        holds it, that one's id is returned. One statement decides between concurrent claims. None: the record
        vanished meanwhile (released); claim again."""

    @abc.abstractmethod
    async def release_fold(self, tenant: str, fingerprint: str, batch_id: str) -> None:
        """Forget the fold if it still names `batch_id` (its creation failed, or never happened)."""

    @abc.abstractmethod
    async def get_batch(self, batch_id: str, tenant: str | None) -> BatchRecord | None: ...

    @abc.abstractmethod
    async def list_batches(self, tenant: str, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        """A page of batches, newest first, after the batch `after`, and whether more follow."""

    @abc.abstractmethod
    async def transition(
        self,
        batch_id: str,
        from_statuses: Collection[wire.BatchStatus],
        to_status: wire.BatchStatus,
        now: int,
        **changes: Any,
    ) -> BatchRecord | None:
        """Compare-and-set: move the batch to `to_status` (setting `<to_status>_at = now` if it is unset) only if its
        status is one of `from_statuses`. Returns the updated batch, or None if the status did not match."""

    @abc.abstractmethod
    async def save_progress(self, batch_id: str, counts: wire.RequestCounts, usage: wire.Usage | None) -> None:
        """Store live counts and usage of a running batch (no status change)."""

    @abc.abstractmethod
    async def batches_with_status(
        self, statuses: Collection[wire.BatchStatus], limit: int = 1000
    ) -> list[BatchRecord]: ...

    @abc.abstractmethod
    async def overdue_batches(self, now: int, limit: int = 1000) -> list[BatchRecord]:
        """Batches not yet terminal whose `expires_at` has passed."""

    async def storage_stats(self, now: int | None = None) -> StorageStats:
        """Counts for metrics (all tenants): batches by status, files and bytes by purpose, and active batches
        that are overdue or near their deadline at `now` (default: the current time)."""
        raise NotImplementedError(f"{type(self).__name__} does not report storage stats")

    # --- runner leases: only one runner may work on a batch at a time ---
    @abc.abstractmethod
    async def claim_batch(self, batch_id: str, owner: str, now: int, lease_seconds: int) -> bool:
        """Take the batch for `owner` if nobody holds an unexpired lease on it (or `owner` already does)."""

    @abc.abstractmethod
    async def renew_lease(self, batch_id: str, owner: str, now: int, lease_seconds: int) -> bool:
        """Extend the lease; False when another runner has taken the batch over."""

    @abc.abstractmethod
    async def release_batch(self, batch_id: str, owner: str) -> None: ...

    @abc.abstractmethod
    async def leased_batches(self, now: int) -> set[str]:
        """Ids of unfinished batches a runner holds an unexpired lease on: a live runner owns them."""

    # --- the load board: batch runners sharing an endpoint see each other ---
    @abc.abstractmethod
    async def share_load(self, endpoint: str, load: RunnerLoad, fresh_after: float) -> list[RunnerLoad]:
        """Publish this runner's load on `endpoint` and return the other runners' loads published since
        `fresh_after` (older ones are of runners gone or stuck)."""

    @abc.abstractmethod
    async def withdraw_load(self, owner: str, older_than: float) -> None:
        """Remove this runner's loads (its dispatch ended), and anyone's not refreshed since `older_than`."""

    # --- deadlines: tenants' admission policies, running batches' forecasts ---
    @abc.abstractmethod
    async def set_tenant_policy(self, tenant: str, policy: TenantPolicy) -> None:
        """Set a tenant's weight and cap on running batches (tenants without one have the defaults)."""

    @abc.abstractmethod
    async def tenant_policies(self) -> dict[str, TenantPolicy]:
        """Every tenant's policy that was set."""

    @abc.abstractmethod
    async def save_forecast(self, batch_id: str, forecast: BatchForecast) -> None:
        """Keep a running batch's latest forecast beside it (no status change)."""

    @abc.abstractmethod
    async def forecasts(self, batch_ids: Collection[str]) -> dict[str, BatchForecast]:
        """The latest forecasts of these batches, where their runners made one."""

    @abc.abstractmethod
    async def add_webhook_event(self, event_id: str, batch_id: str, tenant: str, type: str, now: int) -> bool:
        """Put an extension event (not a status change) in the webhook outbox; False if `event_id` is there already,
        so a restarted runner never sends it twice."""

    # --- webhook outbox: a trigger on `batches` writes one event per terminal status change ---
    @abc.abstractmethod
    async def claim_webhook_events(self, now: float, lease_seconds: float, limit: int) -> list[WebhookEventRecord]:
        """Take up to `limit` pending events that are due, oldest first, counting an attempt for each. A claim is a
        lease: the events are not due again for `lease_seconds`, so concurrent deliverers (several API replicas)
        never take the same event, and one whose deliverer died is taken again once the lease has run out."""

    @abc.abstractmethod
    async def reschedule_webhook_event(self, event_id: str, due_at: float, error: str) -> None:
        """A failed attempt: try again at `due_at`, keeping `error` for the operator (only while still pending)."""

    @abc.abstractmethod
    async def finish_webhook_event(
        self, event_id: str, state: WebhookState, now: int, error: str | None = None
    ) -> None:
        """The event will not be sent again: delivered, dropped or failed."""

    # --- API keys ---
    @abc.abstractmethod
    async def insert_key(self, record: ApiKeyRecord) -> None: ...

    @abc.abstractmethod
    async def list_keys(self) -> list[ApiKeyRecord]: ...

    @abc.abstractmethod
    async def revoke_key(self, key_id: str, now: int) -> bool: ...

    @abc.abstractmethod
    async def active_key_count(self) -> int: ...

    @abc.abstractmethod
    async def tenant_for_key_hash(self, key_hash: str) -> str | None: ...
