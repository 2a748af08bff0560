-- Memberships: (organization, user, role). Admins manage them; owners manage owners.

-- name: add :one
INSERT INTO memberships (org_id, user_id, role, invited_by)
VALUES (app.org_id(), :user_id, :role, app.user_id())
RETURNING org_id, user_id, role, invited_by, created_at, updated_at;

-- name: get :one
SELECT org_id, user_id, role, invited_by, created_at, updated_at
FROM memberships
WHERE org_id = app.org_id() AND user_id = :user_id;

-- name: list :many
-- The organization's memberships, keyset-paginated by (created_at, user_id).
SELECT org_id, user_id, role, invited_by, created_at, updated_at
FROM memberships
WHERE org_id = app.org_id() AND (created_at, user_id) > (:after_created_at, :after_user_id)
ORDER BY created_at, user_id
LIMIT :limit;

-- name: for_user :many
-- The context user's memberships in every organization (to choose one).
SELECT org_id, user_id, role, invited_by, created_at, updated_at
FROM memberships
WHERE user_id = app.user_id()
ORDER BY created_at, org_id;

-- name: set_role :one
UPDATE memberships SET role = :role
WHERE org_id = app.org_id() AND user_id = :user_id
RETURNING org_id, user_id, role, invited_by, created_at, updated_at;

-- name: remove :execrows
DELETE FROM memberships WHERE org_id = app.org_id() AND user_id = :user_id;

-- name: copy_rows :copy
COPY memberships (org_id, user_id, role, created_at) FROM STDIN
