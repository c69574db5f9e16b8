-- Files, batches and API keys. `seq` orders objects by creation for cursor pagination (ids are random).
-- Times are Unix seconds, as on the wire.
CREATE TABLE files (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    tenant text NOT NULL,
    bytes bigint NOT NULL,
    created_at bigint NOT NULL,
    filename text NOT NULL,
    purpose text NOT NULL,
    object_key text NOT NULL,
    expires_at bigint,
    status text NOT NULL DEFAULT 'processed'
);

CREATE TABLE batches (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    tenant text NOT NULL,
    endpoint text NOT NULL,
    input_file_id text NOT NULL,
    completion_window text NOT NULL,
    status text NOT NULL,
    created_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    metadata jsonb,
    output_expires_after bigint,
    model text,
    errors jsonb,
    output_file_id text,
    error_file_id text,
    in_progress_at bigint,
    finalizing_at bigint,
    completed_at bigint,
    failed_at bigint,
    expired_at bigint,
    cancelling_at bigint,
    cancelled_at bigint,
    request_counts jsonb NOT NULL,
    usage jsonb,
    fingerprint text,
    idempotency_key text
);

CREATE TABLE api_keys (
    id text PRIMARY KEY,
    tenant text NOT NULL,
    key_hash text NOT NULL UNIQUE,
    prefix text NOT NULL,
    created_at bigint NOT NULL,
    revoked_at bigint
);
