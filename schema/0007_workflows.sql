-- depends: 0006_permissions
-- Workflows: React-Flow graphs (nodes, edges, settings) with immutable version history,
-- visibility and shares enforced by RLS, tags, templates, full-text search, and running
-- statistics per workflow.
--
-- Contract for executions (schema/0008_executions*.sql):
--
--   app.workflow_stats_record(p_org uuid, p_workflow uuid, p_status text,
--                             p_duration_ms bigint) RETURNS void
--
--   Call it once when an execution finishes, in the same transaction (e.g. from an AFTER
--   UPDATE trigger on executions when status becomes final). p_status is one of
--   succeeded | failed | cancelled | timed_out (anything else raises 22023);
--   p_duration_ms >= 0, or NULL when the execution never ran (counted, not timed).
--   Invoker rights (no SECURITY DEFINER), search_path pinned: the caller needs to see
--   the workflow and may write (app.can_write()), or is dl.system(). Concurrent calls
--   for one workflow serialize on its workflow_stats row (one upsert each).
--
-- Who may do what (policies below, plus app.workflows_guard for what policies cannot
-- see, i.e. the old row):
--
--   read    members of the organization by visibility: organization/public: everyone;
--           team: members of the workflow's team; private: nobody else. Always: the owner,
--           owners/admins, and users with a share (to them or to one of their teams).
--           Other organizations: nothing. Live public templates are copied into
--           workflow_public_templates, which every organization reads (and none writes).
--   write   app.can_write() and (owner, admin, or an 'edit' share to the user or a team of
--           theirs). Changing owner, visibility, team, template flag or deletion is for
--           the owner and admins; publishing ('public') is for admins only.
--   create  app.can_write(); owner_id is the context user (admins may create for any
--           member); a team may be set by its members and by admins.
--   shares  read by the grantee (user or team member), the workflow's owner and admins;
--           managed by the workflow's owner and admins.
--
-- Versions: a BEFORE trigger hashes (nodes, edges, settings); when the hash changes the
-- row's current_version goes up by one and an AFTER trigger copies the content into
-- workflow_versions. Concurrent saves serialize on the workflow's row lock, so version
-- numbers are consecutive. Name, description, status, tags… do not make versions.
-- workflow_versions is read-only to the run-time role; for everyone it refuses UPDATE,
-- DELETE (unless its workflow is gone: ON DELETE CASCADE) and any INSERT but the trigger's.

-- Helpers -------------------------------------------------------------------------------------

-- The teams the context user belongs to in the context organization. Policies call it as
-- (SELECT app.my_team_ids()), once per statement; `team_id = ANY (that)` is an index
-- qual (uuid = is leakproof), where `team_id IN (SELECT …)` would be a per-row filter.
CREATE FUNCTION app.my_team_ids() RETURNS uuid[]
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT coalesce(array_agg(tm.team_id), '{}')
  FROM team_members tm
  WHERE tm.org_id = app.org_id() AND tm.user_id = app.user_id()
$$;

-- Graph shape, cheap enough for a CHECK: nodes is an array of objects with string id and
-- type (ids unique), edges an array of objects whose source and target are node ids.
-- Python validates the same (and more) first, with messages naming the bad field.
CREATE FUNCTION app.workflow_graph_ok(p_nodes jsonb, p_edges jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF jsonb_typeof(p_nodes) IS DISTINCT FROM 'array'
     OR jsonb_typeof(p_edges) IS DISTINCT FROM 'array' THEN
    RETURN false;
  END IF;
  IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_nodes) n
             WHERE jsonb_typeof(n) <> 'object'
                OR jsonb_typeof(n -> 'id') IS DISTINCT FROM 'string'
                OR jsonb_typeof(n -> 'type') IS DISTINCT FROM 'string') THEN
    RETURN false;
  END IF;
  IF (SELECT count(*) <> count(DISTINCT n ->> 'id') FROM jsonb_array_elements(p_nodes) n) THEN
    RETURN false;
  END IF;
  IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_edges) e
             WHERE jsonb_typeof(e) <> 'object'
                OR jsonb_typeof(e -> 'source') IS DISTINCT FROM 'string'
                OR jsonb_typeof(e -> 'target') IS DISTINCT FROM 'string') THEN
    RETURN false;
  END IF;
  RETURN NOT EXISTS (
    SELECT 1
    FROM jsonb_array_elements(p_edges) e
    CROSS JOIN LATERAL (VALUES (e ->> 'source'), (e ->> 'target')) AS ref (id)
    WHERE ref.id NOT IN (SELECT n ->> 'id' FROM jsonb_array_elements(p_nodes) n));
