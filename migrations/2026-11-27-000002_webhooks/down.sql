DROP TRIGGER instance_events_outbox ON instance_events;
DROP FUNCTION enqueue_webhook_deliveries();
DROP TABLE webhook_deliveries;
DROP TABLE webhooks;
