-- depends: 0014_notifications
-- Audit trail: explicit audit events, row-change capture, per-organization hash chains,
-- retention by compliance framework, subject redaction.
--
-- Tables (both partitioned by month on `at`, owned by datalayer_maint so that
-- app.ensure_partitions manages them, RLS enabled and forced on every partition):
--   audit_events  explicit events (login, lockout, role change, API key, credential decrypt,
--                 key rotation, ...), risk level and compliance frameworks from ONE rules
--                 table (app.audit_rules, read by app.audit_classify / app.audit_risk).
--   data_changes  one row per mutated row of every captured table, written by a row-level
--                 trigger generated per table (app.audit_capture__<table>). A table opts in with one
--                 line in a migration: CALL app.audit_capture('table_name');
--
-- Append-only: datalayer_app may INSERT audit events (its own organization, context columns
-- filled by the trigger) and SELECT both tables through RLS (roles allowed to read 'audit');
-- nothing else. A row trigger refuses UPDATE and DELETE for everyone unless the transaction
-- runs a sanctioned maintenance path: app.audit_redact_subject (erasure), the retention
-- functions and app.ensure_partitions (moving rows out of a default partition). Those are
-- SECURITY DEFINER functions owned by datalayer_maint that set app.audit_bypass
-- transaction-locally; the guard honours the flag only when current_user is datalayer_maint
-- (the run-time role can set the setting, but never runs as the maintenance role). The
-- maintenance role owns the tables and could disable the trigger anyway: the hash chain is
-- what makes its tampering visible.
--
-- Hash chain (per organization, one chain per table: 'events' and 'changes'):
--   seq        1, 2, 3, ... without gaps, per (org, chain), assigned under the chain-head row
--              lock (app.audit_heads, INSERT .. ON CONFLICT DO UPDATE .. RETURNING).
--   row_hash = sha256(prev_hash || utf8(canonical) || pii_commit)
--   canonical  ROW(<non-personal columns>)::text: PostgreSQL's composite text form (quoted and
--              escaped, so unambiguous), timestamps as UTC epoch microseconds (time-zone
--              independent), uuids in canonical form, jsonb in its canonical text (keys
--              sorted, no duplicates), arrays in array text form: app.audit_event_hash /
--              app.audit_change_hash. (About 7x cheaper than a jsonb array of the same values.)
--   pii_commit = sha256(pii_salt || utf8(ROW(host(ip), user_agent, personal)::text))
--              a commitment to the personal fields with a random per-row salt (16 bytes).
--   prev_hash  the previous row's row_hash; 32 zero bytes for seq 1 (or, after retention,
--              the checkpoint in app.audit_heads.floor_prev at floor_seq).
-- Personal data lives only in ip, user_agent and `personal` (for data_changes: the personal
-- columns of before/after, listed in app.personal_columns, split out of before/after at
-- capture). Redaction (app.audit_redact_subject) nulls those and the salt and sets
-- redacted_at, keeping pii_commit: the chain still verifies, the salted commitment no longer
-- links to anything, and a redacted row can only have lost personal fields (a verifier
-- requires them NULL), never gained forged ones.
--
-- Cost of the chain: one row lock on the (org, chain) head per transaction that writes audit
-- rows, held until COMMIT (a gap-free chain cannot release it earlier: an aborted
-- transaction would leave a hole). Writers of one organization that touch captured tables
-- therefore serialize from their first captured write to their commit; other organizations
-- never wait. The execution hot path (claim, heartbeat, complete) is deliberately not
-- captured: only user-initiated control (cancel, manual retry) writes audit events.
--
-- Global chain: rows without an organization (users changed outside a tenant context, login
-- attempts of non-members, key rotation) go to org_id 00000000-0000-0000-0000-000000000000,
-- which no tenant context can read (maintenance only).
--
-- Secret columns are never copied into data_changes: app.secret_columns (plus every row of
-- app.encrypted_columns, automatically) is the ONE registry; a changed secret column is
-- listed in changed_columns without its values.

-- Registries -------------------------------------------------------------------------------
CREATE TABLE app.secret_columns (
  table_name   text NOT NULL,
  column_name  text NOT NULL,
  PRIMARY KEY (table_name, column_name)
);
INSERT INTO app.secret_columns (table_name, column_name) VALUES
  ('users', 'password_hash'), ('users', 'totp_secret'), ('users', 'recovery_codes'),
  ('api_keys', 'key_hash'), ('auth_tokens', 'token_hash'),
  ('webhooks', 'path_token_hash'), ('webhooks', 'secret'), ('credentials', 'secret'),
  ('web_sessions', 'id_hash'), ('web_sessions', 'data'), ('cache_leases', 'token');

-- Columns holding personal data (GDPR): split out of before/after into `personal`.
-- table_name '*' applies to every table.
CREATE TABLE app.personal_columns (
  table_name   text NOT NULL,
  column_name  text NOT NULL,
  PRIMARY KEY (table_name, column_name)
);
INSERT INTO app.personal_columns (table_name, column_name) VALUES
  ('users', 'email'), ('users', 'email_normalized'), ('users', 'display_name'),
  ('users', 'first_name'), ('users', 'last_name'), ('users', 'preferences'),
  ('auth_tokens', 'email'), ('*', 'ip'), ('*', 'source_ip'), ('*', 'user_agent'),
  ('*', 'email');

-- Columns not copied into change rows because they are recorded elsewhere (not secret):
-- a workflow version's content is immutable, identified by its content_hash, and the
-- workflows change row that made the version carries the before/after of nodes, edges and
-- settings already. Generated columns (derived data: search vectors, normalized emails) are
-- never copied either. Like secret columns, they still appear in changed_columns.
CREATE TABLE app.audit_omit_columns (
  table_name   text NOT NULL,
  column_name  text NOT NULL,
  PRIMARY KEY (table_name, column_name)
);
INSERT INTO app.audit_omit_columns (table_name, column_name) VALUES
  ('workflow_versions', 'nodes'), ('workflow_versions', 'edges'),
  ('workflow_versions', 'settings');

-- Tables under change capture (app.audit_capture fills it).
CREATE TABLE app.audit_tables (
  table_name   text PRIMARY KEY,
  pk_columns   text[] NOT NULL,
  org_column   text
);

-- Risk and frameworks: the ONE place. The highest-priority matching rule wins.
CREATE TABLE app.audit_rules (
  action_pattern  text NOT NULL,            -- LIKE pattern on the action
  result          text,                     -- NULL: any result
  priority        integer NOT NULL,
  risk            text NOT NULL CONSTRAINT audit_rules_risk_known
                  CHECK (risk IN ('low', 'medium', 'high', 'critical')),
  frameworks      text[] NOT NULL DEFAULT '{}'
                  CONSTRAINT audit_rules_frameworks_known
                  CHECK (frameworks <@ ARRAY['GDPR', 'SOX', 'HIPAA']),
  PRIMARY KEY (action_pattern, priority, risk)
);
INSERT INTO app.audit_rules (action_pattern, result, priority, risk, frameworks) VALUES
  ('%',                        NULL,      0,  'low',      '{}'),
  ('%',                        'failure', 1,  'medium',   '{}'),
  ('%',                        'denied',  2,  'medium',   '{}'),
  ('auth.login',               NULL,      10, 'low',      '{SOX,GDPR}'),
  ('auth.login',               'failure', 11, 'medium',   '{SOX,GDPR}'),
  ('auth.lockout',             NULL,      10, 'high',     '{SOX,GDPR}'),
  ('membership.%',             NULL,      10, 'high',     '{SOX}'),
  ('membership.role_changed',  NULL,      11, 'high',     '{SOX}'),
  ('team.%',                   NULL,      10, 'medium',   '{SOX}'),
  ('api_key.created',          NULL,      10, 'medium',   '{SOX}'),
  ('api_key.revoked',          NULL,      10, 'medium',   '{SOX}'),
  ('api_key.used',             NULL,      10, 'low',      '{SOX}'),
  ('credential.decrypt',       NULL,      10, 'high',     '{SOX,HIPAA}'),
  ('security.key_rotated',     NULL,      10, 'critical', '{SOX,HIPAA}'),
  ('data.export',              NULL,      10, 'high',     '{GDPR,HIPAA}'),
  ('gdpr.%',                   NULL,      10, 'high',     '{GDPR}'),
  ('execution.%',              NULL,      10, 'low',      '{SOX}'),
  ('change.%',                 NULL,      5,  'low',      '{SOX}'),
  ('change.users',             NULL,      10, 'medium',   '{GDPR,SOX}'),
  ('change.memberships',       NULL,      10, 'high',     '{SOX}'),
  ('change.team_members',      NULL,      10, 'medium',   '{SOX}'),
  ('change.api_keys',          NULL,      10, 'medium',   '{SOX}'),
  ('change.credentials',       NULL,      10, 'high',     '{SOX,HIPAA}'),
  ('change.auth_tokens',       NULL,      10, 'medium',   '{GDPR,SOX}');