END $$;

-- Tags: at most 50, each 1-50 characters of lowercase letters, digits and . _ : - (a
-- letter or digit first), no duplicates. Lowercase so that search (which lowercases)
-- and tag filters agree.
CREATE FUNCTION app.workflow_tags_ok(p_tags text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT cardinality(p_tags) <= 50
     AND NOT EXISTS (SELECT 1 FROM unnest(p_tags) t
                     WHERE t IS NULL OR t !~ '^[a-z0-9][a-z0-9._:-]{0,49}$')
     AND (SELECT count(*) = count(DISTINCT t) FROM unnest(p_tags) t)
$$;

-- Tags as text for the search vector. array_to_string is only STABLE for anyarray (element
-- output functions may depend on settings); for text[] it is immutable.
CREATE FUNCTION app.workflow_tags_text(p_tags text[]) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$ SELECT array_to_string(p_tags, ' ') $$;

-- The content hash that decides whether a save is a new version: sha256 of the canonical
-- text of [nodes, edges, settings] (jsonb text is canonical: keys sorted, no duplicates,
-- fixed spacing).
CREATE FUNCTION app.workflow_content_hash(p_nodes jsonb, p_edges jsonb, p_settings jsonb)
RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$ SELECT sha256(convert_to(jsonb_build_array(p_nodes, p_edges, p_settings)::text, 'UTF8')) $$;

-- Tables -----------------------------------------------------------------------------------------

CREATE TABLE workflows (
  org_id           uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id               uuid NOT NULL DEFAULT gen_random_uuid(),
  name             text NOT NULL
                   CONSTRAINT workflows_name_length CHECK (length(name) BETWEEN 1 AND 200),
  description      text NOT NULL DEFAULT ''
                   CONSTRAINT workflows_description_length CHECK (length(description) <= 10000),
  nodes            jsonb NOT NULL DEFAULT '[]',
  edges            jsonb NOT NULL DEFAULT '[]',
  settings         jsonb NOT NULL DEFAULT '{}'
                   CONSTRAINT workflows_settings_object CHECK (jsonb_typeof(settings) = 'object'),
  status           text NOT NULL DEFAULT 'draft'
                   CONSTRAINT workflows_status_known
                   CHECK (status IN ('draft', 'active', 'paused', 'archived')),
  -- The owning member. Not a foreign key: a workflow outlives its owner's membership (an
  -- admin transfers it); the guard checks membership when the owner is set.
  owner_id         uuid NOT NULL,
  team_id          uuid,
  tags             text[] NOT NULL DEFAULT '{}'
                   CONSTRAINT workflows_tags_valid CHECK (app.workflow_tags_ok(tags)),
  is_template      boolean NOT NULL DEFAULT false,
  visibility       text NOT NULL DEFAULT 'organization'
                   CONSTRAINT workflows_visibility_known
                   CHECK (visibility IN ('private', 'team', 'organization', 'public')),
  current_version  integer NOT NULL DEFAULT 1
                   CONSTRAINT workflows_current_version_positive CHECK (current_version >= 1),
  content_hash     bytea NOT NULL,  -- set by the trigger; see app.workflow_content_hash
  created_at       timestamptz NOT NULL DEFAULT now(),
  updated_at       timestamptz NOT NULL DEFAULT now(),
  deleted_at       timestamptz,
  search           tsvector GENERATED ALWAYS AS (
                     setweight(to_tsvector('simple'::regconfig, name), 'A')
                     || setweight(to_tsvector('simple'::regconfig, description), 'B')
                     || setweight(to_tsvector('simple'::regconfig, app.workflow_tags_text(tags)), 'C')
                   ) STORED,
  PRIMARY KEY (org_id, id),
  CONSTRAINT workflows_graph_valid CHECK (app.workflow_graph_ok(nodes, edges)),
  -- Only templates are published beyond the organization.
  CONSTRAINT workflows_public_is_template CHECK (visibility <> 'public' OR is_template),
  -- A deleted team leaves its workflows without a team: visibility 'team' then means
  -- owner, admins and shares only (fails closed).
  FOREIGN KEY (org_id, team_id) REFERENCES teams (org_id, id) ON DELETE SET NULL (team_id)
);
-- Lists: keyset by (updated_at, id) newest first, live rows only.
CREATE INDEX workflows_list_idx ON workflows (org_id, updated_at DESC, id DESC)
  WHERE deleted_at IS NULL;
