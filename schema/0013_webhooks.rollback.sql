DELETE FROM app.encrypted_columns WHERE table_name = 'webhooks' AND column_name = 'secret';
DROP TABLE webhook_events;
DROP TABLE webhook_counters;
DROP TABLE webhooks;
DROP FUNCTION app.webhook_route(bytea);
