-- The Uploads API: a file sent in parts. An upload is `pending` while parts arrive, `completing` while one complete
-- request assembles its file, then `completed` (file_id names the File, written in the same transaction), `cancelled`
-- or `expired` (gc, an hour after creation). A part's bytes are an object (object_key) written before its row; gc
-- deletes the parts of every upload that is no longer pending or completing. (0005 is reserved by another branch.)
CREATE TABLE uploads (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    mime_type TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    file_expires_after INTEGER,
    file_id TEXT
);
CREATE INDEX uploads_open ON uploads (expires_at) WHERE status IN ('pending', 'completing');

CREATE TABLE upload_parts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    upload_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    object_key TEXT NOT NULL
);
CREATE INDEX upload_parts_upload ON upload_parts (upload_id);