-- The team foreign key's ON DELETE action, and lists filtered by team.
CREATE INDEX workflows_team_idx ON workflows (org_id, team_id) WHERE team_id IS NOT NULL;
-- Tag and text search. Under RLS these serve the maintenance role only: && @> @@ are not
-- LEAKPROOF, so in a tenant session the planner must apply them after the policy, as
-- filters over the organization's rows (found through workflows_list_idx).
CREATE INDEX workflows_tags_idx ON workflows USING gin (tags);
CREATE INDEX workflows_search_idx ON workflows USING gin (search);

CREATE TABLE workflow_versions (
  org_id        uuid NOT NULL,
  workflow_id   uuid NOT NULL,
  version       integer NOT NULL,
  nodes         jsonb NOT NULL,
  edges         jsonb NOT NULL,
  settings      jsonb NOT NULL,
  content_hash  bytea NOT NULL,
  created_by    uuid,
  created_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, workflow_id, version),
  FOREIGN KEY (org_id, workflow_id) REFERENCES workflows (org_id, id) ON DELETE CASCADE
);

CREATE TABLE workflow_shares (
  org_id       uuid NOT NULL,
  id           uuid NOT NULL DEFAULT gen_random_uuid(),
  workflow_id  uuid NOT NULL,
  user_id      uuid,
  team_id      uuid,
  permission   text NOT NULL
               CONSTRAINT workflow_shares_permission_known CHECK (permission IN ('view', 'edit')),
  created_by   uuid DEFAULT app.user_id(),
  created_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT workflow_shares_one_grantee CHECK (num_nonnulls(user_id, team_id) = 1),
  FOREIGN KEY (org_id, workflow_id) REFERENCES workflows (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, user_id) REFERENCES memberships (org_id, user_id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, team_id) REFERENCES teams (org_id, id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX workflow_shares_user_key ON workflow_shares (org_id, workflow_id, user_id)
  WHERE user_id IS NOT NULL;
CREATE UNIQUE INDEX workflow_shares_team_key ON workflow_shares (org_id, workflow_id, team_id)
  WHERE team_id IS NOT NULL;
-- The policies' "shared with me" lookups (and the membership / team foreign keys).
CREATE INDEX workflow_shares_user_idx ON workflow_shares (org_id, user_id)
  WHERE user_id IS NOT NULL;
CREATE INDEX workflow_shares_team_idx ON workflow_shares (org_id, team_id)
  WHERE team_id IS NOT NULL;

-- Running statistics, one row per workflow, kept by app.workflow_stats_record, so that
-- reading them never scans executions. Durations go into a fixed log-scale histogram:
-- 110 bigint buckets, index 1 = [0, 1) ms, index k >= 2 = [2^((k-2)/4), 2^((k-1)/4)) ms
-- (each bucket 19% wider than the one before), index 110 = everything from 2^27 ms (37 h).
-- p95 is read from it (app.workflow_stats_quantile): within one bucket, i.e. at most 19%
-- off (1 ms below 1 ms), clamped to the exact min and max.
CREATE TABLE workflow_stats (
  org_id              uuid NOT NULL,
  workflow_id         uuid NOT NULL,
  executions          bigint NOT NULL DEFAULT 0,  -- finished, any outcome
  successes           bigint NOT NULL DEFAULT 0,  -- succeeded
  failures            bigint NOT NULL DEFAULT 0,  -- failed or timed_out
  cancellations       bigint NOT NULL DEFAULT 0,  -- cancelled
  timed_executions    bigint NOT NULL DEFAULT 0,  -- those with a duration
  total_duration_ms   bigint NOT NULL DEFAULT 0,
  min_duration_ms     bigint,
  max_duration_ms     bigint,
  duration_histogram  bigint[] NOT NULL DEFAULT array_fill(0::bigint, ARRAY[110])
                      CONSTRAINT workflow_stats_histogram_size
                      CHECK (cardinality(duration_histogram) = 110),
  last_execution_at   timestamptz,
  PRIMARY KEY (org_id, workflow_id),
  FOREIGN KEY (org_id, workflow_id) REFERENCES workflows (org_id, id) ON DELETE CASCADE
);

-- The public template catalog: a copy of every live public template (visibility 'public'
-- implies is_template), kept by app.workflows_publish, readable from every organization.
-- It is the one place where rows cross tenants, and it holds only what a template user
-- needs (no owner, team, shares, history or statistics).
--
-- Why a copy and not a second SELECT policy on workflows: permissive policies are OR'ed,
-- so "own organization OR public template" would no longer be a top-level org_id = …
-- qual. The planner then cannot merge it with the queries' own org_id qual, estimates the
-- organization's share of rows squared, and turns every list page into a bitmap scan of
-- the whole organization plus a sort (measured: 6.5 ms instead of 0.4 ms at 1,000
-- workflows per organization). With the copy, every workflows policy stays tenant-scoped.
CREATE TABLE workflow_public_templates (
  org_id           uuid NOT NULL,
  workflow_id      uuid NOT NULL,
  name             text NOT NULL,
  description      text NOT NULL,
  nodes            jsonb NOT NULL,
  edges            jsonb NOT NULL,
  settings         jsonb NOT NULL,
  tags             text[] NOT NULL,
  current_version  integer NOT NULL,
  published_at     timestamptz NOT NULL DEFAULT now(),
  updated_at       timestamptz NOT NULL,
  PRIMARY KEY (org_id, workflow_id),
  FOREIGN KEY (org_id, workflow_id) REFERENCES workflows (org_id, id) ON DELETE CASCADE
);
-- Lookup by id from any organization (not unique: a unique key not led by org_id would be
-- a cross-tenant oracle; ids are random), and the catalog newest first.
CREATE INDEX workflow_public_templates_id_idx ON workflow_public_templates (workflow_id);
CREATE INDEX workflow_public_templates_list_idx
  ON workflow_public_templates (updated_at DESC, workflow_id DESC);

-- Row-level security -----------------------------------------------------------------------------
ALTER TABLE workflows ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflows FORCE ROW LEVEL SECURITY;
ALTER TABLE workflow_versions ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflow_versions FORCE ROW LEVEL SECURITY;
ALTER TABLE workflow_shares ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflow_shares FORCE ROW LEVEL SECURITY;
ALTER TABLE workflow_stats ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflow_stats FORCE ROW LEVEL SECURITY;
ALTER TABLE workflow_public_templates ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflow_public_templates FORCE ROW LEVEL SECURITY;

-- The documented exception to tenant isolation: any organization context reads the public
-- template catalog (no context reads nothing). Nobody but the trigger writes it.
CREATE POLICY workflow_public_templates_select ON workflow_public_templates FOR SELECT
  USING ((SELECT app.org_id()) IS NOT NULL);

-- Cheap tests first: OR evaluates left to right, and most rows are organization-visible.
-- The share sub-selects are uncorrelated (hashed once per statement, and only when a row
-- gets that far); their quals are index quals on workflow_shares_user_idx / _team_idx.
CREATE POLICY workflows_select ON workflows FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND (visibility IN ('organization', 'public')
              OR owner_id = (SELECT app.user_id())
              OR (SELECT app.role()) IN ('owner', 'admin')
              OR (visibility = 'team' AND team_id = ANY ((SELECT app.my_team_ids())::uuid[]))
              OR id IN (SELECT s.workflow_id FROM workflow_shares s
                        WHERE s.org_id = (SELECT app.org_id())
                          AND s.user_id = (SELECT app.user_id()))
              OR id IN (SELECT s.workflow_id FROM workflow_shares s
                        WHERE s.org_id = (SELECT app.org_id())
                          AND s.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))));
