-- Workflows, their versions, shares and statistics (schema/0007_workflows.sql).
--
-- Who sees and changes what is decided by the policies; these queries still filter by
-- `org_id = app.org_id()` themselves: under RLS only leakproof quals can drive an index
-- scan, and that one is (the visibility rules of the policy are not). Lists are keyset-
-- paginated newest first by (updated_at, id) on workflows_list_idx.

-- name: create :one
-- A new workflow of the context organization (version `current_version` is recorded by
-- the trigger; 1 unless an import carries its history's numbering).
INSERT INTO workflows (org_id, name, description, nodes, edges, settings, status, owner_id,
                       team_id, tags, is_template, visibility, current_version)
VALUES (app.org_id(), :name, :description, :nodes, :edges, :settings, :status,
        coalesce(:owner_id, app.user_id()), :team_id, :tags, :is_template, :visibility,
        :current_version)
RETURNING org_id, id, name, description, nodes, edges, settings, status, owner_id, team_id,
          tags, is_template, visibility, current_version, content_hash, created_at,
          updated_at, deleted_at;

-- name: get :one
-- A live workflow of the context organization, if the context may see it.
SELECT org_id, id, name, description, nodes, edges, settings, status, owner_id, team_id,
       tags, is_template, visibility, current_version, content_hash, created_at, updated_at,
       deleted_at
FROM workflows
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL;

-- name: get_template :one
-- A template with its content: one of the context organization's, or one of another
-- organization's public template catalog.
SELECT org_id, id, name, description, nodes, edges, settings, tags, current_version,
       updated_at
FROM workflows
WHERE org_id = app.org_id() AND id = :id AND is_template AND deleted_at IS NULL
UNION ALL
SELECT org_id, workflow_id, name, description, nodes, edges, settings, tags, current_version,
       updated_at
FROM workflow_public_templates
WHERE workflow_id = :id AND org_id <> app.org_id()
LIMIT 1;

-- name: list :many
-- Live workflows newest first, keyset-paginated by (updated_at, id); every filter is
-- optional (NULL: any). tags_any: at least one of them; tags_all: every one of them.
SELECT org_id, id, name, description, status, owner_id, team_id, tags, is_template,
       visibility, current_version, created_at, updated_at
FROM workflows
WHERE org_id = app.org_id() AND deleted_at IS NULL
  AND (updated_at, id) < (:before_updated_at, :before_id)
  AND (:status::text IS NULL OR status = :status)
  AND (:owner_id::uuid IS NULL OR owner_id = :owner_id)
  AND (:team_id::uuid IS NULL OR team_id = :team_id)
  AND (:is_template::boolean IS NULL OR is_template = :is_template)
  AND (:tags_any::text[] IS NULL OR tags && :tags_any)
  AND (:tags_all::text[] IS NULL OR tags @> :tags_all)
ORDER BY updated_at DESC, id DESC
LIMIT :limit;

-- name: search :many
-- Full-text search of name (weight A), description (B) and tags (C), best first
-- (ts_rank), keyset-paginated by (rank, id). The query is websearch syntax ("quoted
-- phrase", -not, or), never a syntax error.
SELECT org_id, id, name, description, status, owner_id, team_id, tags, is_template,
       visibility, current_version, created_at, updated_at, rank
FROM (
  SELECT w.org_id, w.id, w.name, w.description, w.status, w.owner_id, w.team_id, w.tags,
         w.is_template, w.visibility, w.current_version, w.created_at, w.updated_at,
         ts_rank(w.search, q.query) AS rank
  FROM workflows w
  CROSS JOIN websearch_to_tsquery('simple'::regconfig, :query) AS q (query)
  WHERE w.org_id = app.org_id() AND w.deleted_at IS NULL AND w.search @@ q.query
    AND (:status::text IS NULL OR w.status = :status)
) hit
WHERE rank < :after_rank OR (rank = :after_rank AND id > :after_id)
ORDER BY rank DESC, id
LIMIT :limit;

-- name: public_templates :many
-- The public template catalog of all organizations, most recently updated first.
SELECT org_id, workflow_id AS id, name, description, tags, current_version, updated_at
FROM workflow_public_templates
WHERE (updated_at, workflow_id) < (:before_updated_at, :before_id)
ORDER BY updated_at DESC, workflow_id DESC
LIMIT :limit;

-- name: update :one
-- Change a live workflow; NULL keeps a value. A change of nodes, edges or settings makes
-- a new version (same transaction, trigger). With expected_version, only if the workflow
-- is still at that version (optimistic concurrency); no row otherwise.
UPDATE workflows
SET name = coalesce(:name, name),
    description = coalesce(:description, description),
    nodes = coalesce(:nodes, nodes),
    edges = coalesce(:edges, edges),
    settings = coalesce(:settings, settings),
    status = coalesce(:status, status),
    tags = coalesce(:tags, tags),
    is_template = coalesce(:is_template, is_template),
    visibility = coalesce(:visibility, visibility)
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL
  AND (:expected_version::integer IS NULL OR current_version = :expected_version)
RETURNING org_id, id, name, description, nodes, edges, settings, status, owner_id, team_id,
          tags, is_template, visibility, current_version, content_hash, created_at,
          updated_at, deleted_at;

-- name: set_team :one
-- Give a live workflow to a team, or to none (NULL).
UPDATE workflows SET team_id = :team_id
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL
RETURNING org_id, id, name, description, nodes, edges, settings, status, owner_id, team_id,
          tags, is_template, visibility, current_version, content_hash, created_at,
          updated_at, deleted_at;

-- name: transfer :execrows
-- Make another member the owner of a live workflow. No RETURNING: the previous owner may
-- not see a private workflow once it is someone else's.
UPDATE workflows SET owner_id = :owner_id
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL;

-- name: soft_delete :execrows
UPDATE workflows SET deleted_at = now()
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL;

-- name: undelete :execrows
UPDATE workflows SET deleted_at = NULL
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NOT NULL;

-- name: hard_delete :execrows
-- Delete a workflow with its versions, shares and statistics.
DELETE FROM workflows WHERE org_id = app.org_id() AND id = :id;

-- name: versions :many
-- A workflow's versions, newest first, keyset-paginated by version (content left out).
SELECT org_id, workflow_id, version, content_hash, created_by, created_at
FROM workflow_versions
WHERE org_id = app.org_id() AND workflow_id = :workflow_id AND version < :before_version
ORDER BY version DESC
LIMIT :limit;

-- name: get_version :one
SELECT org_id, workflow_id, version, nodes, edges, settings, content_hash, created_by,
       created_at
FROM workflow_versions
WHERE org_id = app.org_id() AND workflow_id = :workflow_id AND version = :version;

-- name: history :many
-- Every version with its content, oldest first (for export).
SELECT org_id, workflow_id, version, nodes, edges, settings, content_hash, created_by,
       created_at
FROM workflow_versions
WHERE org_id = app.org_id() AND workflow_id = :workflow_id
ORDER BY version;

-- name: restore :one
-- Save an old version's content as the workflow's content: a new version equal to the old
-- one (none when it equals the current content). History is never rewritten.
UPDATE workflows w
SET nodes = v.nodes, edges = v.edges, settings = v.settings
FROM workflow_versions v
WHERE w.org_id = app.org_id() AND w.id = :id AND w.deleted_at IS NULL
  AND v.org_id = w.org_id AND v.workflow_id = w.id AND v.version = :version
RETURNING w.org_id, w.id, w.name, w.description, w.nodes, w.edges, w.settings, w.status,
          w.owner_id, w.team_id, w.tags, w.is_template, w.visibility, w.current_version,
          w.content_hash, w.created_at, w.updated_at, w.deleted_at;

-- name: instantiate :one
-- A new workflow (a draft, not a template) of the context organization with the content
-- of a template: the organization's own or one from the public catalog.
INSERT INTO workflows (org_id, name, description, nodes, edges, settings, owner_id, team_id,
                       tags)
SELECT app.org_id(), coalesce(:name, t.name), t.description, t.nodes, t.edges, t.settings,
       app.user_id(), :team_id, t.tags
FROM (SELECT name, description, nodes, edges, settings, tags
      FROM workflows
      WHERE org_id = app.org_id() AND id = :template_id AND is_template AND deleted_at IS NULL
      UNION ALL
      SELECT name, description, nodes, edges, settings, tags
      FROM workflow_public_templates
      WHERE workflow_id = :template_id AND org_id <> app.org_id()
      LIMIT 1) t
RETURNING org_id, id, name, description, nodes, edges, settings, status, owner_id, team_id,
          tags, is_template, visibility, current_version, content_hash, created_at,
          updated_at, deleted_at;

-- name: share_with_user :one
-- Share a workflow with a member (or change the permission of an existing share).
INSERT INTO workflow_shares (org_id, workflow_id, user_id, permission)
VALUES (app.org_id(), :workflow_id, :user_id, :permission)
ON CONFLICT (org_id, workflow_id, user_id) WHERE user_id IS NOT NULL
DO UPDATE SET permission = EXCLUDED.permission
RETURNING org_id, id, workflow_id, user_id, team_id, permission, created_by, created_at;

-- name: share_with_team :one
INSERT INTO workflow_shares (org_id, workflow_id, team_id, permission)
VALUES (app.org_id(), :workflow_id, :team_id, :permission)
ON CONFLICT (org_id, workflow_id, team_id) WHERE team_id IS NOT NULL
DO UPDATE SET permission = EXCLUDED.permission
RETURNING org_id, id, workflow_id, user_id, team_id, permission, created_by, created_at;

-- name: unshare :execrows
DELETE FROM workflow_shares WHERE org_id = app.org_id() AND id = :id;

-- name: shares :many
-- The shares of a workflow the context may see (grantee, workflow owner, admins).
SELECT org_id, id, workflow_id, user_id, team_id, permission, created_by, created_at
FROM workflow_shares
WHERE org_id = app.org_id() AND workflow_id = :workflow_id
ORDER BY created_at, id;

-- name: stats :one
-- Execution statistics of a live workflow from its workflow_stats row (zeros before the
-- first execution): success rate = successes / (successes + failures), cancellations
-- left out; durations over executions that reported one; p95 from the histogram.
SELECT w.org_id, w.id AS workflow_id,
       coalesce(s.executions, 0) AS executions,
       coalesce(s.successes, 0) AS successes,
       coalesce(s.failures, 0) AS failures,
       coalesce(s.cancellations, 0) AS cancellations,
       s.successes::double precision / nullif(s.successes + s.failures, 0) AS success_rate,
       s.total_duration_ms::double precision / nullif(s.timed_executions, 0) AS avg_duration_ms,
       app.workflow_stats_quantile(s.duration_histogram, 0.95, s.min_duration_ms,
                                   s.max_duration_ms) AS p95_duration_ms,
       s.min_duration_ms, s.max_duration_ms, s.last_execution_at
FROM workflows w
LEFT JOIN workflow_stats s ON s.org_id = w.org_id AND s.workflow_id = w.id
WHERE w.org_id = app.org_id() AND w.id = :id AND w.deleted_at IS NULL;

-- name: copy_rows :copy
COPY workflows (org_id, id, name, description, nodes, edges, settings, status, owner_id,
                team_id, tags, is_template, visibility, created_at, updated_at) FROM STDIN
