DROP TRIGGER instance_events_notify ON instance_events;
DROP FUNCTION notify_instance_events();
DROP INDEX instance_events_stream;
ALTER TABLE instance_events DROP COLUMN tx;
