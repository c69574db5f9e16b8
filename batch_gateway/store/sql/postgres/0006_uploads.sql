-- The Uploads API: a file sent in parts. An upload is `pending` while parts arrive, `completing` while one complete
-- request assembles its file, then `completed` (file_id names the File, written in the same transaction), `cancelled`
-- or `expired` (gc, an hour after creation). A part's bytes are an object (object_key) written before its row; gc
-- deletes the parts of every upload that is no longer pending or completing. (0005 is reserved by another branch.)
CREATE TABLE uploads (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    tenant text NOT NULL,
    filename text NOT NULL,
    purpose text NOT NULL,
    bytes bigint NOT NULL,
    mime_type text NOT NULL,
    status text NOT NULL,
    created_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    file_expires_after bigint,
    file_id text
);
CREATE INDEX uploads_open ON uploads (expires_at) WHERE status IN ('pending', 'completing');

CREATE TABLE upload_parts (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    upload_id text NOT NULL,
    tenant text NOT NULL,
    bytes bigint NOT NULL,
    created_at bigint NOT NULL,
    object_key text NOT NULL
);
CREATE INDEX upload_parts_upload ON upload_parts (upload_id);
