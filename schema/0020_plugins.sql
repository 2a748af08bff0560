-- depends: 0019_search
-- Plugins: a catalog of versioned plugins, their dependencies, per-organization governance
-- (approval stages, policies, exemptions), vulnerability advisories, installations per
-- environment with a deployment history, and usage analytics.
--
-- Ownership and visibility. A plugin belongs to its publisher organization (org_id). Every
-- table here is a plain tenant table: RLS lets a session read and write only its own
-- organization's rows (writers: app.can_write(); status changes and governance: admins).
-- "Anyone reads public, approved plugins" is served by SECURITY DEFINER catalog functions
-- (app.plugin_search, app.plugin_get, app.plugin_graph, app.plugin_dependents,
-- app.plugin_policy_check, ...), each of which returns only rows that are public and listed
-- (visibility 'public', status approved or deprecated) or belong to the caller's own
-- organization, with that filter written explicitly in the function. Two reasons for
-- functions instead of a cross-tenant SELECT policy: (1) under RLS the text-search and
-- trigram operators (@@, %) are not leakproof, so a GIN index could not serve a search
-- that has to pass a policy first; inside the function (owner datalayer_maint, BYPASSRLS)
-- the partial GIN index over listed rows is an index qual; (2) a private plugin can never
-- reach another organization through a forgotten WHERE: the table policies stay tenant-only.
--
-- Versions follow SemVer 2.0. `vkey` (generated from `version` by app.semver_key) is a text
-- in the "C" collation whose byte order is SemVer precedence: zero-padded major, minor and
-- patch; then chr(3) for a release or chr(2) followed by the pre-release identifiers, each
-- numeric one as '0' || its length (3 digits) || digits and each alphanumeric one as
-- '1' || text, joined by chr(1) (below every identifier character, so a shorter identifier
-- list sorts first). Build metadata does not take part; two versions of one plugin may not
-- share a precedence (unique key), so the order is total. datalayer/semver.py computes the
-- same key and is tested against the SemVer precedence rules and against this function.
--
-- Lifecycle: draft -> in_review -> approved | rejected; approved <-> deprecated;
-- approved | deprecated -> yanked. A version that left draft is published and immutable
-- (only its status, along the transitions, and the maintenance job's quality score change;
-- no DELETE; its dependency rows are frozen with it). Moving a version out of in_review,
-- deprecating and yanking are for admins. Yanked versions are never resolved or installed.

