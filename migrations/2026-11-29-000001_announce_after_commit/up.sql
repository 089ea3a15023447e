-- Events no longer send NOTIFY from inside the transaction that writes them: a notifying
-- transaction holds a database-wide lock from its commit until the commit is on disk, so
-- every writer of events committed one at a time. The broker announces events (and jobs)
-- after commit instead, coalesced per process (src/db/announce.rs).
DROP TRIGGER instance_events_notify ON instance_events;
DROP FUNCTION notify_instance_events();