CREATE POLICY workflows_insert ON workflows FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
              AND (owner_id = (SELECT app.user_id()) OR (SELECT app.is_admin())));
CREATE POLICY workflows_update ON workflows FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
         AND (owner_id = (SELECT app.user_id())
              OR (SELECT app.is_admin())
              OR id IN (SELECT s.workflow_id FROM workflow_shares s
                        WHERE s.org_id = (SELECT app.org_id()) AND s.permission = 'edit'
                          AND s.user_id = (SELECT app.user_id()))
              OR id IN (SELECT s.workflow_id FROM workflow_shares s
                        WHERE s.org_id = (SELECT app.org_id()) AND s.permission = 'edit'
                          AND s.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))))
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));
CREATE POLICY workflows_delete ON workflows FOR DELETE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
         AND (owner_id = (SELECT app.user_id()) OR (SELECT app.is_admin())));

-- Versions and statistics are visible with their workflow (the sub-select is under the
-- workflows policies). Versions have no write policy: only the versioning trigger writes.
CREATE POLICY workflow_versions_select ON workflow_versions FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND EXISTS (SELECT 1 FROM workflows w
                     WHERE w.org_id = workflow_versions.org_id
                       AND w.id = workflow_versions.workflow_id));

CREATE POLICY workflow_stats_select ON workflow_stats FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND EXISTS (SELECT 1 FROM workflows w
                     WHERE w.org_id = workflow_stats.org_id AND w.id = workflow_stats.workflow_id));