CREATE FUNCTION app.audit_classify(p_action text, p_result text,
                                   OUT risk text, OUT frameworks text[])
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
  SELECT r.risk, r.frameworks FROM app.audit_rules r
  WHERE p_action LIKE r.action_pattern AND (r.result IS NULL OR r.result = p_result)
  ORDER BY r.priority DESC, r.risk DESC LIMIT 1
$$;
CREATE FUNCTION app.audit_risk(p_action text, p_result text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
  SELECT (app.audit_classify(p_action, p_result)).risk
$$;

-- Chain heads and retention checkpoints --------------------------------------------------------
CREATE TABLE app.audit_heads (
  org_id      uuid NOT NULL,
  chain       text NOT NULL CONSTRAINT audit_heads_chain_known CHECK (chain IN ('events', 'changes')),
  seq         bigint NOT NULL DEFAULT 0,        -- last assigned
  head        bytea NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000',
  floor_seq   bigint NOT NULL DEFAULT 1,        -- first retained seq (retention checkpoint)
  floor_prev  bytea NOT NULL DEFAULT '\x0000000000000000000000000000000000000000000000000000000000000000',
  PRIMARY KEY (org_id, chain)
);
ALTER TABLE app.audit_heads SET (fillfactor = 50);
-- Reached only by the SECURITY DEFINER chain functions (owner: the maintenance role).
ALTER TABLE app.audit_heads ENABLE ROW LEVEL SECURITY;
ALTER TABLE app.audit_heads FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_heads_none ON app.audit_heads USING (false);

-- Canonical encodings and hashes (used by the triggers and by verification) ---------------------
-- Deterministic, but declared STABLE like the functions they call (record output,
-- convert_to, extract): that lets the planner inline them, which keeps a hash to a few
-- microseconds inside the triggers and the verification queries.
CREATE FUNCTION app.epoch_us(p timestamptz) RETURNS bigint
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT (extract(epoch FROM p) * 1000000)::bigint $$;

CREATE FUNCTION app.audit_commit(p_salt bytea, p_ip inet, p_user_agent text, p_personal jsonb)
RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT sha256(coalesce(p_salt, '\x'::bytea)
                    || convert_to(ROW(host(p_ip), p_user_agent, p_personal)::text, 'UTF8')) $$;

CREATE FUNCTION app.audit_event_hash(p_prev bytea, p_org uuid, p_seq bigint, p_id uuid,
                                     p_at timestamptz, p_action text, p_result text,
                                     p_risk text, p_frameworks text[], p_actor uuid,
                                     p_subject uuid, p_resource_type text, p_resource_id text,
                                     p_request_id text, p_details jsonb, p_commit bytea)
RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT sha256(p_prev || convert_to(ROW(
                      p_org, p_seq, p_id, app.epoch_us(p_at), p_action, p_result, p_risk,
                      p_frameworks, p_actor, p_subject, p_resource_type, p_resource_id,
                      p_request_id, p_details)::text, 'UTF8') || p_commit) $$;

CREATE FUNCTION app.audit_change_hash(p_prev bytea, p_org uuid, p_seq bigint, p_id uuid,
                                      p_at timestamptz, p_table text, p_row_pk jsonb, p_op text,
                                      p_actor uuid, p_request_id text, p_changed text[],
                                      p_frameworks text[], p_before jsonb, p_after jsonb,
                                      p_commit bytea)
RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT sha256(p_prev || convert_to(ROW(
                      p_org, p_seq, p_id, app.epoch_us(p_at), p_table, p_row_pk, p_op, p_actor,
                      p_request_id, p_changed, p_frameworks, p_before, p_after)::text, 'UTF8')
                    || p_commit) $$;

-- The tables ------------------------------------------------------------------------------------
CREATE TABLE audit_events (
  org_id           uuid NOT NULL,
  seq              bigint NOT NULL DEFAULT 0,     -- set by the trigger
  id               uuid NOT NULL DEFAULT gen_random_uuid(),
  at               timestamptz NOT NULL DEFAULT clock_timestamp(),
  action           text NOT NULL CONSTRAINT audit_events_action_format
                   CHECK (action ~ '^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$' AND length(action) <= 100),
  result           text NOT NULL DEFAULT 'success' CONSTRAINT audit_events_result_known
                   CHECK (result IN ('success', 'failure', 'denied', 'error')),
  risk             text NOT NULL DEFAULT 'low' CONSTRAINT audit_events_risk_known
                   CHECK (risk IN ('low', 'medium', 'high', 'critical')),
  frameworks       text[] NOT NULL DEFAULT '{}',
  actor_user_id    uuid,
  subject_user_id  uuid,
  resource_type    text CONSTRAINT audit_events_resource_type_length
                   CHECK (length(resource_type) <= 100),
  resource_id      text CONSTRAINT audit_events_resource_id_length
                   CHECK (length(resource_id) <= 200),
  ip               inet,
  user_agent       text CONSTRAINT audit_events_user_agent_length CHECK (length(user_agent) <= 1024),
  request_id       text,
  details          jsonb NOT NULL DEFAULT '{}' CONSTRAINT audit_events_details_object
                   CHECK (jsonb_typeof(details) = 'object' AND pg_column_size(details) <= 16384),
  personal         jsonb CONSTRAINT audit_events_personal_object
                   CHECK (jsonb_typeof(personal) = 'object' AND pg_column_size(personal) <= 16384),
  pii_salt         bytea,
  pii_commit       bytea NOT NULL DEFAULT '\x',
  redacted_at      timestamptz,
  prev_hash        bytea NOT NULL DEFAULT '\x',
  row_hash         bytea NOT NULL DEFAULT '\x',
  PRIMARY KEY (org_id, seq, at)
) PARTITION BY RANGE (at);
CREATE INDEX audit_events_resource_idx
  ON audit_events (org_id, resource_type, resource_id, at DESC, seq DESC);
CREATE INDEX audit_events_subject_idx ON audit_events (org_id, subject_user_id, at DESC, seq DESC)
  WHERE subject_user_id IS NOT NULL;
CREATE INDEX audit_events_actor_idx ON audit_events (org_id, actor_user_id, at DESC)
  WHERE actor_user_id IS NOT NULL;
CREATE INDEX audit_events_at_idx ON audit_events (org_id, at, action);

CREATE TABLE data_changes (
  org_id           uuid NOT NULL,
  seq              bigint NOT NULL,
  id               uuid NOT NULL DEFAULT gen_random_uuid(),
  at               timestamptz NOT NULL DEFAULT clock_timestamp(),
  table_name       text NOT NULL,
  row_pk           jsonb NOT NULL,
  op               text NOT NULL CONSTRAINT data_changes_op_known
                   CHECK (op IN ('INSERT', 'UPDATE', 'DELETE')),
  actor_user_id    uuid,
  request_id       text,
  changed_columns  text[],
  frameworks       text[] NOT NULL DEFAULT '{}',
  before           jsonb,          -- non-personal, non-secret columns (updates: changed only)
  after            jsonb,
  personal         jsonb,          -- {"before": {...}, "after": {...}} personal columns
  pii_salt         bytea,
  pii_commit       bytea NOT NULL,
  redacted_at      timestamptz,
  prev_hash        bytea NOT NULL,
  row_hash         bytea NOT NULL,
  PRIMARY KEY (org_id, seq, at)
) PARTITION BY RANGE (at);
CREATE INDEX data_changes_row_idx ON data_changes (org_id, table_name, row_pk, at DESC, seq DESC);

-- Append-only guard ---------------------------------------------------------------------------
-- app.audit_bypass is honoured only for the maintenance role (definer functions owned by it).
CREATE FUNCTION app.audit_bypass() RETURNS text
LANGUAGE sql STABLE AS $$
  SELECT CASE WHEN current_user = 'datalayer_maint'
              THEN nullif(current_setting('app.audit_bypass', true), '') END
$$;

CREATE FUNCTION app.audit_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_bypass text := app.audit_bypass();
BEGIN
  IF TG_OP = 'UPDATE' AND v_bypass = 'redact' THEN
    RETURN NEW;
  ELSIF TG_OP = 'DELETE' AND v_bypass IN ('retention', 'partition_move') THEN
    RETURN OLD;
  END IF;
  RAISE EXCEPTION '% rows are append-only (% refused)', TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'insufficient_privilege', TABLE = TG_TABLE_NAME;
END $$;
CREATE FUNCTION app.audit_no_truncate() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  RAISE EXCEPTION '% rows are append-only (TRUNCATE refused)', TG_TABLE_NAME
    USING ERRCODE = 'insufficient_privilege', TABLE = TG_TABLE_NAME;
END $$;

CREATE TRIGGER audit_events_guard BEFORE UPDATE OR DELETE ON audit_events
  FOR EACH ROW EXECUTE FUNCTION app.audit_guard();
CREATE TRIGGER data_changes_guard BEFORE UPDATE OR DELETE ON data_changes
  FOR EACH ROW EXECUTE FUNCTION app.audit_guard();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
  FOR EACH STATEMENT EXECUTE FUNCTION app.audit_no_truncate();
CREATE TRIGGER data_changes_no_truncate BEFORE TRUNCATE ON data_changes
  FOR EACH STATEMENT EXECUTE FUNCTION app.audit_no_truncate();

-- Chain head: take (and lock until commit) the next p_n positions of (org, chain); returns the
-- first new seq and the current head hash. Caller must store the new head with audit_set_head.
CREATE FUNCTION app.audit_take(p_org uuid, p_chain text, p_n integer,
                               OUT first_seq bigint, OUT prev bytea)
LANGUAGE sql SET search_path = pg_catalog, public, pg_temp AS $$
  INSERT INTO app.audit_heads AS h (org_id, chain, seq) VALUES (p_org, p_chain, p_n)
  ON CONFLICT (org_id, chain) DO UPDATE SET seq = h.seq + p_n
  RETURNING h.seq - p_n + 1, h.head
$$;

-- Explicit events: context columns, classification and the chain, for every writer ----------
CREATE FUNCTION app.audit_events_before_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_org uuid := app.org_id();
  v_first bigint;
  v_prev bytea;
BEGIN
  IF NEW.row_hash <> '\x' AND app.audit_bypass() = 'partition_move' THEN
    RETURN NEW;  -- a row moving out of the default partition keeps its chain position
  END IF;
  IF v_org IS NOT NULL THEN
    -- A tenant session: its own organization, and the context says who, where, which request.
    IF NEW.org_id IS DISTINCT FROM v_org THEN
      RETURN NEW;  -- another organization's chain is not touched: the RLS check refuses the row
    END IF;
    NEW.actor_user_id := app.user_id();
    NEW.request_id := app.request_id();
    NEW.ip := nullif(current_setting('app.ip', true), '')::inet;
  ELSE
    NEW.actor_user_id := coalesce(NEW.actor_user_id, app.user_id());
    NEW.request_id := coalesce(NEW.request_id, app.request_id());
    NEW.ip := coalesce(NEW.ip, nullif(current_setting('app.ip', true), '')::inet);
  END IF;
  SELECT c.risk, c.frameworks INTO NEW.risk, NEW.frameworks
  FROM app.audit_classify(NEW.action, NEW.result) c;
  NEW.redacted_at := NULL;
  NEW.pii_salt := uuid_send(gen_random_uuid());
  NEW.pii_commit := app.audit_commit(NEW.pii_salt, NEW.ip, NEW.user_agent, NEW.personal);
  -- The chain head: lock the organization's head row (a row lock, no new row version, so a
  -- transaction writing many events does not grow a chain of versions of it), then the last
  -- event (rows inserted earlier by this statement are visible here), or the retention
  -- checkpoint when there is none. The head row itself is updated once per statement
  -- (audit_events_after_insert).
  PERFORM 1 FROM app.audit_heads h WHERE h.org_id = NEW.org_id AND h.chain = 'events'
  FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM app.audit_take(NEW.org_id, 'events', 0);
  END IF;
  SELECT e.seq + 1, e.row_hash INTO v_first, v_prev FROM audit_events e
  WHERE e.org_id = NEW.org_id ORDER BY e.seq DESC LIMIT 1;
  IF NOT FOUND THEN
    SELECT h.floor_seq, h.floor_prev INTO v_first, v_prev FROM app.audit_heads h
    WHERE h.org_id = NEW.org_id AND h.chain = 'events';
  END IF;
  NEW.seq := v_first;
  -- Maintenance may import history with its original time; everything else is stamped now.
  IF v_org IS NULL AND NEW.at < clock_timestamp() - interval '1 second' THEN
    NULL;
  ELSE
    NEW.at := clock_timestamp();
  END IF;
  NEW.prev_hash := v_prev;
  NEW.row_hash := app.audit_event_hash(v_prev, NEW.org_id, NEW.seq, NEW.id, NEW.at, NEW.action,
                                       NEW.result, NEW.risk, NEW.frameworks, NEW.actor_user_id,
                                       NEW.subject_user_id, NEW.resource_type, NEW.resource_id,
                                       NEW.request_id, NEW.details, NEW.pii_commit);
  RETURN NEW;
