"""The OpenAI wire format: Batch and File objects, list pages, JSONL result lines.

Every key of the Batch and File objects is always sent, with `null` where empty, because strict
clients (LiteLLM and others) break on missing keys. `omit_defaults` is therefore never set.
"""

from __future__ import annotations

import enum

import msgspec


class BatchStatus(enum.StrEnum):
    """A batch's status, as OpenAI names it; the values are what the API sends and the database stores.

    validating ─▶ in_progress ─▶ finalizing ─▶ completed; failed (validation, or given up), expired (the window
    passed), cancelling ─▶ cancelled. docs/architecture.md draws the machine.
    """

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL_STATUSES: frozenset[BatchStatus] = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)
ACTIVE_STATUSES: frozenset[BatchStatus] = frozenset(BatchStatus) - TERMINAL_STATUSES

# The batch endpoints of OpenAI's spec (the SDK's `batch_create_params`). A batch is accepted for one when an upstream
# serves it (upstreams/catalog.py asks them); vLLM serves the first four.
SUPPORTED_ENDPOINTS: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
FILE_PURPOSES: tuple[str, ...] = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


class RequestCounts(msgspec.Struct):
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class Usage(msgspec.Struct):
    input_tokens: int = 0
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)
    total_tokens: int = 0

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.input_tokens_details.cached_tokens += other.input_tokens_details.cached_tokens
        self.output_tokens += other.output_tokens
        self.output_tokens_details.reasoning_tokens += other.output_tokens_details.reasoning_tokens
        self.total_tokens += other.total_tokens


class TokenUsage(msgspec.Struct):
    """One request's token counts, as the upstream reported them (chat names: prompt/completion). Kept with each result
    in the checkpoints, and added up into the batch's `Usage`."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0

    def as_usage(self) -> Usage:
        return Usage(
            input_tokens=self.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=self.cached_tokens),
            output_tokens=self.completion_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=self.reasoning_tokens),
            total_tokens=self.total_tokens,
        )


class BatchError(msgspec.Struct):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(msgspec.Struct):
    data: list[BatchError]
    object: str = "list"


class Batch(msgspec.Struct):
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    object: str = "batch"
    model: str | None = None
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = msgspec.field(default_factory=RequestCounts)
    usage: Usage | None = None
    metadata: dict[str, str] | None = None


class FileObject(msgspec.Struct):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: str = "file"
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileDeleted(msgspec.Struct):
    id: str
    object: str = "file"
    deleted: bool = True


class Upload(msgspec.Struct):
    id: str
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: str  # pending | completed | cancelled | expired
    object: str = "upload"
    file: FileObject | None = None


class UploadPart(msgspec.Struct):
    id: str
    created_at: int
    upload_id: str
    object: str = "upload.part"


class UploadCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/uploads, loosely typed like BatchCreate."""

    bytes: object = None
    filename: object = None
    mime_type: object = None
    purpose: object = None
    expires_after: object = None


class UploadComplete(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/uploads/{id}/complete."""

    part_ids: object = None
    md5: object = None


class ListPage(msgspec.Struct):
    data: list
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: str = "list"


class BatchCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/batches. Fields are loosely typed so that each error gets its own OpenAI message; a field
    not listed is refused as OpenAI does (400 `unknown_parameter`)."""

    input_file_id: object = None
    endpoint: object = None
    completion_window: object = None
    metadata: object = None
    output_expires_after: object = None


class ErrorBody(msgspec.Struct):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


# --- JSONL result lines ---------------------------------------------------------------------


class LineResponse(msgspec.Struct):
    status_code: int
    request_id: str
    body: msgspec.Raw  # the upstream's JSON, embedded as an object and never re-serialised


class LineError(msgspec.Struct):
    code: str
    message: str


class ResultLine(msgspec.Struct):
    """One line of an output or error file: `response` for an HTTP answer, `error` when there was none."""

    id: str
    custom_id: str
    response: LineResponse | None
    error: LineError | None


_result_encoder = msgspec.json.Encoder()


def encode_result_line(line: ResultLine) -> bytes:
    return _result_encoder.encode(line) + b"\n"