CREATE POLICY workflow_stats_insert ON workflow_stats FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));
CREATE POLICY workflow_stats_update ON workflow_stats FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()))
  WITH CHECK (org_id = (SELECT app.org_id()));

-- Is the context user the owner of this workflow of the context organization? SECURITY
-- DEFINER because the shares policies need it and a sub-select on workflows there would
-- recurse (the workflows policy reads workflow_shares). It answers only about the
-- caller's own organization and the caller's own ownership.
CREATE FUNCTION app.workflow_owned_by_me(p_org uuid, p_workflow uuid) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT EXISTS (SELECT 1 FROM workflows w
                 WHERE w.org_id = p_org AND w.id = p_workflow
                   AND p_org = app.org_id() AND w.owner_id = app.user_id())
$$;

CREATE POLICY workflow_shares_select ON workflow_shares FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND (user_id = (SELECT app.user_id())
              OR team_id = ANY ((SELECT app.my_team_ids())::uuid[])
              OR (SELECT app.role()) IN ('owner', 'admin')
              OR app.workflow_owned_by_me(org_id, workflow_id)));
CREATE POLICY workflow_shares_insert ON workflow_shares FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
              AND ((SELECT app.is_admin()) OR app.workflow_owned_by_me(org_id, workflow_id)));
CREATE POLICY workflow_shares_update ON workflow_shares FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
         AND ((SELECT app.is_admin()) OR app.workflow_owned_by_me(org_id, workflow_id)))
  WITH CHECK (org_id = (SELECT app.org_id()));
CREATE POLICY workflow_shares_delete ON workflow_shares FOR DELETE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
         AND ((SELECT app.is_admin()) OR app.workflow_owned_by_me(org_id, workflow_id)));

-- Triggers -----------------------------------------------------------------------------------------

-- Hash, version number and updated_at; and the rules policies cannot express because they
-- do not see the old row. The rules apply to the context's own rows only: a row of
-- another organization is refused by RLS anyway (after BEFORE triggers), and dl.system()
-- (no context) is trusted.
CREATE FUNCTION app.workflows_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_org uuid := app.org_id();
  v_admin boolean;
