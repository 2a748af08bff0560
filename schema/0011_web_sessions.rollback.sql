DROP FUNCTION app.web_session_revoke_user(uuid);
DROP FUNCTION app.web_session_revoke(bytea);
DROP FUNCTION app.web_session_get(bytea, boolean);
DROP FUNCTION app.web_session_create(bytea, uuid, jsonb, interval, interval);
DROP TABLE web_sessions;
