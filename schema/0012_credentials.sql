-- depends: 0006_permissions
-- Encrypted credentials, their access log, and the registry of encrypted columns.
--
-- app.encrypted_columns is the ONE list of every column that holds Keyring blobs (see
-- datalayer/security/keyring.py). Key rotation (datalayer/security/rotation.py) reads it and
-- nothing else: a migration that adds an encrypted column registers it here with one INSERT.
-- A row says how the blob's associated data is computed: org_column (the column bound as the
-- org, NULL when the blob was encrypted with org_id=None) and id_column (bound as the row id);
-- the table name and column name are bound as themselves. The primary key used to walk the
-- table in batches is (org_column, id_column), or id_column alone; both must be uuid columns
-- of a table in schema public. For example (webhooks, schema/0013_webhooks.sql):
--   INSERT INTO app.encrypted_columns (table_name, column_name, org_column, id_column)
--   VALUES ('webhooks', 'secret', 'org_id', 'id');
--
-- credentials: the secret payload (a JSON object, validated per type in Python) is one
-- Keyring blob in `secret`, bound to (org_id, 'credentials', id, 'secret'); everything else is
-- metadata, readable by anyone who may read credentials (app.role_allows(role,
-- 'credentials', 'read'): not viewers or guests). The registry queries never select
-- `secret` except credentials.decrypt, which writes a credential_access row in the same
-- statement, so a secret is never read without its record. Credentials are soft-deleted.
--
-- credential_access: append-only (INSERT and SELECT for the run-time role; a trigger refuses
-- UPDATE, and DELETE while the credential exists). Holds who, what, when; never the secret.

CREATE TABLE app.encrypted_columns (
  table_name   text NOT NULL,
  column_name  text NOT NULL,
  org_column   text,
  id_column    text NOT NULL,
  PRIMARY KEY (table_name, column_name),
  CONSTRAINT encrypted_columns_names CHECK (
    table_name ~ '^[a-z_][a-z0-9_]*$' AND column_name ~ '^[a-z_][a-z0-9_]*$'
    AND id_column ~ '^[a-z_][a-z0-9_]*$'
    AND (org_column IS NULL OR org_column ~ '^[a-z_][a-z0-9_]*$'))
);
COMMENT ON TABLE app.encrypted_columns IS
  'Every column holding Keyring blobs (public schema); read by key rotation';
REVOKE ALL ON app.encrypted_columns FROM PUBLIC;
GRANT SELECT ON app.encrypted_columns TO datalayer_maint;

INSERT INTO app.encrypted_columns (table_name, column_name, org_column, id_column) VALUES
  ('users', 'totp_secret', NULL, 'id'),
  ('credentials', 'secret', 'org_id', 'id');

-- The key id of a Keyring blob (version byte, kid length byte, kid): for SQL-side checks.
CREATE FUNCTION app.keyring_kid(p_blob bytea) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT SET search_path = pg_catalog, pg_temp
AS $$
  SELECT CASE WHEN length(p_blob) >= 2 AND get_byte(p_blob, 0) = 1
              THEN convert_from(substring(p_blob FROM 3 FOR get_byte(p_blob, 1)), 'SQL_ASCII')
         END