-- Roles by rank, for approval stages ("at least admin").
CREATE FUNCTION app.role_rank(p_role text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE p_role WHEN 'owner' THEN 5 WHEN 'admin' THEN 4 WHEN 'member' THEN 3
                         WHEN 'viewer' THEN 2 WHEN 'guest' THEN 1 ELSE 0 END $$;
REVOKE ALL ON FUNCTION app.role_rank(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.role_rank(text) TO datalayer_app, datalayer_maint;

-- SemVer 2.0: the precedence key (see above); NULL when the text is not a valid version.
CREATE FUNCTION app.semver_key(p_version text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE STRICT SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  m text[];
  ids text[];
  id text;
  out text;
BEGIN
  m := regexp_match(p_version,
    '^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})'
    '(?:-((?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)'
    '(?:\.(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*))*))?'
    '(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$');
  IF m IS NULL THEN
    RETURN NULL;
  END IF;
  out := lpad(m[1], 9, '0') || '.' || lpad(m[2], 9, '0') || '.' || lpad(m[3], 9, '0');
  IF m[4] IS NULL THEN
    RETURN out || chr(3);
  END IF;
  ids := string_to_array(m[4], '.');
  out := out || chr(2);
  FOR i IN 1 .. cardinality(ids) LOOP
    id := ids[i];
    IF i > 1 THEN
      out := out || chr(1);
    END IF;
    IF id ~ '^[0-9]+$' THEN
      out := out || '0' || lpad(length(id)::text, 3, '0') || id;
    ELSE
      out := out || '1' || id;
    END IF;
  END LOOP;
  RETURN out;
END $$;
REVOKE ALL ON FUNCTION app.semver_key(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.semver_key(text) TO datalayer_app, datalayer_maint;

-- The weighted search document of a plugin: names (A), summary, tags and categories (B),
-- description (C). IMMUTABLE (array_to_string is only STABLE in general, but not for text[]).
CREATE FUNCTION app.plugin_search_vector(p_name text, p_display text, p_summary text,
                                         p_description text, p_tags text[],
                                         p_categories text[]) RETURNS tsvector
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT setweight(to_tsvector('simple'::regconfig, p_name || ' ' || p_display), 'A')
         || setweight(to_tsvector('english'::regconfig, p_summary), 'B')
         || setweight(to_tsvector('simple'::regconfig,
                                  array_to_string(p_tags || p_categories, ' ')), 'B')
         || setweight(to_tsvector('english'::regconfig, p_description), 'C')
$$;
REVOKE ALL ON FUNCTION app.plugin_search_vector(text, text, text, text, text[], text[])
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.plugin_search_vector(text, text, text, text, text[], text[])
  TO datalayer_app, datalayer_maint;

-- Catalog --------------------------------------------------------------------------------------

CREATE TABLE plugins (
  org_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id             uuid NOT NULL,
  name           text NOT NULL CONSTRAINT plugins_name_format
                 CHECK (name ~ '^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$'),
  display_name   text NOT NULL CONSTRAINT plugins_display_name_length
                 CHECK (length(display_name) BETWEEN 1 AND 200),
  summary        text NOT NULL DEFAULT '' CONSTRAINT plugins_summary_length
                 CHECK (length(summary) <= 500),
  description    text NOT NULL DEFAULT '' CONSTRAINT plugins_description_length
                 CHECK (length(description) <= 20000),
  tags           text[] NOT NULL DEFAULT '{}' CONSTRAINT plugins_tags_size
                 CHECK (cardinality(tags) <= 32),
  categories     text[] NOT NULL DEFAULT '{}' CONSTRAINT plugins_categories_size
                 CHECK (cardinality(categories) <= 8),
  compat         text[] NOT NULL DEFAULT '{}' CONSTRAINT plugins_compat_size
                 CHECK (cardinality(compat) <= 16),
  license        text NOT NULL DEFAULT 'proprietary' CONSTRAINT plugins_license_format
                 CHECK (license ~ '^[A-Za-z0-9.+-]{1,64}$'),
  visibility     text NOT NULL DEFAULT 'private' CONSTRAINT plugins_visibility_known
                 CHECK (visibility IN ('private', 'public')),
  status         text NOT NULL DEFAULT 'draft' CONSTRAINT plugins_status_known
                 CHECK (status IN ('draft', 'in_review', 'approved', 'rejected', 'deprecated')),
  sla_p95_ms     integer NOT NULL DEFAULT 1000 CONSTRAINT plugins_sla_p95_range
                 CHECK (sla_p95_ms BETWEEN 1 AND 3600000),
  sla_error_rate double precision NOT NULL DEFAULT 0.01 CONSTRAINT plugins_sla_error_range
                 CHECK (sla_error_rate BETWEEN 0 AND 1),
  quality_score  double precision,
  latest_version text,
  -- every plugin any of its versions depends on (kept by a trigger): the graph query's
  -- recursion walks plugins through this, one row per plugin, not per version
  dep_plugin_ids uuid[] NOT NULL DEFAULT '{}',
  search         tsvector GENERATED ALWAYS AS (
                   app.plugin_search_vector(name, display_name, summary, description, tags,
                                            categories)) STORED,
  created_by     uuid DEFAULT app.user_id(),
  created_at     timestamptz NOT NULL DEFAULT now(),
  updated_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT plugins_name_key UNIQUE (org_id, name)
);
-- Lookups by id from the catalog functions (ids are random; not unique: a unique key not
-- led by org_id would be a cross-tenant oracle).
CREATE INDEX plugins_id_idx ON plugins (id);
-- The public catalog: search and listing only ever read listed rows through these.
CREATE INDEX plugins_public_search_idx ON plugins USING gin (search)
  WHERE visibility = 'public' AND status = 'approved';
CREATE INDEX plugins_public_list_idx ON plugins (quality_score DESC NULLS LAST, id)
  WHERE visibility = 'public' AND status = 'approved';
-- Typo-tolerant fallback when pg_trgm can be installed (a trusted extension).
DO $$
BEGIN
  BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA public;
  EXCEPTION WHEN insufficient_privilege OR undefined_file THEN
    RAISE NOTICE 'pg_trgm is not available: plugin search is not typo-tolerant';
  END;
  IF EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_trgm') THEN
    EXECUTE 'CREATE INDEX plugins_public_trgm_idx ON plugins USING gin (name public.gin_trgm_ops)'
            ' WHERE visibility = ''public'' AND status = ''approved''';
  END IF;
END $$;

CREATE TABLE plugin_versions (
  org_id         uuid NOT NULL,
  id             uuid NOT NULL,
  plugin_id      uuid NOT NULL,
  version        text NOT NULL CONSTRAINT plugin_versions_semver
                 CHECK (length(version) <= 128 AND app.semver_key(version) IS NOT NULL),
  vkey           text COLLATE "C" NOT NULL GENERATED ALWAYS AS (app.semver_key(version)) STORED,
  prerelease     boolean NOT NULL GENERATED ALWAYS AS (version ~ '^[0-9.]+-') STORED,
  manifest       jsonb NOT NULL CONSTRAINT plugin_versions_manifest_shape
                 CHECK (jsonb_typeof(manifest) = 'object'
                        AND jsonb_typeof(manifest -> 'name') = 'string'
                        AND jsonb_typeof(manifest -> 'entry_point') = 'string'
                        AND jsonb_typeof(manifest -> 'permissions') = 'array'
                        AND jsonb_typeof(manifest -> 'config_schema') = 'object'
                        AND pg_column_size(manifest) <= 65536),
  changelog      text NOT NULL DEFAULT '' CONSTRAINT plugin_versions_changelog_length
                 CHECK (length(changelog) <= 20000),
  checksum       text NOT NULL CONSTRAINT plugin_versions_checksum_format
                 CHECK (checksum ~ '^sha256:[0-9a-f]{64}$'),
  size_bytes     bigint NOT NULL CONSTRAINT plugin_versions_size_range
                 CHECK (size_bytes BETWEEN 0 AND 1073741824),
  status         text NOT NULL DEFAULT 'draft' CONSTRAINT plugin_versions_status_known
                 CHECK (status IN ('draft', 'in_review', 'approved', 'rejected', 'deprecated',
                                   'yanked')),
  dep_plugin_ids uuid[] NOT NULL DEFAULT '{}',
  dep_ranges     text[] NOT NULL DEFAULT '{}',
  status_reason  text CONSTRAINT plugin_versions_reason_length
                 CHECK (length(status_reason) <= 2000),
  quality_score  double precision,
  published_at   timestamptz,
  created_by     uuid DEFAULT app.user_id(),
  created_at     timestamptz NOT NULL DEFAULT now(),
  updated_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT plugin_versions_precedence_key UNIQUE (org_id, plugin_id, vkey),
  CONSTRAINT plugin_versions_dependencies
    CHECK (cardinality(dep_plugin_ids) = cardinality(dep_ranges)
           AND cardinality(dep_plugin_ids) <= 100
           AND array_position(dep_plugin_ids, NULL) IS NULL),
  FOREIGN KEY (org_id, plugin_id) REFERENCES plugins (org_id, id) ON DELETE CASCADE
);
CREATE INDEX plugin_versions_id_idx ON plugin_versions (id);

-- Dependencies of a version on other plugins (of any publisher): the version row holds them
-- as parallel arrays (dep_plugin_ids, dep_ranges: what the resolver's graph query reads, no
-- join or aggregation), and this table is their reverse index ("who depends on X?"), written
-- only by the trigger that copies the arrays of a new version. `range` is the normalized
-- range text (datalayer/semver.py parses and normalizes; resolution runs in Python).
CREATE TABLE plugin_dependencies (
  org_id         uuid NOT NULL,
  version_id     uuid NOT NULL,
  dep_plugin_id  uuid NOT NULL,
  range          text NOT NULL CONSTRAINT plugin_dependencies_range_length
                 CHECK (length(range) BETWEEN 1 AND 200),
  PRIMARY KEY (org_id, version_id, dep_plugin_id),
  FOREIGN KEY (org_id, version_id) REFERENCES plugin_versions (org_id, id) ON DELETE CASCADE
);
-- Reverse dependencies ("what breaks if I yank this?").
CREATE INDEX plugin_dependencies_dep_idx ON plugin_dependencies (dep_plugin_id);

-- Governance -----------------------------------------------------------------------------------

-- Ordered approval stages of the consuming organization; a stage gates the environments it
-- lists. Decisions are recorded in plugin_approvals (one per version and stage).
CREATE TABLE plugin_approval_stages (
  org_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id             uuid NOT NULL DEFAULT gen_random_uuid(),
  position       integer NOT NULL CONSTRAINT plugin_approval_stages_position_range
                 CHECK (position BETWEEN 1 AND 100),
  name           text NOT NULL CONSTRAINT plugin_approval_stages_name_length
                 CHECK (length(name) BETWEEN 1 AND 100),
  required_role  text NOT NULL CONSTRAINT plugin_approval_stages_role_known
                 CHECK (required_role IN ('owner', 'admin', 'member')),
  environments   text[] NOT NULL DEFAULT '{development,staging,production}'
                 CONSTRAINT plugin_approval_stages_environments_known
                 CHECK (environments <@ '{development,staging,production}'::text[]),
  created_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT plugin_approval_stages_position_key UNIQUE (org_id, position)
);

CREATE TABLE plugin_approvals (
  org_id         uuid NOT NULL,
  id             uuid NOT NULL DEFAULT gen_random_uuid(),
  plugin_id      uuid NOT NULL,
  version_id     uuid NOT NULL,
  stage_id       uuid NOT NULL,
  decision       text NOT NULL CONSTRAINT plugin_approvals_decision_known
                 CHECK (decision IN ('approved', 'rejected')),
  reason         text CONSTRAINT plugin_approvals_reason_length CHECK (length(reason) <= 2000),
  decided_by     uuid DEFAULT app.user_id(),
  decided_role   text DEFAULT app.role(),
  decided_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT plugin_approvals_once UNIQUE (org_id, version_id, stage_id),
  CONSTRAINT plugin_approvals_rejection_reason
    CHECK (decision = 'approved' OR length(coalesce(reason, '')) > 0),
  FOREIGN KEY (org_id, stage_id) REFERENCES plugin_approval_stages (org_id, id)
    ON DELETE CASCADE
);

-- Policies evaluated at install time (app.plugin_policy_check). `config` holds the
-- policy's parameters: license_allowlist {"licenses": [...]}.
CREATE TABLE plugin_policies (
  org_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  policy         text NOT NULL CONSTRAINT plugin_policies_known
                 CHECK (policy IN ('no_critical_vulnerability', 'approved_publishers_only',
                                   'license_allowlist', 'production_approved_only')),
  enabled        boolean NOT NULL DEFAULT true,
  config         jsonb NOT NULL DEFAULT '{}' CONSTRAINT plugin_policies_config_object
                 CHECK (jsonb_typeof(config) = 'object'),
  updated_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, policy),
  CONSTRAINT plugin_policies_licenses
    CHECK (policy <> 'license_allowlist' OR jsonb_typeof(config -> 'licenses') = 'array')
);

CREATE TABLE plugin_approved_publishers (
  org_id            uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  publisher_org_id  uuid NOT NULL,
  added_by          uuid DEFAULT app.user_id(),
  added_at          timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, publisher_org_id)
);

-- An exemption lets one plugin pass one policy (or the approval workflow) until it expires;
-- expiry is compared to now() where it is used, so expired exemptions stop applying alone.
CREATE TABLE plugin_exemptions (
  org_id         uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id             uuid NOT NULL DEFAULT gen_random_uuid(),
  plugin_id      uuid NOT NULL,
  policy         text NOT NULL CONSTRAINT plugin_exemptions_policy_known
                 CHECK (policy IN ('no_critical_vulnerability', 'approved_publishers_only',
                                   'license_allowlist', 'production_approved_only',
                                   'approval_workflow')),
  justification  text NOT NULL CONSTRAINT plugin_exemptions_justification_length
                 CHECK (length(justification) BETWEEN 10 AND 2000),
  approved_by    uuid NOT NULL DEFAULT app.user_id(),
  expires_at     timestamptz NOT NULL,
  created_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT plugin_exemptions_expiry CHECK (expires_at > created_at)
);
CREATE INDEX plugin_exemptions_lookup_idx ON plugin_exemptions (org_id, plugin_id, policy,
                                                               expires_at);

-- Advisories, written by the plugin's publisher (or a platform feed from dl.system()):
-- affected versions are [introduced_key, fixed_key) in precedence order (NULL bounds open).
CREATE TABLE plugin_advisories (
  org_id          uuid NOT NULL,
  id              uuid NOT NULL DEFAULT gen_random_uuid(),
  plugin_id       uuid NOT NULL,
  identifier      text NOT NULL CONSTRAINT plugin_advisories_identifier_format
                  CHECK (identifier ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$'),
  severity        text NOT NULL CONSTRAINT plugin_advisories_severity_known
                  CHECK (severity IN ('low', 'medium', 'high', 'critical')),
  summary         text NOT NULL DEFAULT '' CONSTRAINT plugin_advisories_summary_length
                  CHECK (length(summary) <= 2000),
  affected        text NOT NULL CONSTRAINT plugin_advisories_affected_length
                  CHECK (length(affected) BETWEEN 1 AND 200),
  introduced      text CONSTRAINT plugin_advisories_introduced_semver
                  CHECK (introduced IS NULL OR app.semver_key(introduced) IS NOT NULL),
  introduced_key  text COLLATE "C" GENERATED ALWAYS AS (app.semver_key(introduced)) STORED,
  fixed_in        text CONSTRAINT plugin_advisories_fixed_semver
                  CHECK (fixed_in IS NULL OR app.semver_key(fixed_in) IS NOT NULL),
  fixed_key       text COLLATE "C" GENERATED ALWAYS AS (app.semver_key(fixed_in)) STORED,
  status          text NOT NULL DEFAULT 'open' CONSTRAINT plugin_advisories_status_known
                  CHECK (status IN ('open', 'withdrawn')),
  published_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT plugin_advisories_identifier_key UNIQUE (org_id, plugin_id, identifier),
  FOREIGN KEY (org_id, plugin_id) REFERENCES plugins (org_id, id) ON DELETE CASCADE
);
CREATE INDEX plugin_advisories_plugin_idx ON plugin_advisories (plugin_id) WHERE status = 'open';

-- Deployments ----------------------------------------------------------------------------------

-- Secrets of an installation: one Keyring blob (a JSON object) per change, bound to
-- (org, 'plugin_secrets', id, 'secret'); installations and deployment records point at
-- them, so a rollback restores the secrets it had without copying ciphertext.
CREATE TABLE plugin_secrets (
  org_id       uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id           uuid NOT NULL,
  plugin_id    uuid NOT NULL,
  environment  text NOT NULL CONSTRAINT plugin_secrets_environment_known
               CHECK (environment IN ('development', 'staging', 'production')),
  secret       bytea NOT NULL,
  created_by   uuid DEFAULT app.user_id(),
  created_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id)
);

CREATE TABLE plugin_installations (
  org_id            uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id                uuid NOT NULL DEFAULT gen_random_uuid(),
  plugin_id         uuid NOT NULL,
  publisher_org_id  uuid NOT NULL,
  environment       text NOT NULL CONSTRAINT plugin_installations_environment_known
                    CHECK (environment IN ('development', 'staging', 'production')),
  version_id        uuid NOT NULL,
  version           text NOT NULL,
  config            jsonb NOT NULL DEFAULT '{}' CONSTRAINT plugin_installations_config_object
                    CHECK (jsonb_typeof(config) = 'object' AND pg_column_size(config) <= 65536),
  secret_id         uuid,
  enabled           boolean NOT NULL DEFAULT true,
  last_action       text NOT NULL DEFAULT 'install'
                    CONSTRAINT plugin_installations_action_known
                    CHECK (last_action IN ('install', 'upgrade', 'configure', 'enable',
                                           'disable', 'rollback')),
  installed_by      uuid DEFAULT app.user_id(),
  installed_at      timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT plugin_installations_one_per_env UNIQUE (org_id, plugin_id, environment),
  FOREIGN KEY (org_id, secret_id) REFERENCES plugin_secrets (org_id, id)
);
CREATE INDEX plugin_installations_version_idx ON plugin_installations (plugin_id, version_id);

-- Every change of an installation, appended by a trigger (the run-time role cannot write it).
CREATE TABLE plugin_deployments (
  org_id       uuid NOT NULL,
  id           bigint GENERATED BY DEFAULT AS IDENTITY,
  plugin_id    uuid NOT NULL,
  environment  text NOT NULL,
  action       text NOT NULL CONSTRAINT plugin_deployments_action_known
               CHECK (action IN ('install', 'upgrade', 'configure', 'enable', 'disable',
                                 'rollback', 'uninstall')),
  version_id   uuid,
  version      text,
  config       jsonb,
  secret_id    uuid,
  enabled      boolean,
  deployed_by  uuid DEFAULT app.user_id(),
  deployed_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id) REFERENCES organizations (id) ON DELETE CASCADE
);
CREATE INDEX plugin_deployments_history_idx
  ON plugin_deployments (org_id, plugin_id, environment, id DESC);

-- Usage analytics ------------------------------------------------------------------------------

CREATE TABLE plugin_usage_events (
  org_id       uuid NOT NULL,
  id           bigint GENERATED ALWAYS AS IDENTITY,
  plugin_id    uuid NOT NULL,
  kind         text NOT NULL CONSTRAINT plugin_usage_events_kind_known
               CHECK (kind IN ('install', 'uninstall', 'invocation', 'error')),
  latency_ms   real CONSTRAINT plugin_usage_events_latency_range CHECK (latency_ms >= 0),
  occurred_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id)
);
ALTER TABLE plugin_usage_events SET (autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX plugin_usage_events_time_idx ON plugin_usage_events USING brin (occurred_at);

CREATE TABLE plugin_usage_daily (
  org_id       uuid NOT NULL,
  plugin_id    uuid NOT NULL,
  day          date NOT NULL,
  installs     bigint NOT NULL DEFAULT 0,
  uninstalls   bigint NOT NULL DEFAULT 0,
  invocations  bigint NOT NULL DEFAULT 0,
  errors       bigint NOT NULL DEFAULT 0,
  latency_n    bigint NOT NULL DEFAULT 0,
  p50_ms       double precision,
  p95_ms       double precision,
  refreshed_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, plugin_id, day)
);
-- Adoption and SLA across organizations, per plugin (publisher views via definer functions).
CREATE INDEX plugin_usage_daily_plugin_idx ON plugin_usage_daily (plugin_id, day);