END $$;
CREATE TRIGGER audit_events_before_insert BEFORE INSERT ON audit_events
  FOR EACH ROW EXECUTE FUNCTION app.audit_events_before_insert();

-- Once per statement: move each organization's head to its newest event (never backwards:
-- rows moved between partitions keep their old positions).
CREATE FUNCTION app.audit_events_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  UPDATE app.audit_heads h SET seq = n.seq, head = n.row_hash
  FROM (SELECT DISTINCT ON (org_id) org_id, seq, row_hash FROM new_rows
        ORDER BY org_id, seq DESC) n
  WHERE h.org_id = n.org_id AND h.chain = 'events' AND h.seq < n.seq;
  RETURN NULL;
END $$;
CREATE TRIGGER audit_events_after_insert AFTER INSERT ON audit_events
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION app.audit_events_after_insert();

-- Change capture ----------------------------------------------------------------------------------
-- Row-level AFTER triggers: app.audit_capture(table) generates a trigger function for the table
-- (app.audit_capture__<table>) with its primary key, organization column, secret, omitted and
-- personal columns and its compliance frameworks compiled into static SQL, so PL/pgSQL caches
-- its plans (a generic function would re-plan a dynamic query on every row). The registries
-- (and app.audit_rules) re-generate the functions of captured tables whenever they change
-- (triggers below), so a column registered as secret is never copied afterwards.
--
-- Per mutated row: one statement locks the (org, 'changes') chain head (a row lock, no new
-- row version), one statement computes the change (changed columns, before/after minus
-- secrets, personal columns split out), its hash, inserts the change row and moves the head.
-- Most writes change one row; a statement-level trigger with transition tables cost about
-- twice as much there (to_jsonb over the transition tables, array aggregation, a second
-- function, a per-row loop), and PL/pgSQL re-initializes every expression it evaluates once
-- per transaction, so the function is kept to a handful of them. A bulk statement pays the
-- two statements per row (the head row lock is taken once and held until COMMIT).
-- An UPDATE that changed nothing writes no change row and takes no lock.

-- Opt a table into change capture: CALL app.audit_capture('table_name'); (again to refresh).
CREATE PROCEDURE app.audit_capture(p_table text)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_rel regclass := to_regclass(format('public.%I', p_table));
  v_fn text := format('app.%I', 'audit_capture__' || p_table);
  v_pk_cols text[];
  v_org_col text;
  v_skip text[];
  v_secret text;
  v_personal text;
  v_frameworks text;
  v_pk text;
  v_org text;
  v_all text;
  v_oldj text;
  v_newj text;
  v_skipped text;
  v_body text;
