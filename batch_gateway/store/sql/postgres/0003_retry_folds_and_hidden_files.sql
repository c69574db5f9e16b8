-- SDK retries of POST /v1/batches fold into one batch atomically: one row per (tenant, request fingerprint) names the
-- batch that request created, and the primary key decides which of several concurrent retries creates it. Filled
-- from the newest batch of each fingerprint; the index that served the old lookup goes.
CREATE TABLE batch_folds (
    tenant text NOT NULL,
    fingerprint text NOT NULL,
    batch_id text NOT NULL,
    created_at bigint NOT NULL,
    PRIMARY KEY (tenant, fingerprint)
);
INSERT INTO batch_folds (tenant, fingerprint, batch_id, created_at)
SELECT DISTINCT ON (tenant, fingerprint) tenant, fingerprint, id, created_at FROM batches
WHERE fingerprint IS NOT NULL
ORDER BY tenant, fingerprint, seq DESC;
DROP INDEX batches_fingerprint;

-- A deleted file that an unfinished batch reads as its input is hidden (deleted_at set) instead of deleted; gc deletes
-- its bytes and row once no unfinished batch reads it.
ALTER TABLE files ADD COLUMN deleted_at bigint;
CREATE INDEX files_hidden ON files (deleted_at) WHERE deleted_at IS NOT NULL;
CREATE INDEX batches_input_file ON batches (input_file_id);
