-- The instance event stream reads events in (tx, id) order, and only those of
-- transactions older than the oldest one still running: an event whose transaction took
-- its id early and commits late can then never land behind one already delivered.
-- `tx` is the writing transaction's id (xid8, as a number).
ALTER TABLE instance_events
    ADD COLUMN tx BIGINT NOT NULL DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX instance_events_stream ON instance_events (tx, id);

-- Every process serving the stream wakes on this when events commit.
CREATE FUNCTION notify_instance_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('instance_events', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER instance_events_notify AFTER INSERT ON instance_events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_instance_events();