BEGIN
  IF v_rel IS NULL THEN
    RAISE EXCEPTION 'no table public.% to capture', p_table USING ERRCODE = 'undefined_table';
  END IF;
  SELECT array_agg(a.attname::text ORDER BY k.n) INTO v_pk_cols
  FROM pg_index i
  CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
  WHERE i.indrelid = v_rel AND i.indisprimary;
  IF v_pk_cols IS NULL THEN
    RAISE EXCEPTION 'table % has no primary key to capture by', p_table
      USING ERRCODE = 'invalid_table_definition';
  END IF;
  v_org_col := CASE WHEN p_table = 'organizations' THEN 'id'
                    WHEN EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = v_rel
                                 AND attname = 'org_id' AND NOT attisdropped) THEN 'org_id' END;
  INSERT INTO app.audit_tables (table_name, pk_columns, org_column)
  VALUES (p_table, v_pk_cols, v_org_col)
  ON CONFLICT (table_name) DO UPDATE SET pk_columns = EXCLUDED.pk_columns,
                                         org_column = EXCLUDED.org_column;
  SELECT coalesce(array_agg(column_name ORDER BY column_name), '{}') INTO v_skip FROM (
    SELECT column_name FROM app.secret_columns WHERE table_name = p_table
    UNION SELECT column_name FROM app.encrypted_columns WHERE table_name = p_table
    UNION SELECT column_name FROM app.audit_omit_columns WHERE table_name = p_table
    UNION SELECT attname::text FROM pg_attribute
          WHERE attrelid = v_rel AND attgenerated <> '' AND NOT attisdropped) s;
  v_secret := quote_literal(v_skip::text) || '::text[]';
  -- Every column (in jsonb key order: an insert lists them all as changed); the copied ones
  -- as jsonb of OLD and NEW (built column by column: a skipped column, a search vector say,
  -- is never converted); the skipped ones compared in place (their text form when the type
  -- has no equality operator).
  SELECT quote_literal(array_agg(k)::text) || '::text[]' INTO v_all
  FROM jsonb_object_keys((SELECT jsonb_object_agg(attname, 1) FROM pg_attribute
                          WHERE attrelid = v_rel AND attnum > 0 AND NOT attisdropped)) k;
  SELECT coalesce(string_agg(replace(o, 'ROWX', 'OLD'), ' || '), '''{}''::jsonb'),
         coalesce(string_agg(replace(o, 'ROWX', 'NEW'), ' || '), '''{}''::jsonb')
  INTO v_oldj, v_newj
  FROM (SELECT 'jsonb_build_object(' || string_agg(format('%L, ROWX.%I', attname, attname),
                                                   ', ' ORDER BY attnum) || ')' AS o
        FROM (SELECT a.attname::text AS attname, a.attnum,
                     (row_number() OVER (ORDER BY a.attnum) - 1) / 50 AS chunk
              FROM pg_attribute a
              WHERE a.attrelid = v_rel AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attname::text <> ALL(v_skip)) c
        GROUP BY chunk ORDER BY chunk) s;
  SELECT coalesce('array_remove(ARRAY[' || string_agg(
           CASE WHEN EXISTS (SELECT 1 FROM pg_operator WHERE oprname = '='
                             AND oprleft = a.atttypid AND oprright = a.atttypid)
                THEN format('CASE WHEN OLD.%1$I IS DISTINCT FROM NEW.%1$I THEN %2$L END',
                            a.attname, a.attname)
                ELSE format('CASE WHEN OLD.%1$I::text IS DISTINCT FROM NEW.%1$I::text '
                            'THEN %2$L END', a.attname, a.attname) END,
           ', ' ORDER BY a.attnum) || ']::text[], NULL)', 'NULL::text[]')
  INTO v_skipped
  FROM pg_attribute a
  WHERE a.attrelid = v_rel AND a.attnum > 0 AND NOT a.attisdropped
    AND a.attname::text = ANY(v_skip);
  SELECT quote_literal(coalesce(array_agg(column_name ORDER BY column_name), '{}')::text)
         || '::text[]' INTO v_personal
  FROM app.personal_columns WHERE table_name IN (p_table, '*');
  v_frameworks := quote_literal(coalesce(
    (app.audit_classify('change.' || p_table, 'success')).frameworks, '{}')::text) || '::text[]';
  -- The primary key as jsonb, and the organization, of the row (new row; old for a delete).
  SELECT 'jsonb_build_object(' || string_agg(format('%L, v_r->%L', c, c), ', ') || ')'
  INTO v_pk FROM unnest(v_pk_cols) c;
  v_org := CASE WHEN v_org_col IS NULL THEN 'NULL::uuid'
                ELSE format('(v_r->>%L)::uuid', v_org_col) END;
  -- c: changed columns and before/after minus secrets (updates: changed columns only);
  -- d: personal columns split out, position, id, time and salt (materialized: volatile);
  -- z: the commitment and the hash. The head moves in the same statement.
  v_body := format($b$
DECLARE
  v_o jsonb;
  v_n jsonb;
  v_x text[];
  v_r jsonb;
  v_org uuid;
  v_seq bigint;
  v_prev bytea;
BEGIN
  IF TG_OP = 'INSERT' THEN
    v_n := %6$s;
  ELSIF TG_OP = 'DELETE' THEN
    v_o := %7$s;
  ELSE
    v_o := %7$s;
    v_n := %6$s;
    v_x := %8$s;
    IF v_o = v_n AND coalesce(cardinality(v_x), 0) = 0 THEN
      RETURN NULL;  -- an update that changed nothing
    END IF;
  END IF;
  v_r := coalesce(v_n, v_o);
  v_org := coalesce(%1$s, app.org_id(), '00000000-0000-0000-0000-000000000000'::uuid);
  SELECT h.seq, h.head INTO v_seq, v_prev FROM app.audit_heads h
  WHERE h.org_id = v_org AND h.chain = 'changes' FOR UPDATE;
  IF NOT FOUND THEN
    SELECT t.first_seq - 1, t.prev INTO v_seq, v_prev FROM app.audit_take(v_org, 'changes', 0) t;
  END IF;
  WITH c AS MATERIALIZED (
    SELECT k.changed,
           CASE WHEN v_n IS NULL THEN v_o - %3$s
                WHEN v_o IS NOT NULL THEN (SELECT jsonb_object_agg(x, v_o->x)
                                           FROM unnest(k.changed) x WHERE x <> ALL(%3$s)) END
             AS b,
           CASE WHEN v_o IS NULL THEN v_n - %3$s
                WHEN v_n IS NOT NULL THEN (SELECT jsonb_object_agg(x, v_n->x)
                                           FROM unnest(k.changed) x WHERE x <> ALL(%3$s)) END
             AS a
    FROM (SELECT CASE WHEN v_o IS NULL THEN %9$s
                      WHEN v_n IS NOT NULL THEN
                        (SELECT array_agg(s.k ORDER BY s.k)
                         FROM (SELECT e.key FROM jsonb_each(v_n) e
                               WHERE e.value IS DISTINCT FROM v_o->e.key
                               UNION ALL SELECT unnest(v_x)) s(k)) END AS changed) k
    WHERE v_o IS NULL OR v_n IS NULL OR k.changed IS NOT NULL
  ), p AS MATERIALIZED (
    SELECT c.changed, c.b - %4$s AS b, c.a - %4$s AS a,
           CASE WHEN (c.b ?| %4$s) OR (c.a ?| %4$s) THEN jsonb_strip_nulls(jsonb_build_object(
             'before', (SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(c.b) e
                        WHERE e.key = ANY(%4$s)),
             'after', (SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(c.a) e
                       WHERE e.key = ANY(%4$s)))) END AS p
    FROM c
  ), d AS MATERIALIZED (
    SELECT p.*, v_seq + 1 AS seq, gen_random_uuid() AS id, clock_timestamp() AS at,
           CASE WHEN p.p IS NOT NULL THEN uuid_send(gen_random_uuid()) END AS salt,
           %2$s AS pk, app.user_id() AS actor, app.request_id() AS request
    FROM p
  ), z AS MATERIALIZED (
    SELECT d.*, app.audit_change_hash(v_prev, v_org, d.seq, d.id, d.at, TG_TABLE_NAME, d.pk,
                                      TG_OP, d.actor, d.request, d.changed, %5$s, d.b, d.a,
                                      m.cmt) AS row_hash, m.cmt
    FROM d CROSS JOIN LATERAL (SELECT app.audit_commit(d.salt, NULL, NULL, d.p) AS cmt) m
  ), u AS (
    UPDATE app.audit_heads h SET seq = z.seq, head = z.row_hash FROM z
    WHERE h.org_id = v_org AND h.chain = 'changes'
  )
  INSERT INTO data_changes (org_id, seq, id, at, table_name, row_pk, op, actor_user_id,
                            request_id, changed_columns, frameworks, before, after, personal,
                            pii_salt, pii_commit, prev_hash, row_hash)
  SELECT v_org, z.seq, z.id, z.at, TG_TABLE_NAME, z.pk, TG_OP, z.actor, z.request, z.changed,
         %5$s, z.b, z.a, z.p, z.salt, z.cmt, v_prev, z.row_hash
  FROM z;
  RETURN NULL;
END
$b$, v_org, v_pk, v_secret, v_personal, v_frameworks, v_newj, v_oldj, v_skipped, v_all);
  EXECUTE format(
    'CREATE OR REPLACE FUNCTION %s() RETURNS trigger '
    'LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS %s',
    v_fn, quote_literal(v_body));
  EXECUTE format('ALTER FUNCTION %s() OWNER TO datalayer_maint', v_fn);
  EXECUTE format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', v_fn);
  EXECUTE format('DROP TRIGGER IF EXISTS audit_capture ON %s', v_rel);
  EXECUTE format('CREATE TRIGGER audit_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                 'FOR EACH ROW EXECUTE FUNCTION %s()', v_rel, v_fn);
END $$;

-- Stop capturing a table (its change rows stay).
CREATE PROCEDURE app.audit_uncapture(p_table text)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_rel regclass := to_regclass(format('public.%I', p_table));
BEGIN
  IF v_rel IS NOT NULL THEN
    EXECUTE format('DROP TRIGGER IF EXISTS audit_capture ON %s', v_rel);
  END IF;
  EXECUTE format('DROP FUNCTION IF EXISTS app.%I()', 'audit_capture__' || p_table);
  DELETE FROM app.audit_tables WHERE table_name = p_table;
END $$;

-- A registry changed: re-generate the capture functions of the captured tables it names.
CREATE FUNCTION app.audit_registry_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  t text;
BEGIN
  FOR t IN SELECT a.table_name FROM app.audit_tables a ORDER BY 1 LOOP
    CALL app.audit_capture(t);
  END LOOP;
  RETURN NULL;
END $$;
CREATE TRIGGER audit_registry_changed AFTER INSERT OR UPDATE OR DELETE ON app.secret_columns
  FOR EACH STATEMENT EXECUTE FUNCTION app.audit_registry_changed();
CREATE TRIGGER audit_registry_changed AFTER INSERT OR UPDATE OR DELETE ON app.personal_columns
  FOR EACH STATEMENT EXECUTE FUNCTION app.audit_registry_changed();
CREATE TRIGGER audit_registry_changed AFTER INSERT OR UPDATE OR DELETE ON app.encrypted_columns
  FOR EACH STATEMENT EXECUTE FUNCTION app.audit_registry_changed();
CREATE TRIGGER audit_registry_changed AFTER INSERT OR UPDATE OR DELETE ON app.audit_omit_columns
  FOR EACH STATEMENT EXECUTE FUNCTION app.audit_registry_changed();
-- The frameworks of a change row are compiled in as well.
CREATE TRIGGER audit_registry_changed AFTER INSERT OR UPDATE OR DELETE ON app.audit_rules
  FOR EACH STATEMENT EXECUTE FUNCTION app.audit_registry_changed();

-- Events written by the database itself --------------------------------------------------------
-- Credential decrypt: credentials.decrypt inserts a credential_access row in the same statement;
-- this writes the audit event in the same transaction (credential_access stays for
-- compatibility; audit_events is the record compliance reports read).
CREATE FUNCTION app.audit_credential_access() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  INSERT INTO audit_events (org_id, action, result, actor_user_id, resource_type, resource_id)
  SELECT n.org_id, 'credential.' || n.action, 'success', n.actor_id, 'credential',
         n.credential_id::text
  FROM new_rows n;
  RETURN NULL;
END $$;
CREATE TRIGGER credential_access_audit AFTER INSERT ON credential_access
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION app.audit_credential_access();

-- Execution control: only user-initiated control is audited (cancel, manual retry). The WHEN
-- clauses are evaluated without calling a function, so claim/heartbeat/complete pay nothing.
CREATE FUNCTION app.audit_execution_control() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  INSERT INTO audit_events (org_id, action, result, resource_type, resource_id, details)
  VALUES (NEW.org_id,
          CASE WHEN TG_OP = 'INSERT' THEN 'execution.retried' ELSE 'execution.cancelled' END,
          'success', 'execution', NEW.id::text,
          jsonb_build_object('workflow_id', NEW.workflow_id, 'attempt', NEW.attempt,
                             'retry_of', NEW.retry_of, 'reason', NEW.status_reason));
  RETURN NULL;
END $$;
CREATE TRIGGER executions_audit_cancel AFTER UPDATE OF status ON executions
  FOR EACH ROW WHEN (NEW.status = 'cancelled' AND OLD.status <> 'cancelled')
  EXECUTE FUNCTION app.audit_execution_control();
CREATE TRIGGER executions_audit_retry AFTER INSERT ON executions
  FOR EACH ROW WHEN (NEW.retry_of IS NOT NULL AND NOT NEW.auto_retry)
  EXECUTE FUNCTION app.audit_execution_control();

-- Authentication events (no tenant context on the login path): one event per organization the
-- user belongs to (so each organization's reports see its members' failed logins and
-- lockouts), or one in the global chain for an unknown account or a user without memberships.
CREATE FUNCTION app.audit_auth_event(p_user_id uuid, p_action text, p_result text,
                                     p_ip inet, p_user_agent text, p_details jsonb)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_n integer;
BEGIN
  PERFORM app.require_no_tenant();
  IF p_action NOT IN ('auth.login', 'auth.lockout') THEN
    RAISE EXCEPTION 'not an authentication event: %', p_action
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO audit_events (org_id, action, result, actor_user_id, subject_user_id,
                            resource_type, resource_id, ip, user_agent, request_id, details)
  SELECT o.org_id, p_action, p_result, CASE WHEN p_result = 'success' THEN p_user_id END,
         p_user_id, 'user', p_user_id::text,
         coalesce(p_ip, nullif(current_setting('app.ip', true), '')::inet), p_user_agent,
         app.request_id(), coalesce(p_details, '{}')
  FROM (SELECT m.org_id FROM memberships m WHERE m.user_id = p_user_id
        UNION ALL
        SELECT '00000000-0000-0000-0000-000000000000'::uuid
        WHERE p_user_id IS NULL
           OR NOT EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = p_user_id)) o
  ORDER BY o.org_id;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  RETURN v_n;
END $$;

-- Redaction (erasure path) ----------------------------------------------------------------------
-- Remove the personal data of p_user_id from the audit rows of p_org AND of the global chain:
-- events the user acted in or is the subject of (ip, user agent, personal), and change rows of
-- the user's own rows (users, memberships, team_members, api_keys by user_id) or whose personal
-- part mentions one of the user's addresses (current or historic, from the captured users rows).
-- Returns the number of rows redacted. The chains stay verifiable (see the header).
CREATE FUNCTION app.audit_redact_subject(p_org uuid, p_user_id uuid) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_orgs uuid[] := ARRAY[p_org, '00000000-0000-0000-0000-000000000000'::uuid];
  v_emails text[];
  v_n bigint;
  v_m bigint;
  v_n2 bigint;
BEGIN
  IF p_org IS NULL OR p_user_id IS NULL THEN
    RAISE EXCEPTION 'redaction needs an organization and a user'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM set_config('app.audit_bypass', 'redact', true);
  SELECT coalesce(array_agg(DISTINCT lower(e)), '{}') INTO v_emails FROM (
    SELECT u.email AS e FROM users u WHERE u.id = p_user_id
    UNION ALL
    SELECT d.personal #>> ARRAY[side, 'email'] FROM data_changes d,
           unnest(ARRAY['before', 'after']) side
    WHERE d.org_id = ANY (v_orgs) AND d.table_name = 'users'
      AND d.row_pk = jsonb_build_object('id', p_user_id)) s
  WHERE e IS NOT NULL;
  UPDATE audit_events SET ip = NULL, user_agent = NULL, personal = NULL, pii_salt = NULL,
                          redacted_at = now()
  WHERE org_id = ANY (v_orgs) AND redacted_at IS NULL
    AND (actor_user_id = p_user_id OR subject_user_id = p_user_id);
  GET DIAGNOSTICS v_n = ROW_COUNT;
  UPDATE data_changes d SET personal = NULL, pii_salt = NULL, redacted_at = now()
  WHERE d.org_id = ANY (v_orgs) AND d.redacted_at IS NULL AND d.personal IS NOT NULL
    AND ((d.table_name = 'users' AND d.row_pk = jsonb_build_object('id', p_user_id))
         OR d.row_pk->>'user_id' = p_user_id::text
         OR EXISTS (SELECT 1 FROM unnest(v_emails) e
                    WHERE strpos(lower(d.personal::text), e) > 0));
  GET DIAGNOSTICS v_m = ROW_COUNT;
  -- Rows about the subject whose key does not name them (a model, a document: the user id is
  -- a column): the GDPR registry (schema/0016_gdpr.sql, when present) says which column
  -- points at the subject; every change row of a row that ever held the subject there goes.
  IF to_regclass('app.personal_data') IS NOT NULL THEN
    EXECUTE $sql$
      WITH about AS (
        SELECT DISTINCT d.table_name, d.row_pk
        FROM data_changes d
        JOIN app.personal_data p ON p.table_name = d.table_name AND p.match = 'id'
        WHERE d.org_id = ANY ($1)
          AND $2::text IN (d.after ->> p.subject_column, d.before ->> p.subject_column,
                           d.row_pk ->> p.subject_column))
      UPDATE data_changes d SET personal = NULL, pii_salt = NULL, redacted_at = now()
      FROM about a
      WHERE d.org_id = ANY ($1) AND d.redacted_at IS NULL AND d.personal IS NOT NULL
        AND d.table_name = a.table_name AND d.row_pk = a.row_pk $sql$
      USING v_orgs, p_user_id;
    GET DIAGNOSTICS v_n2 = ROW_COUNT;
    v_m := v_m + v_n2;
  END IF;
  PERFORM set_config('app.audit_bypass', '', true);
  RETURN v_n + v_m;
END $$;

-- Retention --------------------------------------------------------------------------------------
-- Policies per framework and event class ('events', 'changes'): defaults in
-- app.audit_retention_defaults (SOX 7 years, HIPAA 6 years, GDPR and rows without a framework
-- ('NONE') 1 year); an organization overrides GDPR and NONE in audit_retention_policies (SOX
-- and HIPAA are not org-configurable). A row is kept as long as the longest policy of its
-- frameworks.
CREATE TABLE app.audit_retention_defaults (
  framework    text NOT NULL CONSTRAINT audit_retention_defaults_framework_known
               CHECK (framework IN ('GDPR', 'SOX', 'HIPAA', 'NONE')),
  event_class  text NOT NULL CONSTRAINT audit_retention_defaults_class_known
               CHECK (event_class IN ('events', 'changes')),
  keep_days    integer NOT NULL CHECK (keep_days >= 1),
  min_days     integer NOT NULL DEFAULT 1,   -- an organization may not go below this
  PRIMARY KEY (framework, event_class)
);
INSERT INTO app.audit_retention_defaults (framework, event_class, keep_days, min_days) VALUES
  ('SOX', 'events', 2557, 2557), ('SOX', 'changes', 2557, 2557),
  ('HIPAA', 'events', 2192, 2192), ('HIPAA', 'changes', 2192, 2192),
  ('GDPR', 'events', 365, 1), ('GDPR', 'changes', 365, 1),
  ('NONE', 'events', 365, 1), ('NONE', 'changes', 365, 1);

CREATE TABLE audit_retention_policies (
  org_id       uuid NOT NULL,
  framework    text NOT NULL CONSTRAINT audit_retention_framework_known
               CHECK (framework IN ('GDPR', 'NONE')),
  event_class  text NOT NULL CONSTRAINT audit_retention_class_known
               CHECK (event_class IN ('events', 'changes')),
  keep_days    integer NOT NULL CONSTRAINT audit_retention_keep_range
               CHECK (keep_days BETWEEN 1 AND 36500),
  updated_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, framework, event_class)
);

