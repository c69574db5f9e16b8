-- The webhook outbox: a trigger writes one event when a batch reaches a terminal status, in the same transaction as
-- the status change, so no event is lost between the change and its delivery. `serve` delivers the events
-- (batch_gateway/webhooks_outbox.py). `due_at` (Unix seconds, fractional) is when a pending event may be claimed
-- next: a claim moves it forward by a lease, a failed attempt by the backoff.
CREATE TABLE webhook_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    batch_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    type TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at REAL NOT NULL,
    finished_at INTEGER,
    last_error TEXT
);
CREATE INDEX webhook_events_due ON webhook_events (due_at) WHERE state = 'pending';

-- created_at is when the batch reached the status (the transition sets <status>_at in the same UPDATE).
CREATE TRIGGER batches_webhook_event AFTER UPDATE OF status ON batches
WHEN NEW.status IN ('completed', 'failed', 'expired', 'cancelled') AND NEW.status IS NOT OLD.status
BEGIN
    INSERT INTO webhook_events (id, batch_id, tenant, type, created_at, due_at)
    VALUES (
        'evt_' || lower(hex(randomblob(16))),
        NEW.id,
        NEW.tenant,
        'batch.' || NEW.status,
        COALESCE(
            CASE NEW.status
                WHEN 'completed' THEN NEW.completed_at
                WHEN 'failed' THEN NEW.failed_at
                WHEN 'expired' THEN NEW.expired_at
                ELSE NEW.cancelled_at
            END,
            CAST(strftime('%s', 'now') AS INTEGER)
        ),
        0
    );
END;
