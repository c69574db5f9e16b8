-- The webhook outbox: a trigger writes one event when a batch reaches a terminal status, in the same transaction as
-- the status change, so no event is lost between the change and its delivery. `serve` delivers the events
-- (batch_gateway/webhooks_outbox.py). `due_at` (Unix seconds, fractional) is when a pending event may be claimed
-- next: a claim moves it forward by a lease, a failed attempt by the backoff.
CREATE TABLE webhook_events (
    seq bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    batch_id text NOT NULL,
    tenant text NOT NULL,
    type text NOT NULL,
    created_at bigint NOT NULL,
    state text NOT NULL DEFAULT 'pending',
    attempts integer NOT NULL DEFAULT 0,
    due_at double precision NOT NULL,
    finished_at bigint,
    last_error text
);
CREATE INDEX webhook_events_due ON webhook_events (due_at) WHERE state = 'pending';

-- created_at is when the batch reached the status (the transition sets <status>_at in the same UPDATE).
CREATE FUNCTION batches_webhook_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_events (id, batch_id, tenant, type, created_at, due_at)
    VALUES (
        'evt_' || replace(gen_random_uuid()::text, '-', ''),
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
            extract(epoch FROM now())::bigint
        ),
        0
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER batches_webhook_event AFTER UPDATE OF status ON batches FOR EACH ROW
    WHEN (NEW.status IN ('completed', 'failed', 'expired', 'cancelled') AND NEW.status IS DISTINCT FROM OLD.status)
    EXECUTE FUNCTION batches_webhook_event();
