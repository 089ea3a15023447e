-- Subscriptions to instance events: signed webhooks and Slack incoming webhooks.
CREATE TABLE webhooks (
    id BIGSERIAL PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('webhook', 'slack')),
    url TEXT NOT NULL,
    -- The signing secret, sealed with the broker's key (none for Slack).
    secret BYTEA,
    -- The states whose events it wants; empty: every event.
    events TEXT[] NOT NULL DEFAULT '{}',
    provider TEXT,
    pool TEXT,
    instance_id UUID,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at TIMESTAMPTZ
);

-- The outbox: one row per event and subscription, written in the event's transaction.
CREATE TABLE webhook_deliveries (
    id BIGSERIAL PRIMARY KEY,
    webhook_id BIGINT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id BIGINT NOT NULL REFERENCES instance_events (id) ON DELETE CASCADE,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts INT NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- While a worker is sending it.
    locked_until TIMESTAMPTZ,
    last_status INT,
    last_error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at TIMESTAMPTZ
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_of ON webhook_deliveries (webhook_id, id DESC);

CREATE FUNCTION enqueue_webhook_deliveries() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Most brokers have no subscription most of the time: a look, not an insert.
    IF NOT EXISTS (SELECT 1 FROM webhooks WHERE deleted_at IS NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_deliveries (webhook_id, event_id)
    SELECT w.id, NEW.id
    FROM webhooks w JOIN instances i ON i.id = NEW.instance_id
    WHERE w.deleted_at IS NULL
      AND (cardinality(w.events) = 0 OR NEW.to_state = ANY (w.events))
      AND (w.provider IS NULL OR w.provider = i.provider_name)
      AND (w.pool IS NULL OR w.pool = i.pool_name)
      AND (w.instance_id IS NULL OR w.instance_id = i.id);
    IF FOUND THEN
        PERFORM pg_notify('webhook_deliveries', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER instance_events_outbox AFTER INSERT ON instance_events
    FOR EACH ROW EXECUTE FUNCTION enqueue_webhook_deliveries();