-- Triggers -------------------------------------------------------------------------------------

CREATE TRIGGER plugins_touch BEFORE UPDATE ON plugins
  FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

-- Plugin status transitions; admins move it out of draft review.
CREATE FUNCTION app.plugins_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF NEW.status IS DISTINCT FROM OLD.status THEN
    IF NOT ((OLD.status, NEW.status) IN (('draft', 'in_review'), ('in_review', 'approved'),
                                          ('in_review', 'rejected'), ('rejected', 'draft'),
                                          ('approved', 'deprecated'), ('deprecated', 'approved'),
                                          ('in_review', 'draft'))) THEN
      RAISE EXCEPTION 'plugin status cannot change from % to %', OLD.status, NEW.status
        USING ERRCODE = 'P0001';
    END IF;
    IF NEW.status IN ('approved', 'rejected', 'deprecated') AND app.org_id() IS NOT NULL
       AND NOT app.is_admin() THEN
      RAISE EXCEPTION 'only owners and admins may approve, reject or deprecate a plugin'
        USING ERRCODE = '42501';
    END IF;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER plugins_guard BEFORE UPDATE ON plugins
  FOR EACH ROW EXECUTE FUNCTION app.plugins_guard();

-- Published versions are immutable; status moves along the lifecycle.
CREATE FUNCTION app.plugin_versions_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    IF NEW.status <> 'draft' THEN
      RAISE EXCEPTION 'a new version starts as a draft' USING ERRCODE = 'P0001';
    END IF;
    RETURN NEW;
  END IF;
  IF TG_OP = 'DELETE' THEN
    IF OLD.status <> 'draft' AND EXISTS (SELECT FROM plugins p
                                         WHERE p.org_id = OLD.org_id AND p.id = OLD.plugin_id) THEN
      RAISE EXCEPTION 'a published version cannot be deleted (yank it instead)'
        USING ERRCODE = 'P0001';
    END IF;
    RETURN OLD;
  END IF;
  IF OLD.status <> 'draft' AND (NEW.version, NEW.manifest, NEW.changelog, NEW.checksum,
                                NEW.size_bytes, NEW.plugin_id, NEW.dep_plugin_ids,
                                NEW.dep_ranges)
     IS DISTINCT FROM (OLD.version, OLD.manifest, OLD.changelog, OLD.checksum, OLD.size_bytes,
                       OLD.plugin_id, OLD.dep_plugin_ids, OLD.dep_ranges) THEN
    RAISE EXCEPTION 'version % is published and immutable (publish a new version)', OLD.version
      USING ERRCODE = 'P0001';
  END IF;
  IF NEW.status IS DISTINCT FROM OLD.status THEN
    IF NOT ((OLD.status, NEW.status) IN (('draft', 'in_review'), ('in_review', 'approved'),
                                          ('in_review', 'rejected'), ('approved', 'deprecated'),
                                          ('deprecated', 'approved'), ('approved', 'yanked'),
                                          ('deprecated', 'yanked'))) THEN
      RAISE EXCEPTION 'version status cannot change from % to %', OLD.status, NEW.status
        USING ERRCODE = 'P0001';
    END IF;
    IF NEW.status <> 'in_review' AND app.org_id() IS NOT NULL AND NOT app.is_admin() THEN
      RAISE EXCEPTION 'only owners and admins may approve, reject, deprecate or yank a version'
        USING ERRCODE = '42501';
    END IF;
    IF OLD.status = 'draft' THEN
      NEW.published_at := now();
    END IF;
  END IF;
  NEW.updated_at := now();
  RETURN NEW;