BEGIN
  NEW.content_hash := app.workflow_content_hash(NEW.nodes, NEW.edges, NEW.settings);
  IF TG_OP = 'UPDATE' THEN
    NEW.current_version := OLD.current_version
                           + (NEW.content_hash IS DISTINCT FROM OLD.content_hash)::int;
    IF (NEW.name, NEW.description, NEW.content_hash, NEW.status, NEW.owner_id, NEW.team_id,
        NEW.tags, NEW.is_template, NEW.visibility, NEW.deleted_at)
       IS DISTINCT FROM
       (OLD.name, OLD.description, OLD.content_hash, OLD.status, OLD.owner_id, OLD.team_id,
        OLD.tags, OLD.is_template, OLD.visibility, OLD.deleted_at) THEN
      NEW.updated_at := now();
    END IF;
  END IF;
  IF v_org IS NULL OR NEW.org_id IS DISTINCT FROM v_org THEN
    RETURN NEW;
  END IF;
  v_admin := app.is_admin();
  IF TG_OP = 'UPDATE' AND NOT v_admin AND OLD.owner_id IS DISTINCT FROM app.user_id()
     AND (NEW.owner_id, NEW.visibility, NEW.team_id, NEW.is_template, NEW.deleted_at)
         IS DISTINCT FROM
         (OLD.owner_id, OLD.visibility, OLD.team_id, OLD.is_template, OLD.deleted_at) THEN
    RAISE EXCEPTION 'only the owner of a workflow or an admin may change its owner, visibility, team, template flag or deletion'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF NEW.visibility = 'public' AND NOT v_admin
     AND (TG_OP = 'INSERT' OR OLD.visibility IS DISTINCT FROM 'public') THEN
    RAISE EXCEPTION 'only an admin may publish a workflow as a public template'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF (TG_OP = 'INSERT' OR NEW.owner_id IS DISTINCT FROM OLD.owner_id)
     AND NOT EXISTS (SELECT 1 FROM memberships m
                     WHERE m.org_id = NEW.org_id AND m.user_id = NEW.owner_id) THEN
    RAISE EXCEPTION 'the owner of a workflow must be a member of its organization'
      USING ERRCODE = 'check_violation', CONSTRAINT = 'workflows_owner_is_member';
  END IF;
  IF NEW.team_id IS NOT NULL AND NOT v_admin
     AND (TG_OP = 'INSERT' OR NEW.team_id IS DISTINCT FROM OLD.team_id)
     AND NOT NEW.team_id = ANY (app.my_team_ids()) THEN
    RAISE EXCEPTION 'only members of a team and admins may give a workflow to that team'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION app.workflows_guard() FROM PUBLIC;
CREATE TRIGGER workflows_guard BEFORE INSERT OR UPDATE ON workflows
  FOR EACH ROW EXECUTE FUNCTION app.workflows_guard();

-- Copy the new content into workflow_versions. SECURITY DEFINER (owned by the maintenance
-- role) so that the run-time role needs no INSERT privilege on workflow_versions at all:
-- a version can only come from a change of the workflow row itself.
CREATE FUNCTION app.workflows_record_version() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  INSERT INTO workflow_versions (org_id, workflow_id, version, nodes, edges, settings,
                                 content_hash, created_by)
  VALUES (NEW.org_id, NEW.id, NEW.current_version, NEW.nodes, NEW.edges, NEW.settings,
          NEW.content_hash, app.user_id());
  RETURN NULL;
END $$;
CREATE TRIGGER workflows_version_on_insert AFTER INSERT ON workflows
  FOR EACH ROW EXECUTE FUNCTION app.workflows_record_version();
CREATE TRIGGER workflows_version_on_update AFTER UPDATE ON workflows
  FOR EACH ROW WHEN (NEW.current_version <> OLD.current_version)
  EXECUTE FUNCTION app.workflows_record_version();

-- Keep workflow_public_templates in step: a live public template is in the catalog with its
-- current content; unpublishing or soft-deleting takes it out (hard deletes cascade).
-- SECURITY DEFINER for the same reason as the versions: the run-time role cannot write
-- the catalog, so it can only ever hold what the workflows rows say.
CREATE FUNCTION app.workflows_publish() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF NEW.visibility = 'public' AND NEW.is_template AND NEW.deleted_at IS NULL THEN
    INSERT INTO workflow_public_templates AS p
      (org_id, workflow_id, name, description, nodes, edges, settings, tags,
       current_version, updated_at)
    VALUES (NEW.org_id, NEW.id, NEW.name, NEW.description, NEW.nodes, NEW.edges,
            NEW.settings, NEW.tags, NEW.current_version, NEW.updated_at)
    ON CONFLICT (org_id, workflow_id) DO UPDATE SET
      name = EXCLUDED.name, description = EXCLUDED.description, nodes = EXCLUDED.nodes,
      edges = EXCLUDED.edges, settings = EXCLUDED.settings, tags = EXCLUDED.tags,
      current_version = EXCLUDED.current_version, updated_at = EXCLUDED.updated_at;
  ELSE
    DELETE FROM workflow_public_templates WHERE org_id = NEW.org_id AND workflow_id = NEW.id;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER workflows_publish_on_insert AFTER INSERT ON workflows
  FOR EACH ROW WHEN (NEW.visibility = 'public')
  EXECUTE FUNCTION app.workflows_publish();
