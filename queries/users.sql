-- Users: global accounts. A context sees its own row and the members of its organization.
-- Secret columns are not selectable by the run-time role (see schema/0004_identity.sql).

-- name: create :one
-- Register the context's user (the context carries the new id).
INSERT INTO users (id, email, display_name, first_name, last_name, preferences,
                   subscription_tier, password_hash)
VALUES (app.user_id(), :email, :display_name, :first_name, :last_name, :preferences,
        :subscription_tier, :password_hash)
RETURNING id, email, display_name, first_name, last_name, preferences, subscription_tier,
          status, email_verified_at, failed_logins, locked_until, last_login_at,
          totp_enabled_at, created_at, updated_at, deleted_at;

-- name: get :one
SELECT id, email, display_name, first_name, last_name, preferences, subscription_tier,
       status, email_verified_at, failed_logins, locked_until, last_login_at,
       totp_enabled_at, created_at, updated_at, deleted_at
FROM users
WHERE id = :id AND deleted_at IS NULL;

-- name: get_by_email :one
-- One live user by email, case-insensitive (an index scan of users_email_live_key; the
-- comparison is on email_normalized so that it stays an index qual under RLS).
SELECT id, email, display_name, first_name, last_name, preferences, subscription_tier,
       status, email_verified_at, failed_logins, locked_until, last_login_at,
       totp_enabled_at, created_at, updated_at, deleted_at
FROM users
WHERE email_normalized = lower(:email) AND deleted_at IS NULL;

-- name: list_members :many
-- Live users of the context's organization, keyset-paginated by (created_at, id).
SELECT u.id, u.email, u.display_name, u.first_name, u.last_name, u.preferences,
       u.subscription_tier, u.status, u.email_verified_at, u.failed_logins, u.locked_until,
       u.last_login_at, u.totp_enabled_at, u.created_at, u.updated_at, u.deleted_at
FROM memberships m
JOIN users u ON u.id = m.user_id
WHERE m.org_id = app.org_id() AND u.deleted_at IS NULL
  AND (u.created_at, u.id) > (:after_created_at, :after_id)
ORDER BY u.created_at, u.id
LIMIT :limit;

-- name: update_profile :one
-- Change the context user's profile; NULL keeps a value.
UPDATE users
SET display_name = coalesce(:display_name, display_name),
    first_name = coalesce(:first_name, first_name),
    last_name = coalesce(:last_name, last_name),
    preferences = coalesce(:preferences, preferences),
    subscription_tier = coalesce(:subscription_tier, subscription_tier)
WHERE id = :id AND deleted_at IS NULL
RETURNING id, email, display_name, first_name, last_name, preferences, subscription_tier,
          status, email_verified_at, failed_logins, locked_until, last_login_at,
          totp_enabled_at, created_at, updated_at, deleted_at;

-- name: soft_delete :execrows
UPDATE users SET deleted_at = now() WHERE id = :id AND deleted_at IS NULL;

-- name: restore :execrows
-- Fails with a Conflict when the address was taken by a new account meanwhile.
UPDATE users SET deleted_at = NULL WHERE id = :id AND deleted_at IS NOT NULL;

-- name: hard_delete :execrows
DELETE FROM users WHERE id = :id;

-- name: copy_rows :copy
COPY users (id, email, display_name, subscription_tier, created_at) FROM STDIN