-- Legal hold: nothing of the organization is removed while it is set.
CREATE TABLE audit_legal_holds (
  org_id      uuid PRIMARY KEY,
  reason      text NOT NULL DEFAULT '' CONSTRAINT audit_legal_holds_reason_length
              CHECK (length(reason) <= 500),
  set_by      uuid DEFAULT app.user_id(),
  set_at      timestamptz NOT NULL DEFAULT now()
);

-- What retention removed (one row per table, organization and run).
CREATE TABLE audit_retention_log (
  org_id      uuid NOT NULL,
  id          bigint GENERATED ALWAYS AS IDENTITY,
  table_name  text NOT NULL,
  removed     bigint NOT NULL,
  up_to_seq   bigint NOT NULL,
  method      text NOT NULL CONSTRAINT audit_retention_log_method_known
              CHECK (method IN ('drop_partition', 'delete')),
  at          timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id)
);

-- The retention deadline of a row: its newest allowed removal time.
CREATE FUNCTION app.audit_keep_days(p_org uuid, p_class text, p_frameworks text[]) RETURNS integer
LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp AS $$
  SELECT max(coalesce(
           (SELECT o.keep_days FROM audit_retention_policies o
            WHERE o.org_id = p_org AND o.framework = f AND o.event_class = p_class),
           (SELECT d.keep_days FROM app.audit_retention_defaults d
            WHERE d.framework = f AND d.event_class = p_class)))
  FROM unnest(CASE WHEN cardinality(p_frameworks) > 0 THEN p_frameworks
                   ELSE ARRAY['NONE'] END) f
