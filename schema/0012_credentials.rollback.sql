DROP TABLE credential_access;
DROP FUNCTION app.credential_access_guard();
DROP TABLE credentials;
DROP FUNCTION app.credentials_touch();
DROP FUNCTION app.keyring_kid(bytea);
DROP TABLE app.encrypted_columns;
