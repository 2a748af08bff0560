-- Queries only the tests load (DataLayer(extra_queries=[tests/queries])).

-- name: whoami :one
-- The connection's effective role, context settings and transaction state.
SELECT current_user AS role,
       coalesce(current_setting('app.org_id', true), '') AS org_id,
       coalesce(current_setting('app.user_id', true), '') AS user_id,
       coalesce(current_setting('app.role', true), '') AS app_role,
       coalesce(current_setting('app.request_id', true), '') AS request_id,
       now() <> statement_timestamp() AS in_transaction,
       pg_backend_pid() AS pid;

-- name: sleep :scalar
SELECT pg_sleep(:seconds)::text;

-- name: insert_org_raw :exec
-- Insert an organization with an explicit id (to prove RLS refuses foreign ids).
INSERT INTO organizations (id, slug, name) VALUES (:id, :slug, 'raw');

-- name: rename_all :execrows
UPDATE organizations SET name = :name;

-- name: delete_all :execrows
DELETE FROM organizations;

-- name: settings_of :scalar
SELECT settings FROM organizations WHERE id = :id;

-- name: set_settings :execrows
UPDATE organizations SET settings = :settings WHERE id = :id;