$$;

-- How far the chain of (org, table) may be cut: the largest seq S such that every row with
-- seq <= S is past its retention (a prefix: the chain stays verifiable from the checkpoint).
-- NULL under a legal hold or when nothing may go.
CREATE FUNCTION app.audit_retention_cut(p_org uuid, p_table text) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_cut bigint;
BEGIN
  IF EXISTS (SELECT 1 FROM audit_legal_holds h WHERE h.org_id = p_org) THEN
    RETURN NULL;
  END IF;
  IF p_table = 'audit_events' THEN
    SELECT min(e.seq) - 1 INTO v_cut FROM audit_events e
    WHERE e.org_id = p_org
      AND e.at > now() - make_interval(days => app.audit_keep_days(p_org, 'events', e.frameworks));
    IF v_cut IS NULL THEN
      SELECT max(e.seq) INTO v_cut FROM audit_events e WHERE e.org_id = p_org;
    END IF;
  ELSE
    SELECT min(d.seq) - 1 INTO v_cut FROM data_changes d
    WHERE d.org_id = p_org
      AND d.at > now() - make_interval(days => app.audit_keep_days(p_org, 'changes', d.frameworks));
    IF v_cut IS NULL THEN
      SELECT max(d.seq) INTO v_cut FROM data_changes d WHERE d.org_id = p_org;
    END IF;
  END IF;
  RETURN nullif(v_cut, 0);
END $$;

-- Remove up to p_limit rows of (org, table) with seq <= p_cut, oldest first, and move the
-- chain's checkpoint past them. Returns the rows removed (call again until 0).
CREATE FUNCTION app.audit_retention_delete(p_org uuid, p_table text, p_cut bigint,
                                           p_limit integer)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_chain text := CASE p_table WHEN 'audit_events' THEN 'events' WHEN 'data_changes' THEN 'changes' END;
  v_floor bigint;
  v_to bigint;
  v_hash bytea;
  v_n bigint;
