-- SDK retries of POST /v1/batches fold into one batch atomically: one row per (tenant, request fingerprint) names the
-- batch that request created, and the primary key decides which of several concurrent retries creates it. Filled
-- from the newest batch of each fingerprint; the index that served the old lookup goes.
CREATE TABLE batch_folds (
    tenant TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, fingerprint)
);
INSERT INTO batch_folds (tenant, fingerprint, batch_id, created_at)
SELECT tenant, fingerprint, id, created_at FROM batches AS b
WHERE fingerprint IS NOT NULL
  AND seq = (SELECT MAX(seq) FROM batches WHERE tenant = b.tenant AND fingerprint = b.fingerprint);
DROP INDEX batches_fingerprint;

-- A deleted file that an unfinished batch reads as its input is hidden (deleted_at set) instead of deleted; gc deletes
-- its bytes and row once no unfinished batch reads it.
ALTER TABLE files ADD COLUMN deleted_at INTEGER;
CREATE INDEX files_hidden ON files (deleted_at) WHERE deleted_at IS NOT NULL;
CREATE INDEX batches_input_file ON batches (input_file_id);