END $$;
CREATE TRIGGER plugin_versions_guard BEFORE INSERT OR UPDATE OR DELETE ON plugin_versions
  FOR EACH ROW EXECUTE FUNCTION app.plugin_versions_guard();

-- The plugin's latest approved release, kept on the plugin row.
CREATE FUNCTION app.plugin_versions_latest() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  UPDATE plugins p SET latest_version = (
    SELECT v.version FROM plugin_versions v
    WHERE v.org_id = NEW.org_id AND v.plugin_id = NEW.plugin_id AND v.status = 'approved'
      AND NOT v.prerelease
    ORDER BY v.vkey DESC LIMIT 1)
  WHERE p.org_id = NEW.org_id AND p.id = NEW.plugin_id;
  RETURN NULL;
END $$;
CREATE TRIGGER plugin_versions_latest AFTER UPDATE OF status ON plugin_versions
  FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status)
  EXECUTE FUNCTION app.plugin_versions_latest();

-- The reverse index of a new version's dependencies.
CREATE FUNCTION app.plugin_versions_dependencies() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  INSERT INTO plugin_dependencies (org_id, version_id, dep_plugin_id, range)
  SELECT NEW.org_id, NEW.id, d.p, d.r
  FROM unnest(NEW.dep_plugin_ids, NEW.dep_ranges) AS d(p, r);
  UPDATE plugins p
  SET dep_plugin_ids = ARRAY(SELECT DISTINCT u FROM unnest(p.dep_plugin_ids || NEW.dep_plugin_ids) u
                             ORDER BY u)
  WHERE p.org_id = NEW.org_id AND p.id = NEW.plugin_id
    AND NOT p.dep_plugin_ids @> NEW.dep_plugin_ids;
  RETURN NULL;
END $$;
CREATE TRIGGER plugin_versions_dependencies AFTER INSERT ON plugin_versions
  FOR EACH ROW WHEN (cardinality(NEW.dep_plugin_ids) > 0)
  EXECUTE FUNCTION app.plugin_versions_dependencies();

-- Dependencies are part of the version: written only while it is a draft.
CREATE FUNCTION app.plugin_dependencies_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  r record;
BEGIN
  r := CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
  IF EXISTS (SELECT FROM plugin_versions v WHERE v.org_id = r.org_id AND v.id = r.version_id
                                             AND v.status <> 'draft') THEN
    RAISE EXCEPTION 'the dependencies of a published version are immutable'
      USING ERRCODE = 'P0001';
  END IF;
  RETURN r;
END $$;
CREATE TRIGGER plugin_dependencies_guard BEFORE INSERT OR UPDATE OR DELETE
  ON plugin_dependencies FOR EACH ROW EXECUTE FUNCTION app.plugin_dependencies_guard();

-- Approval decisions: in stage order, by a role at least the stage's, never after a
-- rejection of the same version (a rejection ends the workflow).
CREATE FUNCTION app.plugin_approvals_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  st plugin_approval_stages;
BEGIN
  IF NEW.org_id IS DISTINCT FROM app.org_id() THEN
    RETURN NEW;  -- not the context's organization: row-level security refuses it
  END IF;
  SELECT * INTO st FROM plugin_approval_stages s
  WHERE s.org_id = NEW.org_id AND s.id = NEW.stage_id;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'approval stage not found' USING ERRCODE = 'P0001';
  END IF;
  IF app.role_rank(app.role()) < app.role_rank(st.required_role)
  THEN
    RAISE EXCEPTION 'stage "%" requires the % role', st.name, st.required_role
      USING ERRCODE = '42501';
  END IF;
  IF EXISTS (SELECT FROM plugin_approvals a
             WHERE a.org_id = NEW.org_id AND a.version_id = NEW.version_id
               AND a.decision = 'rejected') THEN
    RAISE EXCEPTION 'the approval workflow of this version ended with a rejection'
      USING ERRCODE = 'P0001';
  END IF;
  IF EXISTS (SELECT FROM plugin_approval_stages s
             WHERE s.org_id = NEW.org_id AND s.position < st.position
               AND NOT EXISTS (SELECT FROM plugin_approvals a
                               WHERE a.org_id = NEW.org_id AND a.version_id = NEW.version_id
                                 AND a.stage_id = s.id AND a.decision = 'approved')) THEN
    RAISE EXCEPTION 'stage "%" waits for the earlier stages to approve', st.name
      USING ERRCODE = 'P0001';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER plugin_approvals_guard BEFORE INSERT ON plugin_approvals
  FOR EACH ROW EXECUTE FUNCTION app.plugin_approvals_guard();