BEGIN
  IF v_chain IS NULL THEN
    RAISE EXCEPTION 'not an audit table: %', p_table USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT h.floor_seq INTO v_floor FROM app.audit_heads h
  WHERE h.org_id = p_org AND h.chain = v_chain FOR UPDATE;
  IF v_floor IS NULL OR p_cut < v_floor THEN
    RETURN 0;
  END IF;
  v_to := least(p_cut, v_floor + p_limit - 1);
  EXECUTE format('SELECT row_hash FROM %I WHERE org_id = $1 AND seq = $2', p_table)
    INTO v_hash USING p_org, v_to;
  PERFORM set_config('app.audit_bypass', 'retention', true);
  EXECUTE format('DELETE FROM %I WHERE org_id = $1 AND seq BETWEEN $2 AND $3', p_table)
    USING p_org, v_floor, v_to;
  GET DIAGNOSTICS v_n = ROW_COUNT;
  PERFORM set_config('app.audit_bypass', '', true);
  UPDATE app.audit_heads SET floor_seq = v_to + 1, floor_prev = coalesce(v_hash, floor_prev)
  WHERE org_id = p_org AND chain = v_chain;
  INSERT INTO audit_retention_log (org_id, table_name, removed, up_to_seq, method)
  VALUES (p_org, p_table, v_n, v_to, 'delete');
  RETURN v_n;
END $$;

-- Drop a whole monthly partition of an audit table when, for every organization with rows in
-- it, all of them lie at or below that organization's retention cut (p_cuts: org -> cut).
-- Moves those chains' checkpoints and logs per organization. Returns the rows removed, or -1
-- when the partition may not be dropped.
CREATE FUNCTION app.audit_retention_drop(p_partition text, p_cuts jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_parent text;
  v_chain text;
  v_rel regclass := to_regclass(format('partitions.%I', p_partition));
  r record;
  v_total bigint := 0;
BEGIN
  SELECT c.relname INTO v_parent FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhparent
  WHERE i.inhrelid = v_rel;
  IF v_parent NOT IN ('audit_events', 'data_changes') OR p_partition LIKE '%\_default' THEN
    RETURN -1;
  END IF;
  v_chain := CASE v_parent WHEN 'audit_events' THEN 'events' ELSE 'changes' END;
  -- Lock the heads of every organization in it, then re-check against the cuts.
  FOR r IN EXECUTE format('SELECT org_id, min(seq) AS lo, max(seq) AS hi, count(*) AS n '
                          'FROM %s GROUP BY org_id ORDER BY org_id', v_rel) LOOP
    PERFORM 1 FROM app.audit_heads h WHERE h.org_id = r.org_id AND h.chain = v_chain FOR UPDATE;
    IF (p_cuts->>r.org_id::text)::bigint IS NULL OR r.hi > (p_cuts->>r.org_id::text)::bigint
       OR EXISTS (SELECT 1 FROM audit_legal_holds h WHERE h.org_id = r.org_id) THEN
      RETURN -1;
    END IF;
  END LOOP;
  FOR r IN EXECUTE format('SELECT org_id, max(seq) AS hi, count(*) AS n, '
                          '(array_agg(row_hash ORDER BY seq DESC))[1] AS hash '
                          'FROM %s GROUP BY org_id', v_rel) LOOP
    -- Older rows of the chain (in older partitions) must be gone already: checkpoint only
    -- moves forward over a contiguous prefix.
    UPDATE app.audit_heads SET floor_seq = r.hi + 1, floor_prev = r.hash
    WHERE org_id = r.org_id AND chain = v_chain AND floor_seq <= r.hi;
    INSERT INTO audit_retention_log (org_id, table_name, removed, up_to_seq, method)
    VALUES (r.org_id, v_parent, r.n, r.hi, 'drop_partition');
    v_total := v_total + r.n;
  END LOOP;
  EXECUTE format('DROP TABLE %s', v_rel);
  RETURN v_total;
END $$;

-- Retention read helpers for the job: organizations with audit rows, and partitions.
CREATE FUNCTION app.audit_partitions()
RETURNS TABLE (table_name text, partition_name text, upper_bound timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
  SELECT p.relname::text, c.relname::text,
         substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz
  FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
  WHERE p.relname IN ('audit_events', 'data_changes') AND p.relnamespace = 'public'::regnamespace
  ORDER BY 1, 3 NULLS LAST
$$;

-- Row-level security ------------------------------------------------------------------------------
ALTER TABLE audit_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_events FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_events_select ON audit_events FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND app.role_allows((SELECT app.role()), 'audit', 'read'));
CREATE POLICY audit_events_insert ON audit_events FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()));

ALTER TABLE data_changes ENABLE ROW LEVEL SECURITY;
ALTER TABLE data_changes FORCE ROW LEVEL SECURITY;
CREATE POLICY data_changes_select ON data_changes FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND app.role_allows((SELECT app.role()), 'audit', 'read'));

ALTER TABLE audit_retention_policies ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_retention_policies FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_retention_policies_select ON audit_retention_policies FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY audit_retention_policies_insert ON audit_retention_policies FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()));
CREATE POLICY audit_retention_policies_update ON audit_retention_policies FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()))
  WITH CHECK (org_id = (SELECT app.org_id()));
CREATE POLICY audit_retention_policies_delete ON audit_retention_policies FOR DELETE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()));

ALTER TABLE audit_legal_holds ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_legal_holds FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_legal_holds_select ON audit_legal_holds FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY audit_legal_holds_insert ON audit_legal_holds FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()));
CREATE POLICY audit_legal_holds_delete ON audit_legal_holds FOR DELETE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()));

ALTER TABLE audit_retention_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_retention_log FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_retention_log_select ON audit_retention_log FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND app.role_allows((SELECT app.role()), 'audit', 'read'));

-- Privileges -----------------------------------------------------------------------------------
GRANT SELECT,
      INSERT (org_id, action, result, subject_user_id, resource_type, resource_id, user_agent,
              details, personal)
  ON audit_events TO datalayer_app;
GRANT SELECT ON data_changes TO datalayer_app;
REVOKE UPDATE, DELETE, TRUNCATE ON audit_events, data_changes FROM datalayer_app;
GRANT SELECT, INSERT (org_id, framework, event_class, keep_days), UPDATE (keep_days, updated_at),
      DELETE ON audit_retention_policies TO datalayer_app;
GRANT SELECT, INSERT (org_id, reason), DELETE ON audit_legal_holds TO datalayer_app;
GRANT SELECT ON audit_retention_log TO datalayer_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON audit_retention_policies, audit_legal_holds,
      audit_retention_log TO datalayer_maint;
REVOKE ALL ON app.secret_columns, app.personal_columns, app.audit_tables, app.audit_rules,
              app.audit_heads, app.audit_retention_defaults, app.audit_omit_columns
  FROM PUBLIC;
GRANT SELECT ON app.secret_columns, app.personal_columns, app.audit_tables, app.audit_rules,
                app.audit_heads, app.audit_retention_defaults, app.audit_omit_columns
  TO datalayer_maint;


ALTER TABLE audit_events OWNER TO datalayer_maint;
ALTER TABLE data_changes OWNER TO datalayer_maint;
ALTER TABLE app.audit_heads OWNER TO datalayer_maint;
DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY[
    'app.audit_events_before_insert()', 'app.audit_events_after_insert()',
    'app.audit_credential_access()', 'app.audit_execution_control()',
    'app.audit_auth_event(uuid, text, text, inet, text, jsonb)',
    'app.audit_redact_subject(uuid, uuid)', 'app.audit_retention_cut(uuid, text)',
    'app.audit_retention_delete(uuid, text, bigint, integer)',
    'app.audit_retention_drop(text, jsonb)', 'app.audit_partitions()',
    'app.audit_take(uuid, text, integer)']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END $$;
REVOKE ALL ON FUNCTION app.audit_classify(text, text), app.audit_risk(text, text),
                       app.epoch_us(timestamptz), app.audit_commit(bytea, inet, text, jsonb),
                       app.audit_event_hash(bytea, uuid, bigint, uuid, timestamptz, text, text,
                                            text, text[], uuid, uuid, text, text, text, jsonb,
                                            bytea),
                       app.audit_change_hash(bytea, uuid, bigint, uuid, timestamptz, text, jsonb,
                                             text, uuid, text, text[], text[], jsonb, jsonb,
                                             bytea),
                       app.audit_bypass(), app.audit_guard(), app.audit_no_truncate(),
                       app.audit_registry_changed(),
                       app.audit_keep_days(uuid, text, text[])
  FROM PUBLIC;