$$;
REVOKE ALL ON FUNCTION app.keyring_kid(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.keyring_kid(bytea) TO datalayer_app, datalayer_maint;

CREATE TABLE credentials (
  org_id             uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id                 uuid NOT NULL,
  name               text NOT NULL
                     CONSTRAINT credentials_name_length CHECK (length(name) BETWEEN 1 AND 200),
  type               text NOT NULL CONSTRAINT credentials_type_known
                     CHECK (type IN ('api_key', 'oauth2', 'basic', 'database', 'ssh_key', 'custom')),
  secret             bytea NOT NULL CONSTRAINT credentials_secret_blob
                     CHECK (length(secret) >= 31 AND get_byte(secret, 0) = 1),
  metadata           jsonb NOT NULL DEFAULT '{}' CONSTRAINT credentials_metadata_object
                     CHECK (jsonb_typeof(metadata) = 'object'),
  expires_at         timestamptz,
  is_valid           boolean NOT NULL DEFAULT true,
  last_validated_at  timestamptz,
  last_used_at       timestamptz,
  created_by         uuid,
  created_at         timestamptz NOT NULL DEFAULT now(),
  updated_at         timestamptz NOT NULL DEFAULT now(),
  deleted_at         timestamptz,
  PRIMARY KEY (org_id, id)
);
CREATE UNIQUE INDEX credentials_name_key ON credentials (org_id, lower(name))
  WHERE deleted_at IS NULL;
CREATE INDEX credentials_expiry_idx ON credentials (expires_at)
  WHERE is_valid AND deleted_at IS NULL AND expires_at IS NOT NULL;

-- updated_at follows what people change; key rotation rewrites only `secret`, so a change
-- of nothing but the secret's key leaves it alone (a re-encrypted value is the same value).
CREATE FUNCTION app.credentials_touch() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF (NEW.name, NEW.type, NEW.metadata, NEW.expires_at, NEW.is_valid, NEW.deleted_at)
       IS DISTINCT FROM (OLD.name, OLD.type, OLD.metadata, OLD.expires_at, OLD.is_valid,
                         OLD.deleted_at)
     OR (NEW.secret IS DISTINCT FROM OLD.secret
         AND current_user <> 'datalayer_maint') THEN
    NEW.updated_at := now();
  END IF;
  RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION app.credentials_touch() FROM PUBLIC;
CREATE TRIGGER credentials_touch BEFORE UPDATE ON credentials
  FOR EACH ROW EXECUTE FUNCTION app.credentials_touch();

ALTER TABLE credentials ENABLE ROW LEVEL SECURITY;
ALTER TABLE credentials FORCE ROW LEVEL SECURITY;
CREATE POLICY credentials_select ON credentials FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND app.role_allows((SELECT app.role()), 'credentials', 'read'));
CREATE POLICY credentials_insert ON credentials FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
              AND app.role_allows((SELECT app.role()), 'credentials', 'create'));
CREATE POLICY credentials_update ON credentials FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
         AND app.role_allows((SELECT app.role()), 'credentials', 'update'))
  WITH CHECK (org_id = (SELECT app.org_id()));
GRANT SELECT,
      INSERT (org_id, id, name, type, secret, metadata, expires_at, created_by),
      UPDATE (name, secret, metadata, expires_at, is_valid, last_validated_at, last_used_at,
              deleted_at)
  ON credentials TO datalayer_app;

CREATE TABLE credential_access (
  org_id         uuid NOT NULL,
  id             uuid NOT NULL DEFAULT gen_random_uuid(),
  credential_id  uuid NOT NULL,
  actor_id       uuid,
  action         text NOT NULL CONSTRAINT credential_access_action_known
                 CHECK (action IN ('decrypt')),
  at             timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, credential_id) REFERENCES credentials (org_id, id) ON DELETE CASCADE
);
CREATE INDEX credential_access_credential_idx ON credential_access (org_id, credential_id, at DESC);

CREATE FUNCTION app.credential_access_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF TG_OP = 'UPDATE' THEN
    RAISE EXCEPTION 'credential access records are append-only'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF EXISTS (SELECT 1 FROM credentials c WHERE c.org_id = OLD.org_id AND c.id = OLD.credential_id) THEN
    RAISE EXCEPTION 'credential access records are deleted only with their credential'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN OLD;
END $$;
REVOKE ALL ON FUNCTION app.credential_access_guard() FROM PUBLIC;
CREATE TRIGGER credential_access_guard BEFORE UPDATE OR DELETE ON credential_access
  FOR EACH ROW EXECUTE FUNCTION app.credential_access_guard();

ALTER TABLE credential_access ENABLE ROW LEVEL SECURITY;
ALTER TABLE credential_access FORCE ROW LEVEL SECURITY;
CREATE POLICY credential_access_select ON credential_access FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND app.role_allows((SELECT app.role()), 'audit', 'read'));
CREATE POLICY credential_access_insert ON credential_access FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
              AND actor_id IS NOT DISTINCT FROM (SELECT app.user_id())
              AND app.role_allows((SELECT app.role()), 'credentials', 'read'));
GRANT SELECT, INSERT (org_id, credential_id, actor_id, action) ON credential_access
  TO datalayer_app;