CREATE TRIGGER workflows_publish_on_update AFTER UPDATE ON workflows
  FOR EACH ROW WHEN (NEW.visibility = 'public' OR OLD.visibility = 'public')
  EXECUTE FUNCTION app.workflows_publish();

-- History is never rewritten: no UPDATE by anyone, no DELETE while the workflow exists, and
-- an INSERT only of what the versioning trigger writes (the workflow's current version
-- and content), so not even the maintenance role can forge a version.
CREATE FUNCTION app.workflow_versions_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    IF NEW.content_hash IS DISTINCT FROM
         app.workflow_content_hash(NEW.nodes, NEW.edges, NEW.settings)
       OR NOT EXISTS (SELECT 1 FROM workflows w
                      WHERE w.org_id = NEW.org_id AND w.id = NEW.workflow_id
                        AND w.current_version = NEW.version
                        AND w.content_hash = NEW.content_hash) THEN
      RAISE EXCEPTION 'workflow versions are recorded from their workflow only (change the workflow to make one)'
        USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
  END IF;
  IF TG_OP = 'UPDATE' THEN
    RAISE EXCEPTION 'workflow versions are immutable; restore an old version to make a new one'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF EXISTS (SELECT 1 FROM workflows w WHERE w.org_id = OLD.org_id AND w.id = OLD.workflow_id) THEN
    RAISE EXCEPTION 'workflow versions are deleted only with their workflow'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN OLD;
END $$;
REVOKE ALL ON FUNCTION app.workflow_versions_guard() FROM PUBLIC;
CREATE TRIGGER workflow_versions_guard BEFORE INSERT OR UPDATE OR DELETE ON workflow_versions
  FOR EACH ROW EXECUTE FUNCTION app.workflow_versions_guard();

-- Statistics -----------------------------------------------------------------------------------

-- The histogram index (1-based) of a duration in milliseconds; see workflow_stats.
CREATE FUNCTION app.workflow_duration_bucket(p_ms bigint) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT CASE WHEN p_ms IS NULL OR p_ms < 1 THEN 1
              ELSE least(110, 2 + floor(4 * log(2::numeric, p_ms::numeric))::integer) END
$$;

-- Quantile p_q (0..1, nearest rank) of a duration histogram, interpolated linearly inside
-- its bucket and clamped to [p_min, p_max]. NULL for an empty histogram.
CREATE FUNCTION app.workflow_stats_quantile(p_hist bigint[], p_q double precision,
                                            p_min bigint, p_max bigint)
RETURNS double precision
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_total numeric := 0;
  v_rank numeric;
  v_before numeric := 0;
  v_count numeric;
  v_lo double precision;
  v_hi double precision;
  v_est double precision;
BEGIN
  SELECT coalesce(sum(c), 0) INTO v_total FROM unnest(p_hist) c;
  IF v_total = 0 OR p_q IS NULL OR p_q < 0 OR p_q > 1 THEN
    RETURN NULL;
  END IF;
  v_rank := greatest(1, ceil(p_q::numeric * v_total));
  FOR i IN 1 .. cardinality(p_hist) LOOP
    v_count := p_hist[i];
    IF v_count > 0 AND v_before + v_count >= v_rank THEN
      v_lo := CASE WHEN i = 1 THEN 0 ELSE power(2::double precision, (i - 2) / 4.0::double precision) END;
      v_hi := CASE WHEN i = cardinality(p_hist) THEN greatest(v_lo, coalesce(p_max, v_lo))
                   ELSE power(2::double precision, (i - 1) / 4.0::double precision) END;
      v_est := v_lo + (v_hi - v_lo) * ((v_rank - v_before - 0.5) / v_count)::double precision;
      RETURN least(greatest(v_est, coalesce(p_min, v_est)), coalesce(p_max, v_est));
    END IF;
    v_before := v_before + v_count;
  END LOOP;
  RETURN p_max;
END $$;

