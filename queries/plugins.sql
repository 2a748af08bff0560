-- Plugins (schema/0020_plugins.sql): catalog, versions, dependencies, governance,
-- installations and usage. Cross-tenant catalog reads go through the SECURITY DEFINER
-- functions app.plugin_* (public, listed plugins and the caller's own); everything else is a
-- tenant statement bounded by RLS.

-- name: create :one
-- A plugin of the context organization (a draft).
INSERT INTO plugins (org_id, id, name, display_name, summary, description, tags, categories,
                     compat, license, visibility, sla_p95_ms, sla_error_rate)
VALUES (app.org_id(), :id, :name, :display_name, :summary, :description, :tags, :categories,
        :compat, :license, :visibility, :sla_p95_ms, :sla_error_rate)
RETURNING org_id, id, name, display_name, summary, description, tags, categories, compat,
          license, visibility, status, sla_p95_ms, sla_error_rate, quality_score,
          latest_version, ''::text AS publisher, created_at, updated_at;

-- name: get :one
-- A plugin the context may see: listed in the public catalog, or its own.
SELECT org_id, id, name, display_name, summary, description, tags, categories, compat,
       license, visibility, status, sla_p95_ms, sla_error_rate, quality_score, latest_version,
       publisher, created_at, updated_at
FROM app.plugin_get(:id);

-- name: update :one
-- Change the metadata of an own plugin (NULL keeps a field).
UPDATE plugins SET
  display_name = coalesce(:display_name, display_name),
  summary = coalesce(:summary, summary),
  description = coalesce(:description, description),
  tags = coalesce(:tags, tags),
  categories = coalesce(:categories, categories),
  compat = coalesce(:compat, compat),
  license = coalesce(:license, license),
  visibility = coalesce(:visibility, visibility),
  sla_p95_ms = coalesce(:sla_p95_ms, sla_p95_ms),
  sla_error_rate = coalesce(:sla_error_rate, sla_error_rate)
WHERE org_id = app.org_id() AND id = :id
RETURNING org_id, id, name, display_name, summary, description, tags, categories, compat,
          license, visibility, status, sla_p95_ms, sla_error_rate, quality_score,
          latest_version, ''::text AS publisher, created_at, updated_at;

-- name: set_status :one
-- Move an own plugin along its lifecycle (the trigger checks the transition and the role).
UPDATE plugins SET status = :status
WHERE org_id = app.org_id() AND id = :id
RETURNING org_id, id, name, display_name, summary, description, tags, categories, compat,
          license, visibility, status, sla_p95_ms, sla_error_rate, quality_score,
          latest_version, ''::text AS publisher, created_at, updated_at;

-- name: delete :execrows
DELETE FROM plugins WHERE org_id = app.org_id() AND id = :id;

-- name: search :many
-- Catalog search (app.plugin_search): ranked full-text over the public catalog and the
-- context's own plugins, filtered, keyset-paginated on (rank, id).
SELECT org_id, id, name, display_name, summary, tags, categories, compat, license,
       visibility, status, quality_score, latest_version, publisher, rank
FROM app.plugin_search(:query, :category, :publisher::uuid, :compat, :min_quality,
                       :after_rank, :after_id::uuid, :limit, :fuzzy);

-- name: create_version :one
-- A draft version of an own plugin with its dependencies (parallel arrays; a trigger copies
-- them into the reverse index plugin_dependencies). No row when the plugin is not the
-- context's.
INSERT INTO plugin_versions (org_id, id, plugin_id, version, manifest, changelog, checksum,
                             size_bytes, dep_plugin_ids, dep_ranges)
SELECT p.org_id, :id, p.id, :version, :manifest, :changelog, :checksum, :size_bytes,
       :dep_plugin_ids::uuid[], :dep_ranges::text[]
FROM plugins p WHERE p.org_id = app.org_id() AND p.id = :plugin_id
RETURNING org_id, id, plugin_id, version, prerelease, manifest, changelog, checksum,
          size_bytes, status, status_reason, quality_score, published_at, created_at;

-- name: get_version :one
SELECT org_id, id, plugin_id, version, prerelease, manifest, changelog, checksum, size_bytes,
       status, status_reason, quality_score, published_at, created_at
FROM app.plugin_version_get(:id);

-- name: set_version_status :one
-- Submit (in_review), approve, reject, deprecate or yank an own version.
UPDATE plugin_versions SET status = :status, status_reason = :reason
WHERE org_id = app.org_id() AND id = :id
RETURNING org_id, id, plugin_id, version, prerelease, manifest, changelog, checksum,
          size_bytes, status, status_reason, quality_score, published_at, created_at;

-- name: update_draft :one
-- Change a draft version's manifest (published versions refuse: immutable).
UPDATE plugin_versions SET manifest = :manifest
WHERE org_id = app.org_id() AND id = :id
RETURNING org_id, id, plugin_id, version, prerelease, manifest, changelog, checksum,
          size_bytes, status, status_reason, quality_score, published_at, created_at;

-- name: list_versions :many
-- The versions of an own plugin, highest precedence first (SQL order = SemVer order).
SELECT org_id, id, plugin_id, version, prerelease, manifest, changelog, checksum, size_bytes,
       status, status_reason, quality_score, published_at, created_at
FROM plugin_versions
WHERE org_id = app.org_id() AND plugin_id = :plugin_id
ORDER BY vkey DESC
LIMIT :limit;

-- name: graph :many
-- The candidate graph below :roots in one round trip (app.plugin_graph, recursive CTE).
SELECT plugin_id, plugin_name, org_id, version_id, version, vkey, prerelease, dep_plugin_ids,
       dep_ranges
FROM app.plugin_graph(:roots::uuid[]);

-- name: graph_packed :many
-- The candidate graph packed per plugin for the resolver (app.plugin_graph_packed).
SELECT plugin_id, plugin_name, versions
FROM app.plugin_graph_packed(:roots::uuid[]);

-- name: dependents :many
-- Reverse dependencies of a plugin (visible to the context), in one query.
SELECT plugin_id, plugin_name, org_id, version_id, version, status, range
FROM app.plugin_dependents(:plugin_id);

-- name: add_stage :one
INSERT INTO plugin_approval_stages (org_id, id, position, name, required_role, environments)
VALUES (app.org_id(), :id, :position, :name, :required_role, :environments)
RETURNING org_id, id, position, name, required_role, environments, created_at;

-- name: list_stages :many
SELECT org_id, id, position, name, required_role, environments, created_at
FROM plugin_approval_stages
WHERE org_id = app.org_id()
ORDER BY position;

-- name: decide :one
-- Record a stage's decision on a version (the trigger checks order, role, rejection).
INSERT INTO plugin_approvals (org_id, plugin_id, version_id, stage_id, decision, reason)
VALUES (app.org_id(), :plugin_id, :version_id, :stage_id, :decision, :reason)
RETURNING org_id, id, plugin_id, version_id, stage_id, decision, reason, decided_by,
          decided_role, decided_at;

-- name: decisions :many
SELECT org_id, id, plugin_id, version_id, stage_id, decision, reason, decided_by,
       decided_role, decided_at
FROM plugin_approvals
WHERE org_id = app.org_id() AND version_id = :version_id
ORDER BY decided_at, id;

-- name: set_policy :one
INSERT INTO plugin_policies AS p (org_id, policy, enabled, config)
VALUES (app.org_id(), :policy, :enabled, :config)
ON CONFLICT (org_id, policy) DO UPDATE
SET enabled = EXCLUDED.enabled, config = EXCLUDED.config, updated_at = now()
RETURNING org_id, policy, enabled, config, updated_at;

-- name: list_policies :many
SELECT org_id, policy, enabled, config, updated_at
FROM plugin_policies WHERE org_id = app.org_id() ORDER BY policy;

-- name: approve_publisher :execrows
INSERT INTO plugin_approved_publishers (org_id, publisher_org_id)
VALUES (app.org_id(), :publisher_org_id)
ON CONFLICT DO NOTHING;

-- name: grant_exemption :one
INSERT INTO plugin_exemptions (org_id, plugin_id, policy, justification, expires_at)
VALUES (app.org_id(), :plugin_id, :policy, :justification, now() + make_interval(secs => :ttl_s))
RETURNING org_id, id, plugin_id, policy, justification, approved_by, expires_at, created_at,
          expires_at > now() AS active;

-- name: list_exemptions :many
SELECT org_id, id, plugin_id, policy, justification, approved_by, expires_at, created_at,
       expires_at > now() AS active
FROM plugin_exemptions
WHERE org_id = app.org_id() AND (:plugin_id::uuid IS NULL OR plugin_id = :plugin_id::uuid)
ORDER BY created_at DESC, id;

-- name: policy_check :many
-- Install-time policy check of the context organization: the violated policies.
SELECT policy, message FROM app.plugin_policy_check(:plugin_id, :version_id, :environment);

-- name: add_advisory :one
-- An advisory on an own plugin: affected versions [introduced, fixed_in).
INSERT INTO plugin_advisories (org_id, plugin_id, identifier, severity, summary, affected,
                               introduced, fixed_in)
SELECT p.org_id, p.id, :identifier, :severity, :summary, :affected, :introduced, :fixed_in
FROM plugins p WHERE p.org_id = app.org_id() AND p.id = :plugin_id
RETURNING id, plugin_id, identifier, severity, summary, affected, fixed_in, status,
          published_at;

-- name: set_advisory_status :one
UPDATE plugin_advisories SET status = :status
WHERE org_id = app.org_id() AND id = :id
RETURNING id, plugin_id, identifier, severity, summary, affected, fixed_in, status,
          published_at;

-- name: advisories :many
SELECT id, plugin_id, identifier, severity, summary, affected, fixed_in, status, published_at
FROM app.plugin_advisories_of(:plugin_id);

-- name: alerts :many
-- The context organization's installations affected by an open advisory.
SELECT installation_id, plugin_id, environment, version, advisory_id, identifier, severity,
       fixed_in
FROM app.plugin_vulnerability_alerts();

-- name: store_secret :scalar
INSERT INTO plugin_secrets (org_id, id, plugin_id, environment, secret)
VALUES (app.org_id(), :id, :plugin_id, :environment, :secret)
RETURNING id;

-- name: install :one
-- Install (or change the version and configuration of) a plugin in an environment; the
-- trigger runs the policy check and records the deployment.
INSERT INTO plugin_installations AS i (org_id, plugin_id, environment, version_id, version,
                                       publisher_org_id, config, secret_id, enabled,
                                       last_action)
VALUES (app.org_id(), :plugin_id, :environment, :version_id, '', app.org_id(), :config,
        :secret_id, true, 'install')
ON CONFLICT (org_id, plugin_id, environment) DO UPDATE
SET version_id = EXCLUDED.version_id, config = EXCLUDED.config,
    secret_id = coalesce(EXCLUDED.secret_id, i.secret_id),
    last_action = CASE WHEN i.version_id = EXCLUDED.version_id THEN 'configure'
                       ELSE 'upgrade' END
RETURNING org_id, id, plugin_id, publisher_org_id, environment, version_id, version, config,
          secret_id, enabled, last_action, installed_at, updated_at;

-- name: set_enabled :one
UPDATE plugin_installations
SET enabled = :enabled, last_action = CASE WHEN :enabled THEN 'enable' ELSE 'disable' END
WHERE org_id = app.org_id() AND plugin_id = :plugin_id AND environment = :environment
RETURNING org_id, id, plugin_id, publisher_org_id, environment, version_id, version, config,
          secret_id, enabled, last_action, installed_at, updated_at;

-- name: uninstall :execrows
DELETE FROM plugin_installations
WHERE org_id = app.org_id() AND plugin_id = :plugin_id AND environment = :environment;

-- name: rollback :one
-- Back to the deployment before the latest one, in one statement (version, configuration,
-- secrets, enabled flag); recorded as a 'rollback' deployment. No row when there is no
-- earlier deployment, or it was an uninstall.
WITH prev AS (
  SELECT d.version_id, d.config, d.secret_id, d.enabled, d.action
  FROM plugin_deployments d
  WHERE d.org_id = app.org_id() AND d.plugin_id = :plugin_id AND d.environment = :environment
  ORDER BY d.id DESC
  OFFSET 1 LIMIT 1
)
INSERT INTO plugin_installations AS i (org_id, plugin_id, environment, version_id, version,
                                       publisher_org_id, config, secret_id, enabled,
                                       last_action)
SELECT app.org_id(), :plugin_id, :environment, prev.version_id, '', app.org_id(),
       prev.config, prev.secret_id, prev.enabled, 'rollback'
FROM prev WHERE prev.action <> 'uninstall'
ON CONFLICT (org_id, plugin_id, environment) DO UPDATE
SET version_id = EXCLUDED.version_id, config = EXCLUDED.config,
    secret_id = EXCLUDED.secret_id, enabled = EXCLUDED.enabled, last_action = 'rollback'
RETURNING org_id, id, plugin_id, publisher_org_id, environment, version_id, version, config,
          secret_id, enabled, last_action, installed_at, updated_at;

-- name: installation :one
SELECT org_id, id, plugin_id, publisher_org_id, environment, version_id, version, config,
       secret_id, enabled, last_action, installed_at, updated_at
FROM plugin_installations
WHERE org_id = app.org_id() AND plugin_id = :plugin_id AND environment = :environment;

-- name: installations :many
SELECT org_id, id, plugin_id, publisher_org_id, environment, version_id, version, config,
       secret_id, enabled, last_action, installed_at, updated_at
FROM plugin_installations
WHERE org_id = app.org_id() AND (:environment::text IS NULL OR environment = :environment)
ORDER BY plugin_id, environment;

-- name: deployments :many
-- Deployment history of a plugin in an environment, newest first.
SELECT org_id, id, plugin_id, environment, action, version_id, version, config, secret_id,
       enabled, deployed_by, deployed_at
FROM plugin_deployments
WHERE org_id = app.org_id() AND plugin_id = :plugin_id AND environment = :environment
ORDER BY id DESC
LIMIT :limit;

-- name: get_secret :one
SELECT s.id, s.secret
FROM plugin_secrets s
WHERE s.org_id = app.org_id() AND s.id = :id;

-- name: ingest_usage :execrows
-- Usage events in bulk (parallel arrays, one statement). :org_id NULL in a tenant session.
INSERT INTO plugin_usage_events (org_id, plugin_id, kind, latency_ms, occurred_at)
SELECT coalesce(:org_id::uuid, app.org_id()), u.p, u.k, u.l, coalesce(u.t, now())
FROM unnest(:plugin_ids::uuid[], :kinds::text[], :latencies::real[],
            :occurred_at::timestamptz[]) AS u(p, k, l, t);

-- name: usage_rollup :scalar
-- Recompute the daily roll-up of every (UTC) day since :days days ago from the raw events
-- (dl.system()). Whole days are recomputed, so running it twice gives the same rows.
WITH agg AS (
  SELECT e.org_id, e.plugin_id, (e.occurred_at AT TIME ZONE 'UTC')::date AS day,
         count(*) FILTER (WHERE e.kind = 'install') AS installs,
         count(*) FILTER (WHERE e.kind = 'uninstall') AS uninstalls,
         count(*) FILTER (WHERE e.kind = 'invocation') AS invocations,
         count(*) FILTER (WHERE e.kind = 'error') AS errors,
         count(e.latency_ms) AS latency_n,
         percentile_cont(0.5) WITHIN GROUP (ORDER BY e.latency_ms) AS p50,
         percentile_cont(0.95) WITHIN GROUP (ORDER BY e.latency_ms) AS p95
  FROM plugin_usage_events e
  WHERE e.occurred_at >= (date_trunc('day', now() AT TIME ZONE 'UTC')
                          - make_interval(days => :days)) AT TIME ZONE 'UTC'
  GROUP BY 1, 2, 3
), up AS (
  INSERT INTO plugin_usage_daily AS d (org_id, plugin_id, day, installs, uninstalls,
                                       invocations, errors, latency_n, p50_ms, p95_ms)
  SELECT org_id, plugin_id, day, installs, uninstalls, invocations, errors, latency_n, p50, p95
  FROM agg
  ON CONFLICT (org_id, plugin_id, day) DO UPDATE
  SET installs = EXCLUDED.installs, uninstalls = EXCLUDED.uninstalls,
      invocations = EXCLUDED.invocations, errors = EXCLUDED.errors,
      latency_n = EXCLUDED.latency_n, p50_ms = EXCLUDED.p50_ms, p95_ms = EXCLUDED.p95_ms,
      refreshed_at = now()
  RETURNING 1
)
SELECT count(*) FROM up;

-- name: usage_purge :execrows
-- Retention of the raw usage events (dl.system()): up to :limit events that occurred before
-- :before (the daily roll-up keeps their counts: it recomputes only its last days). One
-- short batch; call again until it deletes fewer than :limit.
DELETE FROM plugin_usage_events
WHERE ctid = ANY(ARRAY(
  SELECT e.ctid FROM plugin_usage_events e
  WHERE e.occurred_at < :before
  LIMIT :limit));

-- name: usage_daily :many
-- The context organization's own daily usage of a plugin.
SELECT org_id, plugin_id, day, installs, uninstalls, invocations, errors, latency_n, p50_ms,
       p95_ms
FROM plugin_usage_daily
WHERE org_id = app.org_id() AND plugin_id = :plugin_id AND day > current_date - :days::int
ORDER BY day;

-- name: adoption :many
-- Adoption of an own plugin across organizations (aggregates only), per day.
SELECT day, active_orgs, invocations, errors FROM app.plugin_adoption(:plugin_id, :days);

-- name: sla :one
-- SLA compliance of an own plugin over :days days.
SELECT plugin_id, invocations, errors, error_rate, p95_ms, sla_p95_ms, sla_error_rate,
       compliant
FROM app.plugin_sla(:plugin_id, :days);

-- name: quality_refresh :scalar
-- Quality score (0-100) of every published version (dl.system()): tests 30 (manifest
-- test_coverage 0-1), vulnerabilities 25 (minus the worst open advisory affecting it),
-- ratings 20 (marketplace average; 10 without ratings), adoption 15 (active organizations in
-- 30 days, log scale), recency 10 (linear over a year). Then each plugin's score is its
-- latest release's. Returns how many versions changed.
WITH adoption AS (
  SELECT u.plugin_id, count(DISTINCT u.org_id) AS orgs
  FROM plugin_usage_daily u
  WHERE u.day > current_date - 30 AND u.invocations > 0
  GROUP BY u.plugin_id
), scored AS (
  SELECT v.org_id, v.id,
         round((
           30 * CASE WHEN jsonb_typeof(v.manifest -> 'test_coverage') = 'number'
                     THEN least(greatest((v.manifest ->> 'test_coverage')::float8, 0), 1)
                     ELSE 0 END
           + 25 - coalesce((SELECT max(CASE a.severity WHEN 'critical' THEN 25 WHEN 'high' THEN 15
                                                       WHEN 'medium' THEN 8 ELSE 3 END)
                            FROM plugin_advisories a
                            WHERE a.org_id = v.org_id AND a.plugin_id = v.plugin_id
                              AND a.status = 'open'
                              AND (a.introduced_key IS NULL OR v.vkey >= a.introduced_key)
                              AND (a.fixed_key IS NULL OR v.vkey < a.fixed_key)), 0)
           + coalesce((SELECT 4 * l.rating_sum::float8 / nullif(l.rating_count, 0)
                       FROM marketplace_listings l
                       WHERE l.org_id = v.org_id AND l.plugin_id = v.plugin_id
                       LIMIT 1), 10)
           + 15 * least(1, ln(1 + coalesce(ad.orgs, 0)) / ln(101))
           + 10 * greatest(0, 1 - extract(epoch FROM now() - coalesce(v.published_at, now()))
                                  / (365 * 86400))
         )::numeric, 2)::float8 AS score
  FROM plugin_versions v
  LEFT JOIN adoption ad ON ad.plugin_id = v.plugin_id
  WHERE v.status IN ('approved', 'deprecated')
), changed AS (
  UPDATE plugin_versions v SET quality_score = s.score
  FROM scored s
  WHERE v.org_id = s.org_id AND v.id = s.id AND v.quality_score IS DISTINCT FROM s.score
  RETURNING v.org_id, v.plugin_id
), plugins_changed AS (
  UPDATE plugins p SET quality_score = (
    SELECT s.score FROM plugin_versions v JOIN scored s ON s.org_id = v.org_id AND s.id = v.id
    WHERE v.org_id = p.org_id AND v.plugin_id = p.id
    ORDER BY v.prerelease, v.vkey DESC LIMIT 1)
  WHERE (p.org_id, p.id) IN (SELECT DISTINCT c.org_id, c.plugin_id FROM changed c)
  RETURNING 1
)
SELECT count(*) FROM changed;
