-- Indexes for the real queries, and the runner lease (only one runner may work on a batch).
CREATE INDEX files_tenant_seq ON files (tenant, seq);
CREATE INDEX files_expires_at ON files (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX batches_tenant_seq ON batches (tenant, seq);
CREATE INDEX batches_status_expires ON batches (status, expires_at);
CREATE INDEX batches_fingerprint ON batches (tenant, fingerprint, created_at);
CREATE UNIQUE INDEX batches_idempotency ON batches (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
ALTER TABLE batches ADD COLUMN runner_owner text;
ALTER TABLE batches ADD COLUMN lease_until bigint;