CREATE FUNCTION app.workflow_stats_record(p_org uuid, p_workflow uuid, p_status text,
                                          p_duration_ms bigint)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_bucket integer := app.workflow_duration_bucket(p_duration_ms);
  v_timed integer := (p_duration_ms IS NOT NULL)::integer;
  v_ok integer := (p_status = 'succeeded')::integer;
  v_failed integer := (p_status IN ('failed', 'timed_out'))::integer;
  v_cancelled integer := (p_status = 'cancelled')::integer;
  v_hist bigint[] := array_fill(0::bigint, ARRAY[110]);
BEGIN
  IF p_status IS NULL OR p_status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN
    RAISE EXCEPTION 'workflow_stats_record: status must be succeeded, failed, cancelled or timed_out'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_duration_ms < 0 THEN
    RAISE EXCEPTION 'workflow_stats_record: duration must be >= 0 ms (or NULL)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_hist[v_bucket] := v_timed;
  INSERT INTO workflow_stats AS s
    (org_id, workflow_id, executions, successes, failures, cancellations, timed_executions,
     total_duration_ms, min_duration_ms, max_duration_ms, duration_histogram,
     last_execution_at)
  VALUES (p_org, p_workflow, 1, v_ok, v_failed, v_cancelled, v_timed,
          coalesce(p_duration_ms, 0), p_duration_ms, p_duration_ms, v_hist, now())
  ON CONFLICT (org_id, workflow_id) DO UPDATE SET
    executions = s.executions + 1,
    successes = s.successes + v_ok,
    failures = s.failures + v_failed,
    cancellations = s.cancellations + v_cancelled,
    timed_executions = s.timed_executions + v_timed,
    total_duration_ms = s.total_duration_ms + coalesce(p_duration_ms, 0),
    min_duration_ms = least(s.min_duration_ms, p_duration_ms),
    max_duration_ms = greatest(s.max_duration_ms, p_duration_ms),
    duration_histogram[v_bucket] = s.duration_histogram[v_bucket] + v_timed,
    last_execution_at = greatest(s.last_execution_at, now());
END $$;

-- Privileges -------------------------------------------------------------------------------------
GRANT SELECT (org_id, id, name, description, nodes, edges, settings, status, owner_id, team_id,
              tags, is_template, visibility, current_version, content_hash, created_at,
              updated_at, deleted_at, search),
      INSERT (org_id, id, name, description, nodes, edges, settings, status, owner_id, team_id,
              tags, is_template, visibility, current_version),
      UPDATE (name, description, nodes, edges, settings, status, owner_id, team_id, tags,
              is_template, visibility, deleted_at),
      DELETE
  ON workflows TO datalayer_app;
GRANT SELECT ON workflow_versions, workflow_public_templates TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, id, workflow_id, user_id, team_id, permission),
      UPDATE (permission),
      DELETE
  ON workflow_shares TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, workflow_id, executions, successes, failures, cancellations,
              timed_executions, total_duration_ms, min_duration_ms, max_duration_ms,
              duration_histogram, last_execution_at),
      UPDATE (executions, successes, failures, cancellations, timed_executions,
              total_duration_ms, min_duration_ms, max_duration_ms, duration_histogram,
              last_execution_at)
  ON workflow_stats TO datalayer_app;
-- History is written by the versioning trigger only, and never changed.
REVOKE UPDATE ON workflow_versions FROM datalayer_maint;

DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY[
    'app.my_team_ids()', 'app.workflow_graph_ok(jsonb, jsonb)', 'app.workflow_tags_ok(text[])',
    'app.workflow_tags_text(text[])', 'app.workflow_content_hash(jsonb, jsonb, jsonb)',
    'app.workflow_duration_bucket(bigint)',
    'app.workflow_stats_quantile(bigint[], double precision, bigint, bigint)',
    'app.workflow_stats_record(uuid, uuid, text, bigint)']
  LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO datalayer_app, datalayer_maint', f);
  END LOOP;
  FOREACH f IN ARRAY ARRAY['app.workflow_owned_by_me(uuid, uuid)',
                           'app.workflows_record_version()', 'app.workflows_publish()']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
  GRANT EXECUTE ON FUNCTION app.workflow_owned_by_me(uuid, uuid) TO datalayer_app, datalayer_maint;
END $$;
