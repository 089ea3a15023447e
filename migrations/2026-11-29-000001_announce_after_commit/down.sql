CREATE FUNCTION notify_instance_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('instance_events', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER instance_events_notify AFTER INSERT ON instance_events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_instance_events();