REVOKE ALL ON PROCEDURE app.audit_capture(text), app.audit_uncapture(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.audit_classify(text, text), app.audit_risk(text, text),
                          app.epoch_us(timestamptz), app.audit_bypass(), app.audit_guard(),
                          app.audit_no_truncate()
  TO datalayer_app, datalayer_maint;
GRANT EXECUTE ON FUNCTION app.audit_commit(bytea, inet, text, jsonb),
                          app.audit_event_hash(bytea, uuid, bigint, uuid, timestamptz, text,
                                               text, text, text[], uuid, uuid, text, text, text,
                                               jsonb, bytea),
                          app.audit_change_hash(bytea, uuid, bigint, uuid, timestamptz, text,
                                                jsonb, text, uuid, text, text[], text[], jsonb,
                                                jsonb, bytea),
                          app.audit_keep_days(uuid, text, text[]),
                          app.audit_redact_subject(uuid, uuid),
                          app.audit_retention_cut(uuid, text),
                          app.audit_retention_delete(uuid, text, bigint, integer),
                          app.audit_retention_drop(text, jsonb), app.audit_partitions()
  TO datalayer_maint;
GRANT EXECUTE ON FUNCTION app.audit_auth_event(uuid, text, text, inet, text, jsonb)
  TO datalayer_app, datalayer_maint;

-- Partition management: the audit tables are managed tables of app.ensure_partitions, which
-- must move rows out of a default partition without the append-only guard refusing and
-- without re-chaining them; and app.drop_partitions_before (execution retention) must never
-- drop audit partitions, whose retention is app.audit_retention_* above. Both are replaced
-- here with those two changes only.
CREATE OR REPLACE FUNCTION app.ensure_partitions(p_months_ahead integer DEFAULT 2,
                                                 p_months_back integer DEFAULT 0)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  t record;
  v_default text;
  v_name text;
  v_from timestamptz;
  v_to timestamptz;
  v_cols text;
  v_moved jsonb;
BEGIN
  IF p_months_ahead NOT BETWEEN 0 AND 120 OR p_months_back NOT BETWEEN 0 AND 120 THEN
    RAISE EXCEPTION 'months ahead and back must each be between 0 and 120'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM pg_advisory_xact_lock(hashtext('datalayer.partitions'));
  FOR t IN SELECT c.oid::regclass AS parent, c.relname::text AS name, a.attname::text AS key
           FROM pg_partitioned_table pt
           JOIN pg_class c ON c.oid = pt.partrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = pt.partattrs[0]
           WHERE pt.partstrat = 'r' AND pt.partnatts = 1
             AND a.atttypid = 'timestamptz'::regtype
             AND c.relowner = 'datalayer_maint'::regrole
           ORDER BY c.relname LOOP
    v_default := t.name || '_default';
    IF to_regclass(format('partitions.%I', v_default)) IS NULL THEN
      EXECUTE format('CREATE TABLE partitions.%I PARTITION OF %s DEFAULT', v_default, t.parent);
      PERFORM app.secure_partition(t.parent, format('partitions.%I', v_default)::regclass);
      RETURN NEXT v_default;
    END IF;
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO v_cols
    FROM pg_attribute
    WHERE attrelid = t.parent AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
    FOR i IN -p_months_back .. p_months_ahead LOOP
      v_from := date_trunc('month', now()) + make_interval(months => i);
      v_to := v_from + interval '1 month';
      v_name := format('%s_p%s', t.name, to_char(v_from, 'YYYYMM'));
      CONTINUE WHEN to_regclass(format('partitions.%I', v_name)) IS NOT NULL;
      -- Audit rows keep their chain position: the guard and the chain trigger let a move pass.
      PERFORM set_config('app.audit_bypass', 'partition_move', true);
      EXECUTE format('WITH moved AS (DELETE FROM partitions.%I WHERE %I >= $1 AND %I < $2 '
                     'RETURNING *) SELECT jsonb_agg(to_jsonb(moved)) FROM moved',
                     v_default, t.key, t.key)
        INTO v_moved USING v_from, v_to;
      EXECUTE format('CREATE TABLE partitions.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                     v_name, t.parent, v_from, v_to);
      PERFORM app.secure_partition(t.parent, format('partitions.%I', v_name)::regclass);
      IF v_moved IS NOT NULL THEN
        EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM jsonb_populate_recordset(NULL::%s, $1)',
                       t.parent, v_cols, v_cols, t.parent) USING v_moved;
      END IF;
      PERFORM set_config('app.audit_bypass', '', true);
      RETURN NEXT v_name;
    END LOOP;
  END LOOP;
END $$;

CREATE OR REPLACE FUNCTION app.drop_partitions_before(p_before date)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  t record;
  p record;
  v_to timestamptz;
BEGIN
  IF p_before IS NULL OR p_before > date_trunc('month', now()) THEN
    RAISE EXCEPTION 'retention may drop only months before the current one (before %)',
      to_char(date_trunc('month', now()), 'YYYY-MM-DD')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM pg_advisory_xact_lock(hashtext('datalayer.partitions'));
  FOR t IN SELECT c.oid::regclass AS parent, c.relname::text AS name, a.attname::text AS key
           FROM pg_partitioned_table pt
           JOIN pg_class c ON c.oid = pt.partrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = pt.partattrs[0]
           WHERE pt.partstrat = 'r' AND pt.partnatts = 1
             AND a.atttypid = 'timestamptz'::regtype
             AND c.relowner = 'datalayer_maint'::regrole
             AND c.relname NOT IN ('audit_events', 'data_changes')  -- audit retention
           ORDER BY c.relname LOOP
    FOR p IN SELECT i.inhrelid::regclass AS part, c.relname::text AS name,
                    pg_get_expr(c.relpartbound, c.oid) AS bound
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = t.parent ORDER BY c.relname LOOP
      IF p.bound = 'DEFAULT' THEN
        EXECUTE format('DELETE FROM %s WHERE %I < $1', p.part, t.key) USING p_before;
        CONTINUE;
      END IF;
      v_to := substring(p.bound FROM 'TO \(''([^'']+)''\)')::timestamptz;
      IF v_to <= p_before THEN
        EXECUTE format('DROP TABLE %s', p.part);
        RETURN NEXT p.name;
      END IF;
    END LOOP;
  END LOOP;
END $$;

-- API-key use: app.verify_api_key (0005_auth) as it was, plus an 'api_key.used' event each time
-- it records a last use (at most once a minute per key), in the key's organization.
CREATE OR REPLACE FUNCTION app.verify_api_key(p_hash bytea)
RETURNS TABLE (org_id uuid, key_id uuid, user_id uuid, role text, scopes text[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  k record;
BEGIN
  SELECT a.org_id, a.id, a.user_id, a.scopes, a.last_used_at, m.role INTO k
  FROM api_keys a
  JOIN memberships m ON m.org_id = a.org_id AND m.user_id = a.user_id
  JOIN organizations o ON o.id = a.org_id AND o.deleted_at IS NULL
  JOIN users u ON u.id = a.user_id AND u.deleted_at IS NULL AND u.status = 'active'
  WHERE a.key_hash = p_hash AND a.revoked_at IS NULL
    AND (a.expires_at IS NULL OR a.expires_at > now());
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute')
     AND NOT current_setting('transaction_read_only')::boolean THEN
    UPDATE api_keys a SET last_used_at = now() WHERE a.org_id = k.org_id AND a.id = k.id;
    INSERT INTO audit_events (org_id, action, result, actor_user_id, subject_user_id,
                              resource_type, resource_id)
    VALUES (k.org_id, 'api_key.used', 'success', k.user_id, k.user_id, 'api_key', k.id::text);
  END IF;
  RETURN QUERY SELECT k.org_id, k.id, k.user_id, k.role, k.scopes;
END $$;

DO $$ BEGIN PERFORM app.ensure_partitions(1); END $$;

-- Change capture on the identity, workflow, credential and webhook tables ------------------------
CALL app.audit_capture('organizations');
CALL app.audit_capture('users');
CALL app.audit_capture('memberships');
CALL app.audit_capture('teams');
CALL app.audit_capture('team_members');
CALL app.audit_capture('api_keys');
CALL app.audit_capture('auth_tokens');
CALL app.audit_capture('workflows');
CALL app.audit_capture('workflow_versions');
CALL app.audit_capture('workflow_shares');
CALL app.audit_capture('credentials');
CALL app.audit_capture('webhooks');
