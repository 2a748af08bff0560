-- API keys: only the sha256 of a key is stored, with its prefix and last 4 characters.

-- name: create :one
-- A key for the context user in the context organization.
INSERT INTO api_keys (org_id, id, user_id, name, prefix, key_hash, last4, scopes, expires_at)
VALUES (app.org_id(), :id, app.user_id(), :name, :prefix, :key_hash, :last4, :scopes,
        :expires_at)
RETURNING org_id, id, user_id, name, prefix, last4, scopes, expires_at, last_used_at,
          revoked_at, created_at;

-- name: verify :one
-- The live key with this hash, in any organization; records last use (see app.verify_api_key).
SELECT org_id, key_id, user_id, role, scopes FROM app.verify_api_key(:key_hash);

-- name: verify_until :one
-- verify, plus the key's expiry: what read-through caching needs to never outlive the key.
SELECT org_id, key_id, user_id, role, scopes, valid_until
FROM app.verify_api_key_until(:key_hash);

-- name: list :many
-- Keys the context may see (its own; all for admins), newest first, keyset-paginated.
SELECT org_id, id, user_id, name, prefix, last4, scopes, expires_at, last_used_at,
       revoked_at, created_at
FROM api_keys
WHERE org_id = app.org_id() AND (created_at, id) < (:before_created_at, :before_id)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: revoke :execrows
UPDATE api_keys SET revoked_at = now()
WHERE org_id = app.org_id() AND id = :id AND revoked_at IS NULL;
