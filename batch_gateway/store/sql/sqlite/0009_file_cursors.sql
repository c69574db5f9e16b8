-- A deleted file's place in its tenant's list, kept a while after its row goes: a client that deletes the files of
-- one page and then asks for the next (`after` = the last of them) finds the page that follows, not an empty one.
-- gc drops places older than a day.
CREATE TABLE file_cursors (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    seq INTEGER NOT NULL,
    deleted_at INTEGER NOT NULL
);
CREATE INDEX file_cursors_deleted_at ON file_cursors (deleted_at);
