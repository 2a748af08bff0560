-- Teams and their members, inside one organization.

-- name: create :one
INSERT INTO teams (org_id, name, description)
VALUES (app.org_id(), :name, :description)
RETURNING org_id, id, name, description, created_at, updated_at;

-- name: get :one
SELECT org_id, id, name, description, created_at, updated_at
FROM teams WHERE org_id = app.org_id() AND id = :id;

-- name: list :many
-- Teams by name, keyset-paginated.
SELECT org_id, id, name, description, created_at, updated_at
FROM teams
WHERE org_id = app.org_id() AND (lower(name), id) > (lower(:after_name), :after_id)
ORDER BY lower(name), id
LIMIT :limit;

-- name: rename :one
UPDATE teams SET name = coalesce(:name, name), description = coalesce(:description, description)
WHERE org_id = app.org_id() AND id = :id
RETURNING org_id, id, name, description, created_at, updated_at;

-- name: delete :execrows
DELETE FROM teams WHERE org_id = app.org_id() AND id = :id;

-- name: add_member :one
INSERT INTO team_members (org_id, team_id, user_id, team_role)
VALUES (app.org_id(), :team_id, :user_id, :team_role)
ON CONFLICT (org_id, team_id, user_id) DO UPDATE SET team_role = EXCLUDED.team_role
RETURNING org_id, team_id, user_id, team_role, created_at;

-- name: remove_member :execrows
DELETE FROM team_members
WHERE org_id = app.org_id() AND team_id = :team_id AND user_id = :user_id;

-- name: members :many
SELECT org_id, team_id, user_id, team_role, created_at
FROM team_members
WHERE org_id = app.org_id() AND team_id = :team_id
ORDER BY created_at, user_id;

-- name: of_user :many
-- The teams a member belongs to.
SELECT t.org_id, t.id, t.name, t.description, t.created_at, t.updated_at
FROM team_members tm JOIN teams t ON t.org_id = tm.org_id AND t.id = tm.team_id
WHERE tm.org_id = app.org_id() AND tm.user_id = :user_id
ORDER BY lower(t.name), t.id;
