-- Encrypted credentials. Only `decrypt` selects the secret, and it records the access in the
-- same statement. The other queries return metadata only.

-- name: create :one
INSERT INTO credentials (org_id, id, name, type, secret, metadata, expires_at, created_by)
VALUES (app.org_id(), :id, :name, :type, :secret, :metadata, :expires_at, app.user_id())
RETURNING org_id, id, name, type, metadata, expires_at, is_valid, last_validated_at,
          last_used_at, created_by, created_at, updated_at;

-- name: get :one
SELECT org_id, id, name, type, metadata, expires_at, is_valid, last_validated_at,
       last_used_at, created_by, created_at, updated_at
FROM credentials
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL;

-- name: list :many
-- Live credentials by name (case-insensitive), optionally of one type, keyset-paginated.
SELECT org_id, id, name, type, metadata, expires_at, is_valid, last_validated_at,
       last_used_at, created_by, created_at, updated_at
FROM credentials
WHERE org_id = app.org_id() AND deleted_at IS NULL
  AND (:type::text IS NULL OR type = :type::text)
  AND (lower(name), id) > (lower(:after_name), :after_id)
ORDER BY lower(name), id
LIMIT :limit;

-- name: update :one
-- Name, metadata, expiry, and (a new secret of the same type) the secret. A new secret makes
-- the credential valid again until it is validated.
UPDATE credentials SET
  name = coalesce(:name, name),
  metadata = coalesce(:metadata, metadata),
  expires_at = CASE WHEN :clear_expiry::boolean THEN NULL
                    ELSE coalesce(:expires_at, expires_at) END,
  secret = coalesce(:secret, secret),
  is_valid = CASE WHEN :secret::bytea IS NULL THEN is_valid ELSE true END,
  last_validated_at = CASE WHEN :secret::bytea IS NULL THEN last_validated_at END
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL
  AND (:secret::bytea IS NULL OR type = :type)
RETURNING org_id, id, name, type, metadata, expires_at, is_valid, last_validated_at,
          last_used_at, created_by, created_at, updated_at;

-- name: mark_validated :one
-- The outcome of checking the credential against its service.
UPDATE credentials SET is_valid = :valid, last_validated_at = now()
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL
RETURNING org_id, id, name, type, metadata, expires_at, is_valid, last_validated_at,
          last_used_at, created_by, created_at, updated_at;

-- name: delete :execrows
-- Soft delete; the name becomes free again.
UPDATE credentials SET deleted_at = now()
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL;

-- name: decrypt :one
-- The secret blob of a live credential, with an access record written by the same statement
-- (and last_used_at, written at most once a minute). No row: not found, not readable, or the
-- context may not write the record.
WITH c AS (
  SELECT org_id, id, type, secret, expires_at, is_valid
  FROM credentials
  WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL
), logged AS (
  INSERT INTO credential_access (org_id, credential_id, actor_id, action)
  SELECT org_id, id, app.user_id(), 'decrypt' FROM c
), used AS (
  UPDATE credentials u SET last_used_at = now()
  FROM c
  WHERE u.org_id = c.org_id AND u.id = c.id
    AND (u.last_used_at IS NULL OR u.last_used_at < now() - interval '1 minute')
)
SELECT org_id, id, type, secret, expires_at, is_valid FROM c;

-- name: access_log :many
-- Who decrypted a credential, newest first.
SELECT org_id, id, credential_id, actor_id, action, at
FROM credential_access
WHERE org_id = app.org_id() AND credential_id = :credential_id
ORDER BY at DESC, id DESC
LIMIT :limit;

-- name: deactivate_expired :execrows
-- Maintenance (dl.system(): every organization; a tenant session: its own): mark expired
-- live credentials invalid.
UPDATE credentials SET is_valid = false
WHERE expires_at <= now() AND is_valid AND deleted_at IS NULL;