-- Catalog functions (SECURITY DEFINER: see the header) -----------------------------------------
-- The hot ones are PL/pgSQL wrapping one RETURN QUERY: PL/pgSQL caches the statement's plan
-- per session, where a non-inlinable SQL function (SECURITY DEFINER) is planned per call.

-- Is a plugin row readable by the caller: listed in the public catalog, or the caller's own.
-- Inlined by hand into every function below (an explicit filter on each statement).

-- One plugin by id, if the caller may see it.
CREATE FUNCTION app.plugin_get(p_plugin uuid)
RETURNS TABLE (org_id uuid, id uuid, name text, display_name text, summary text,
               description text, tags text[], categories text[], compat text[], license text,
               visibility text, status text, sla_p95_ms integer,
               sla_error_rate double precision, quality_score double precision,
               latest_version text, publisher text, created_at timestamptz,
               updated_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  SELECT p.org_id, p.id, p.name, p.display_name, p.summary, p.description, p.tags,
         p.categories, p.compat, p.license, p.visibility, p.status, p.sla_p95_ms,
         p.sla_error_rate, p.quality_score, p.latest_version, o.name, p.created_at,
         p.updated_at
  FROM plugins p JOIN organizations o ON o.id = p.org_id AND o.deleted_at IS NULL
  WHERE p.id = p_plugin AND app.org_id() IS NOT NULL
    AND ((p.visibility = 'public' AND p.status IN ('approved', 'deprecated'))
         OR p.org_id = app.org_id());
END
$$;

-- One version (with its manifest) by id, if the caller may see its plugin and, for another
-- publisher's plugin, the version is published (not draft, in review or rejected).
CREATE FUNCTION app.plugin_version_get(p_version uuid)
RETURNS TABLE (org_id uuid, id uuid, plugin_id uuid, version text, prerelease boolean,
               manifest jsonb, changelog text, checksum text, size_bytes bigint, status text,
               status_reason text, quality_score double precision,
               published_at timestamptz, created_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  SELECT v.org_id, v.id, v.plugin_id, v.version, v.prerelease, v.manifest, v.changelog,
         v.checksum, v.size_bytes, v.status, v.status_reason, v.quality_score,
         v.published_at, v.created_at
  FROM plugin_versions v JOIN plugins p ON p.org_id = v.org_id AND p.id = v.plugin_id
  WHERE v.id = p_version AND app.org_id() IS NOT NULL
    AND ((p.visibility = 'public' AND p.status IN ('approved', 'deprecated')
          AND v.status IN ('approved', 'deprecated', 'yanked'))
         OR p.org_id = app.org_id());
END
$$;

-- Catalog search: listed public plugins plus the caller's own (any status), ranked by a
-- weighted full-text match (names weigh most), filtered, keyset-paginated on (rank, id).
-- Without a text query: by quality score. When the text finds nothing and pg_trgm is
-- installed, names similar to the query (typos) are returned instead (p_fuzzy).
CREATE FUNCTION app.plugin_search(p_query text, p_category text, p_publisher uuid,
                                  p_compat text, p_min_quality double precision,
                                  p_after_rank real, p_after_id uuid, p_limit integer,
                                  p_fuzzy boolean)
RETURNS TABLE (org_id uuid, id uuid, name text, display_name text, summary text,
               tags text[], categories text[], compat text[], license text, visibility text,
               status text, quality_score double precision, latest_version text,
               publisher text, rank real)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  q tsquery;
  me uuid := app.org_id();
BEGIN
  IF me IS NULL THEN
    RETURN;
  END IF;
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100 THEN
    RAISE EXCEPTION 'limit must be between 1 and 100' USING ERRCODE = '22023';
  END IF;
  IF coalesce(p_query, '') = '' THEN
    RETURN QUERY
    SELECT p.org_id, p.id, p.name, p.display_name, p.summary, p.tags, p.categories,
           p.compat, p.license, p.visibility, p.status, p.quality_score, p.latest_version,
           o.name, coalesce(p.quality_score, 0)::real AS r
    FROM plugins p JOIN organizations o ON o.id = p.org_id
    WHERE ((p.visibility = 'public' AND p.status = 'approved') OR p.org_id = me)
      AND (p_category IS NULL OR p.categories @> ARRAY[p_category])
      AND (p_publisher IS NULL OR p.org_id = p_publisher)
      AND (p_compat IS NULL OR p.compat @> ARRAY[p_compat])
      AND (p_min_quality IS NULL OR p.quality_score >= p_min_quality)
      AND (p_after_id IS NULL OR coalesce(p.quality_score, 0)::real < p_after_rank
           OR (coalesce(p.quality_score, 0)::real = p_after_rank AND p.id > p_after_id))
    ORDER BY 15 DESC, p.id
    LIMIT p_limit;
    RETURN;
  END IF;
  q := websearch_to_tsquery('simple', p_query) || websearch_to_tsquery('english', p_query);
  IF NOT p_fuzzy THEN
    RETURN QUERY
    WITH hits AS (
      SELECT p.org_id, p.id, p.search, p.categories, p.compat, p.quality_score FROM plugins p
      WHERE p.visibility = 'public' AND p.status = 'approved' AND p.search @@ q
      UNION ALL
      SELECT p.org_id, p.id, p.search, p.categories, p.compat, p.quality_score FROM plugins p
      WHERE p.org_id = me AND p.search @@ q
        AND NOT (p.visibility = 'public' AND p.status = 'approved')
    ), ranked AS (
      SELECT h.org_id, h.id, ts_rank('{0.1, 0.2, 0.4, 1.0}', h.search, q, 1) AS r
      FROM hits h
      WHERE (p_category IS NULL OR h.categories @> ARRAY[p_category])
        AND (p_publisher IS NULL OR h.org_id = p_publisher)
        AND (p_compat IS NULL OR h.compat @> ARRAY[p_compat])
        AND (p_min_quality IS NULL OR h.quality_score >= p_min_quality)
    ), top AS (
      SELECT k.org_id, k.id, k.r FROM ranked k
      WHERE p_after_id IS NULL OR k.r < p_after_rank OR (k.r = p_after_rank AND k.id > p_after_id)
      ORDER BY k.r DESC, k.id
      LIMIT p_limit
    )
    SELECT p.org_id, p.id, p.name, p.display_name, p.summary, p.tags, p.categories, p.compat,
           p.license, p.visibility, p.status, p.quality_score, p.latest_version, o.name, t.r
    FROM top t JOIN plugins p ON p.org_id = t.org_id AND p.id = t.id
    JOIN organizations o ON o.id = t.org_id
    ORDER BY t.r DESC, t.id;
    RETURN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_trgm') THEN
    RETURN;
  END IF;
  RETURN QUERY
  WITH hits AS (
    SELECT p.*, similarity(p.name, lower(p_query))::real AS r FROM plugins p
    WHERE p.visibility = 'public' AND p.status = 'approved' AND p.name % lower(p_query)
    UNION ALL
    SELECT p.*, similarity(p.name, lower(p_query))::real FROM plugins p
    WHERE p.org_id = me AND p.name % lower(p_query)
      AND NOT (p.visibility = 'public' AND p.status = 'approved')
  )
  SELECT h.org_id, h.id, h.name, h.display_name, h.summary, h.tags, h.categories, h.compat,
         h.license, h.visibility, h.status, h.quality_score, h.latest_version, o.name, h.r
  FROM hits h JOIN organizations o ON o.id = h.org_id
  WHERE (p_category IS NULL OR h.categories @> ARRAY[p_category])
    AND (p_publisher IS NULL OR h.org_id = p_publisher)
    AND (p_compat IS NULL OR h.compat @> ARRAY[p_compat])
    AND (p_min_quality IS NULL OR h.quality_score >= p_min_quality)
    AND (p_after_id IS NULL OR h.r < p_after_rank OR (h.r = p_after_rank AND h.id > p_after_id))
  ORDER BY h.r DESC, h.id
  LIMIT p_limit;
END $$;

-- The dependency graph below some plugins, in one statement: every installable version
-- (approved or deprecated; for the caller's own plugins also approved-only rules apply) of
-- every plugin reachable through dependencies of such versions, with its dependencies.
-- The recursive CTE walks plugins (UNION: each once, so cycles terminate).
CREATE FUNCTION app.plugin_graph(p_roots uuid[])
RETURNS TABLE (plugin_id uuid, plugin_name text, org_id uuid, version_id uuid, version text,
               vkey text, prerelease boolean, dep_plugin_ids uuid[], dep_ranges text[])
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  WITH RECURSIVE reach (id) AS (
    SELECT DISTINCT r FROM unnest(p_roots) AS r
    UNION
    SELECT d.id
    FROM reach JOIN plugins p ON p.id = reach.id
    CROSS JOIN LATERAL unnest(p.dep_plugin_ids) AS d(id)
    WHERE (p.visibility = 'public' AND p.status IN ('approved', 'deprecated'))
          OR p.org_id = app.org_id()
  )
  -- LATERAL ... OFFSET 0: a nested loop over the (few) reached plugins by id; the planner
  -- cannot estimate the recursive CTE and would otherwise sort the whole catalog to merge.
  SELECT p.id, p.name, p.org_id, v.id, v.version, v.vkey::text, v.prerelease,
         v.dep_plugin_ids, v.dep_ranges
  FROM reach
  CROSS JOIN LATERAL (
    SELECT x.id, x.name, x.org_id FROM plugins x
    WHERE x.id = reach.id AND app.org_id() IS NOT NULL
      AND ((x.visibility = 'public' AND x.status IN ('approved', 'deprecated'))
           OR x.org_id = app.org_id())
    OFFSET 0) p
  JOIN plugin_versions v ON v.org_id = p.org_id AND v.plugin_id = p.id
                        AND v.status IN ('approved', 'deprecated')
  ORDER BY p.id, v.vkey DESC;
END
$$;

-- The same graph packed for the resolver (datalayer/repos/plugins.py `resolve`): one row per
-- reachable plugin, its installable versions (highest first) as one text, a line per
-- version: id, version, vkey, the dependency plugin ids (comma separated), then each
-- dependency range, tab separated (a vkey, a version and a normalized range never hold a
-- tab or a newline). 50 short rows instead of 1,000 rows with two arrays each: the client
-- decodes a fraction of it and parses only the versions the resolution looks at. The same
-- reach and visibility rules as app.plugin_graph (written out: reading through that
-- function would materialize its 1,000 rows once more). A LANGUAGE sql body: planned once
-- per call with the roots known (no plpgsql plan cache to flip to a generic plan); the
-- versions of a plugin come from one backward scan of the precedence key, already in order.
CREATE FUNCTION app.plugin_graph_packed(p_roots uuid[])
RETURNS TABLE (plugin_id uuid, plugin_name text, versions text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  WITH RECURSIVE reach (id) AS (
    SELECT DISTINCT r FROM unnest(p_roots) AS r
    UNION
    SELECT d.id
    FROM reach JOIN plugins p ON p.id = reach.id
    CROSS JOIN LATERAL unnest(p.dep_plugin_ids) AS d(id)
    WHERE (p.visibility = 'public' AND p.status IN ('approved', 'deprecated'))
          OR p.org_id = app.org_id()
  )
  SELECT p.id, p.name, vs.versions
  FROM reach
  CROSS JOIN LATERAL (
    SELECT x.id, x.name, x.org_id FROM plugins x
    WHERE x.id = reach.id AND app.org_id() IS NOT NULL
      AND ((x.visibility = 'public' AND x.status IN ('approved', 'deprecated'))
           OR x.org_id = app.org_id())
    OFFSET 0) p
  CROSS JOIN LATERAL (
    SELECT string_agg(v.line, E'\n') AS versions
    FROM (SELECT v.id::text || E'\t' || v.version || E'\t' || v.vkey || E'\t'
                 || array_to_string(v.dep_plugin_ids, ',')
                 || CASE WHEN cardinality(v.dep_ranges) > 0
                         THEN E'\t' || array_to_string(v.dep_ranges, E'\t') ELSE '' END
                 AS line
          FROM plugin_versions v
          WHERE v.org_id = p.org_id AND v.plugin_id = p.id
            AND v.status IN ('approved', 'deprecated')
          ORDER BY v.vkey DESC) v) vs
  WHERE vs.versions IS NOT NULL
  ORDER BY p.id
$$;


-- Reverse dependencies of a plugin: every visible published version that depends on it,
-- with its range (the caller decides which ranges admit a given version).
CREATE FUNCTION app.plugin_dependents(p_plugin uuid)
RETURNS TABLE (plugin_id uuid, plugin_name text, org_id uuid, version_id uuid, version text,
               status text, range text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  SELECT p.id, p.name, p.org_id, v.id, v.version, v.status, d.range
  FROM plugin_dependencies d
  JOIN plugin_versions v ON v.org_id = d.org_id AND v.id = d.version_id
  JOIN plugins p ON p.org_id = v.org_id AND p.id = v.plugin_id
  WHERE d.dep_plugin_id = p_plugin AND app.org_id() IS NOT NULL
    AND ((p.visibility = 'public' AND p.status IN ('approved', 'deprecated')
          AND v.status IN ('approved', 'deprecated'))
         OR p.org_id = app.org_id())
  ORDER BY p.name, v.vkey DESC;
END
$$;

-- Open advisories of a visible plugin.
CREATE FUNCTION app.plugin_advisories_of(p_plugin uuid)
RETURNS TABLE (id uuid, plugin_id uuid, identifier text, severity text, summary text,
               affected text, fixed_in text, status text, published_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT a.id, a.plugin_id, a.identifier, a.severity, a.summary, a.affected, a.fixed_in,
         a.status, a.published_at
  FROM plugin_advisories a JOIN plugins p ON p.org_id = a.org_id AND p.id = a.plugin_id
  WHERE a.plugin_id = p_plugin AND app.org_id() IS NOT NULL
    AND ((p.visibility = 'public' AND p.status IN ('approved', 'deprecated'))
         OR p.org_id = app.org_id())
  ORDER BY a.published_at DESC, a.id
$$;

-- The install-time policy check of the caller's organization: one row per violated policy
-- (not exempted by a live exemption) for installing p_version of p_plugin in p_env.
-- 'installable' (the version is not visible, not published or yanked) cannot be exempted.
CREATE FUNCTION app.plugin_policy_check(p_plugin uuid, p_version uuid, p_env text)
RETURNS TABLE (policy text, message text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
  RETURN QUERY
  WITH me AS (
    SELECT app.org_id() AS org
  ), v AS (
    SELECT v.org_id, v.id, v.plugin_id, v.vkey, v.status, p.license
    FROM plugin_versions v JOIN plugins p ON p.org_id = v.org_id AND p.id = v.plugin_id, me
    WHERE v.id = p_version AND v.plugin_id = p_plugin AND me.org IS NOT NULL
      AND v.status IN ('approved', 'deprecated')
      AND ((p.visibility = 'public' AND p.status IN ('approved', 'deprecated'))
           OR p.org_id = me.org)
  ), pol AS (
    SELECT x.policy, x.config FROM plugin_policies x, me
    WHERE x.org_id = me.org AND x.enabled
  ), found (policy, message) AS (
    SELECT 'installable', 'the version is not available for installation (unknown, '
                          'unpublished or yanked)'
    WHERE NOT EXISTS (SELECT FROM v)
    UNION ALL
    SELECT 'no_critical_vulnerability',
           'the version is affected by an open critical advisory (' || a.identifier || ')'
    FROM v, pol,
    LATERAL (SELECT a.identifier FROM plugin_advisories a
             WHERE a.org_id = v.org_id AND a.plugin_id = v.plugin_id AND a.status = 'open'
               AND a.severity = 'critical'
               AND (a.introduced_key IS NULL OR v.vkey >= a.introduced_key)
               AND (a.fixed_key IS NULL OR v.vkey < a.fixed_key)
             ORDER BY a.identifier LIMIT 1) a
    WHERE pol.policy = 'no_critical_vulnerability'
    UNION ALL
    SELECT 'approved_publishers_only', 'the publisher is not on the approved publishers list'
    FROM v, pol, me
    WHERE pol.policy = 'approved_publishers_only' AND v.org_id <> me.org
      AND NOT EXISTS (SELECT FROM plugin_approved_publishers ap
                      WHERE ap.org_id = me.org AND ap.publisher_org_id = v.org_id)
    UNION ALL
    SELECT 'license_allowlist', 'the license ' || v.license || ' is not on the allow-list'
    FROM v, pol
    WHERE pol.policy = 'license_allowlist'
      AND NOT coalesce(pol.config -> 'licenses', '[]') ? v.license
    UNION ALL
    SELECT 'production_approved_only',
           'production installs need a version approved by the publisher and by every '
           'approval stage'
    FROM v, pol, me
    WHERE pol.policy = 'production_approved_only' AND p_env = 'production'
      AND (v.status <> 'approved'
           OR EXISTS (SELECT FROM plugin_approval_stages s
                      WHERE s.org_id = me.org
                        AND NOT EXISTS (SELECT FROM plugin_approvals a
                                        WHERE a.org_id = me.org AND a.version_id = v.id
                                          AND a.stage_id = s.id
                                          AND a.decision = 'approved')))
    UNION ALL
    SELECT 'approval_workflow', 'approval stage "' || s.name || '" has not approved this '
                                'version for ' || p_env
    FROM v, me,
    LATERAL (SELECT s.name FROM plugin_approval_stages s
             WHERE s.org_id = me.org AND p_env = ANY (s.environments)
               AND NOT EXISTS (SELECT FROM plugin_approvals a
                               WHERE a.org_id = me.org AND a.version_id = v.id
                                 AND a.stage_id = s.id AND a.decision = 'approved')
             ORDER BY s.position LIMIT 1) s
  )
  SELECT f.policy, f.message FROM found f, me
  WHERE f.policy = 'installable'
     OR NOT EXISTS (SELECT FROM plugin_exemptions e
                    WHERE e.org_id = me.org AND e.plugin_id = p_plugin
                      AND e.policy = f.policy AND e.expires_at > now());
END
$$;

-- The caller's installations affected by an open advisory (the alert query).
CREATE FUNCTION app.plugin_vulnerability_alerts()
RETURNS TABLE (installation_id uuid, plugin_id uuid, environment text, version text,
               advisory_id uuid, identifier text, severity text, fixed_in text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT i.id, i.plugin_id, i.environment, i.version, a.id, a.identifier, a.severity,
         a.fixed_in
  FROM plugin_installations i
  JOIN plugin_versions v ON v.org_id = i.publisher_org_id AND v.id = i.version_id
  JOIN plugin_advisories a ON a.org_id = v.org_id AND a.plugin_id = v.plugin_id
                          AND a.status = 'open'
                          AND (a.introduced_key IS NULL OR v.vkey >= a.introduced_key)
                          AND (a.fixed_key IS NULL OR v.vkey < a.fixed_key)
  WHERE i.org_id = app.org_id()
  ORDER BY CASE a.severity WHEN 'critical' THEN 0 WHEN 'high' THEN 1 WHEN 'medium' THEN 2
                           ELSE 3 END, i.environment, i.id
$$;

-- Installations: the version must pass the policy check when it changes (first violation
-- raised, naming the policy), and its publisher and version text come from the catalog.
CREATE FUNCTION app.plugin_installations_check() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  bad record;
  ver record;
BEGIN
  IF NEW.org_id IS DISTINCT FROM app.org_id() THEN
    RETURN NEW;  -- not the context's organization: row-level security refuses it
  END IF;
  IF TG_OP = 'INSERT' OR NEW.version_id IS DISTINCT FROM OLD.version_id
     OR NEW.environment IS DISTINCT FROM OLD.environment THEN
    SELECT c.policy, c.message INTO bad
    FROM app.plugin_policy_check(NEW.plugin_id, NEW.version_id, NEW.environment) c LIMIT 1;
    IF FOUND THEN
      RAISE EXCEPTION 'plugin policy % refused the install: %', bad.policy, bad.message
        USING ERRCODE = 'P0001';
    END IF;
    SELECT v.org_id, v.version INTO ver FROM plugin_versions v WHERE v.id = NEW.version_id
      AND v.plugin_id = NEW.plugin_id;
    NEW.publisher_org_id := ver.org_id;
    NEW.version := ver.version;
  END IF;
  NEW.updated_at := now();
  RETURN NEW;
END $$;
CREATE TRIGGER plugin_installations_check BEFORE INSERT OR UPDATE ON plugin_installations
  FOR EACH ROW EXECUTE FUNCTION app.plugin_installations_check();

CREATE FUNCTION app.plugin_installations_record() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO plugin_deployments (org_id, plugin_id, environment, action)
    VALUES (OLD.org_id, OLD.plugin_id, OLD.environment, 'uninstall');
    RETURN NULL;
  END IF;
  INSERT INTO plugin_deployments (org_id, plugin_id, environment, action, version_id, version,
                                  config, secret_id, enabled)
  VALUES (NEW.org_id, NEW.plugin_id, NEW.environment, NEW.last_action, NEW.version_id,
          NEW.version, NEW.config, NEW.secret_id, NEW.enabled);
  RETURN NULL;
END $$;
CREATE TRIGGER plugin_installations_record AFTER INSERT OR UPDATE OR DELETE
  ON plugin_installations FOR EACH ROW EXECUTE FUNCTION app.plugin_installations_record();

-- Usage analytics read by the publisher of a plugin, across its adopters (aggregates only).
CREATE FUNCTION app.plugin_adoption(p_plugin uuid, p_days integer)
RETURNS TABLE (day date, active_orgs bigint, invocations bigint, errors bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT u.day, count(DISTINCT u.org_id) FILTER (WHERE u.invocations + u.errors > 0),
         sum(u.invocations)::bigint, sum(u.errors)::bigint
  FROM plugin_usage_daily u
  WHERE u.plugin_id = p_plugin AND u.day > current_date - p_days
    AND EXISTS (SELECT FROM plugins p WHERE p.org_id = app.org_id() AND p.id = p_plugin)
  GROUP BY u.day
  ORDER BY u.day
$$;

CREATE FUNCTION app.plugin_sla(p_plugin uuid, p_days integer)
RETURNS TABLE (plugin_id uuid, invocations bigint, errors bigint, error_rate double precision,
               p95_ms double precision, sla_p95_ms integer, sla_error_rate double precision,
               compliant boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  WITH u AS (
    SELECT sum(u.invocations)::bigint AS inv, sum(u.errors)::bigint AS err,
           -- p95 across days: the latency-count-weighted mean of daily p95s (an estimate)
           sum(u.p95_ms * u.latency_n) / nullif(sum(u.latency_n) FILTER
                                                 (WHERE u.p95_ms IS NOT NULL), 0) AS p95
    FROM plugin_usage_daily u
    WHERE u.plugin_id = p_plugin AND u.day > current_date - p_days
  )
  SELECT p.id, coalesce(u.inv, 0), coalesce(u.err, 0),
         coalesce(u.err::double precision / nullif(u.inv + u.err, 0), 0), u.p95,
         p.sla_p95_ms, p.sla_error_rate,
         coalesce(u.p95, 0) <= p.sla_p95_ms
           AND coalesce(u.err::double precision / nullif(u.inv + u.err, 0), 0)
               <= p.sla_error_rate
  FROM plugins p, u
  WHERE p.org_id = app.org_id() AND p.id = p_plugin
$$;

DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY[
    'app.plugins_guard()', 'app.plugin_versions_guard()', 'app.plugin_versions_latest()',
    'app.plugin_dependencies_guard()', 'app.plugin_approvals_guard()',
    'app.plugin_versions_dependencies()',
    'app.plugin_get(uuid)', 'app.plugin_version_get(uuid)',
    'app.plugin_search(text, text, uuid, text, double precision, real, uuid, integer, boolean)',
    'app.plugin_graph(uuid[])', 'app.plugin_graph_packed(uuid[])',
    'app.plugin_dependents(uuid)', 'app.plugin_advisories_of(uuid)',
    'app.plugin_policy_check(uuid, uuid, text)', 'app.plugin_vulnerability_alerts()',
    'app.plugin_installations_check()', 'app.plugin_installations_record()',
    'app.plugin_adoption(uuid, integer)', 'app.plugin_sla(uuid, integer)']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO datalayer_app, datalayer_maint', f);
  END LOOP;
END $$;

-- Row-level security: tenant-only on every table (see the header).
DO $$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['plugins', 'plugin_versions', 'plugin_dependencies',
                           'plugin_approval_stages', 'plugin_approvals', 'plugin_policies',
                           'plugin_approved_publishers', 'plugin_exemptions',
                           'plugin_advisories', 'plugin_secrets', 'plugin_installations',
                           'plugin_deployments', 'plugin_usage_events', 'plugin_usage_daily']
  LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY %I ON %I FOR SELECT USING (org_id = (SELECT app.org_id()))',
                   t || '_select', t);
  END LOOP;
  -- Publisher content and usage: any writer of the organization.
  FOREACH t IN ARRAY ARRAY['plugins', 'plugin_versions', 'plugin_dependencies',
                           'plugin_advisories', 'plugin_secrets', 'plugin_installations',
                           'plugin_usage_events']
  LOOP
    EXECUTE format('CREATE POLICY %I ON %I FOR INSERT WITH CHECK '
                   '(org_id = (SELECT app.org_id()) AND (SELECT app.can_write()))',
                   t || '_insert', t);
    EXECUTE format('CREATE POLICY %I ON %I FOR UPDATE USING '
                   '(org_id = (SELECT app.org_id()) AND (SELECT app.can_write())) '
                   'WITH CHECK (org_id = (SELECT app.org_id()))', t || '_update', t);
    EXECUTE format('CREATE POLICY %I ON %I FOR DELETE USING '
                   '(org_id = (SELECT app.org_id()) AND (SELECT app.can_write()))',
                   t || '_delete', t);
  END LOOP;
  -- Governance configuration: owners and admins.
  FOREACH t IN ARRAY ARRAY['plugin_approval_stages', 'plugin_policies',
                           'plugin_approved_publishers', 'plugin_exemptions']
  LOOP
    EXECUTE format('CREATE POLICY %I ON %I FOR INSERT WITH CHECK '
                   '(org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()))',
                   t || '_insert', t);
    EXECUTE format('CREATE POLICY %I ON %I FOR UPDATE USING '
                   '(org_id = (SELECT app.org_id()) AND (SELECT app.is_admin())) '
                   'WITH CHECK (org_id = (SELECT app.org_id()))', t || '_update', t);
    EXECUTE format('CREATE POLICY %I ON %I FOR DELETE USING '
                   '(org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()))',
                   t || '_delete', t);
  END LOOP;
END $$;
-- Approval decisions: any writer may try; the trigger checks the stage's role.
CREATE POLICY plugin_approvals_insert ON plugin_approvals FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));

-- Privileges: identity columns are set once; history tables are append-only by triggers;
-- the usage roll-up and the quality score are written by dl.system() only.
GRANT SELECT,
      INSERT (org_id, id, name, display_name, summary, description, tags, categories, compat,
              license, visibility, sla_p95_ms, sla_error_rate),
      UPDATE (display_name, summary, description, tags, categories, compat, license,
              visibility, status, sla_p95_ms, sla_error_rate),
      DELETE
  ON plugins TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, id, plugin_id, version, manifest, changelog, checksum, size_bytes,
              dep_plugin_ids, dep_ranges),
      UPDATE (manifest, changelog, checksum, size_bytes, status, status_reason),
      DELETE
  ON plugin_versions TO datalayer_app;
GRANT SELECT ON plugin_dependencies TO datalayer_app;
GRANT SELECT, INSERT (org_id, id, position, name, required_role, environments),
      UPDATE (name, required_role, environments), DELETE
  ON plugin_approval_stages TO datalayer_app;
GRANT SELECT, INSERT (org_id, plugin_id, version_id, stage_id, decision, reason)
  ON plugin_approvals TO datalayer_app;
GRANT SELECT, INSERT (org_id, policy, enabled, config), UPDATE (enabled, config, updated_at),
      DELETE
  ON plugin_policies TO datalayer_app;
GRANT SELECT, INSERT (org_id, publisher_org_id), DELETE
  ON plugin_approved_publishers TO datalayer_app;
GRANT SELECT, INSERT (org_id, plugin_id, policy, justification, expires_at), DELETE
  ON plugin_exemptions TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, plugin_id, identifier, severity, summary, affected, introduced,
              fixed_in),
      UPDATE (severity, summary, status)
  ON plugin_advisories TO datalayer_app;
GRANT SELECT, INSERT (org_id, id, plugin_id, environment, secret) ON plugin_secrets
  TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, plugin_id, environment, version_id, version, publisher_org_id, config,
              secret_id, enabled, last_action),
      UPDATE (version_id, version, publisher_org_id, config, secret_id, enabled, last_action,
              updated_at),
      DELETE
  ON plugin_installations TO datalayer_app;
GRANT SELECT ON plugin_deployments TO datalayer_app;
GRANT SELECT, INSERT (org_id, plugin_id, kind, latency_ms, occurred_at)
  ON plugin_usage_events TO datalayer_app;
GRANT SELECT ON plugin_usage_daily TO datalayer_app;

-- Key rotation: the installation secrets (app.encrypted_columns: schema/0012_credentials).
INSERT INTO app.encrypted_columns (table_name, column_name, org_column, id_column)
VALUES ('plugin_secrets', 'secret', 'org_id', 'id');
