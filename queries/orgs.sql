-- Organizations: the tenant root. Every query runs under RLS, so a session only ever
-- reaches its own organization; `id` comes from the context (app.org_id()).

-- name: create :one
-- Create the organization of the current context (role owner); its id is the context's org_id.
INSERT INTO organizations (id, slug, name, plan, settings)
VALUES (app.org_id(), :slug, :name, :plan, :settings)
RETURNING id, slug, name, plan, settings, created_at, updated_at, deleted_at;

-- name: get :one
-- The current context's organization, live or deleted (None outside it).
SELECT id, slug, name, plan, settings, created_at, updated_at, deleted_at
FROM organizations
WHERE id = :id;

-- name: get_by_slug :one
-- A live organization by slug, only if it is the current context's.
SELECT id, slug, name, plan, settings, created_at, updated_at, deleted_at
FROM organizations
WHERE slug = :slug AND deleted_at IS NULL;

-- name: list_visible :many
-- Every organization the context can see (its own, at most one), newest first.
SELECT id, slug, name, plan, settings, created_at, updated_at, deleted_at
FROM organizations
WHERE deleted_at IS NULL
ORDER BY created_at DESC, id DESC;

-- name: update :one
-- Rename, change plan or replace settings; NULL keeps the current value. Owner/admin only.
UPDATE organizations
SET name = coalesce(:name, name),
    plan = coalesce(:plan, plan),
    settings = coalesce(:settings, settings)
WHERE id = :id AND deleted_at IS NULL
RETURNING id, slug, name, plan, settings, created_at, updated_at, deleted_at;

-- name: soft_delete :execrows
-- Mark the organization deleted (owner only); its data stays until retention removes it.
UPDATE organizations SET deleted_at = now()
WHERE id = :id AND deleted_at IS NULL;

-- name: restore :execrows
-- Undo a soft delete.
UPDATE organizations SET deleted_at = NULL
WHERE id = :id AND deleted_at IS NOT NULL;

-- name: count_all :scalar
-- Organizations the context can see (for health and the demo).
SELECT count(*) FROM organizations;

-- name: copy_rows :copy
-- Bulk load for seeding (runs under dl.system()).
COPY organizations (id, slug, name, plan, settings, created_at) FROM STDIN
