-- depends: 0015_audit
-- GDPR: consent records, the personal-data registry that drives subject export and
-- erasure, and masking of other users' personal fields for roles below admin.
--
-- The registry (app.personal_data) lists every table column that points at a user and
-- whose rows are about that user, with the row's organization column, the columns holding
-- personal data, the columns never exported (secrets), and what erasure does with the rows:
--   anonymize  keep the row, replace each personal column by a stable pseudonym
--              ('erased-<hash>'; an email-like column 'erased-<hash>@erased.invalid'),
--              or NULL when the column is nullable
--   delete     delete the rows (sessions, API keys, tokens, notifications, memberships)
--   keep       keep the rows untouched: they hold only the user's id (a pseudonym once the
--              profile is anonymized), e.g. workflows the user owns, executions they started
-- Columns that point at a user but are not data about them (memberships.invited_by: who
-- invited someone else) are listed in app.personal_data_exempt with the reason.
-- tests/test_gdpr.py fails when a table has a user-referencing column (a foreign key to
-- users or memberships, or a column named *user_id, *_by, owner_id, actor_id) in neither.
-- A later migration opts its table in with one INSERT INTO app.personal_data.
--
-- Export and erasure are SECURITY DEFINER functions (the app role cannot read other
-- users' notifications, web sessions or tokens) that scope every statement to the
-- organizations the caller may see: a tenant admin gets and erases the part in their
-- organization; the subject themself gets their own data; dl.system() everything.

CREATE TABLE app.personal_data (
  table_name       text NOT NULL,
  subject_column   text NOT NULL,
  -- 'id': subject_column holds the user id; 'email': it holds the user's email address
  match            text NOT NULL DEFAULT 'id' CONSTRAINT personal_data_match_known
                   CHECK (match IN ('id', 'email')),
  org_column       text,            -- NULL: a global table (no organization)
  columns          text[] NOT NULL DEFAULT '{}',
  secret_columns   text[] NOT NULL DEFAULT '{}',
  erase_action     text NOT NULL CONSTRAINT personal_data_action_known
                   CHECK (erase_action IN ('anonymize', 'delete', 'keep')),
  -- Global rows the subject's organizations already see (the users profile): exported to
  -- an admin of an organization the subject belongs to. Other global rows (sessions,
  -- tokens) go only to the subject and to maintenance.
  shared_with_org  boolean NOT NULL DEFAULT false,
  note             text NOT NULL DEFAULT '',
  PRIMARY KEY (table_name, subject_column),
  CONSTRAINT personal_data_shared_is_global CHECK (NOT shared_with_org OR org_column IS NULL)
);

CREATE TABLE app.personal_data_exempt (
  table_name   text NOT NULL,
  column_name  text NOT NULL,
  reason       text NOT NULL CONSTRAINT personal_data_exempt_reason CHECK (length(reason) > 10),
  PRIMARY KEY (table_name, column_name)
);
REVOKE ALL ON app.personal_data, app.personal_data_exempt FROM PUBLIC;
GRANT SELECT ON app.personal_data, app.personal_data_exempt TO datalayer_maint;

-- Consent records ---------------------------------------------------------------------------
-- Append-only: who (user_id) agreed to or withdrew from what (purpose) under which notice
-- version, where it was recorded (source) and by whom (recorded_by: the subject, or an admin
-- recording on their behalf). The current state of a purpose is its latest record. Not a
-- foreign key to memberships: the proof of consent outlives a membership and an erasure
-- (then it holds only the pseudonymous user id); the insert policy requires membership.
CREATE TABLE consents (
  org_id          uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id              uuid NOT NULL DEFAULT gen_random_uuid(),
  user_id         uuid NOT NULL,
  purpose         text NOT NULL
                  CONSTRAINT consents_purpose_format CHECK (purpose ~ '^[a-z0-9][a-z0-9_.:-]{0,99}$'),
  notice_version  text NOT NULL
                  CONSTRAINT consents_notice_version_length CHECK (length(notice_version) BETWEEN 1 AND 50),
  granted         boolean NOT NULL,
  source          text NOT NULL
                  CONSTRAINT consents_source_format CHECK (source ~ '^[a-z0-9][a-z0-9_.:-]{0,49}$'),
  recorded_by     uuid DEFAULT app.user_id(),
  at              timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (org_id, id)
);
-- Current state: DISTINCT ON (purpose) walks this index in order, one row per purpose.
CREATE INDEX consents_state_idx ON consents (org_id, user_id, purpose, at DESC, id DESC);

CREATE FUNCTION app.consents_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF TG_OP = 'DELETE'
     AND NOT EXISTS (SELECT 1 FROM organizations o WHERE o.id = OLD.org_id) THEN
    RETURN OLD;  -- the organization is being deleted: its records go with it
  END IF;
  RAISE EXCEPTION 'consent records are append-only; record a withdrawal instead'
    USING ERRCODE = 'insufficient_privilege';
END $$;
REVOKE ALL ON FUNCTION app.consents_append_only() FROM PUBLIC;
CREATE TRIGGER consents_append_only BEFORE UPDATE OR DELETE ON consents
  FOR EACH ROW EXECUTE FUNCTION app.consents_append_only();
CREATE TRIGGER consents_no_truncate BEFORE TRUNCATE ON consents
  FOR EACH STATEMENT EXECUTE FUNCTION app.consents_append_only();

ALTER TABLE consents ENABLE ROW LEVEL SECURITY;
ALTER TABLE consents FORCE ROW LEVEL SECURITY;
-- A user reads their own records; owners and admins read the organization's.
CREATE POLICY consents_select ON consents FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND (user_id = (SELECT app.user_id()) OR (SELECT app.role()) IN ('owner', 'admin')));
-- A user records their own consent (any role: consenting is self-service); an admin records
-- one for a member. The subject must be a member of the organization.
CREATE POLICY consents_insert ON consents FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND NOT (SELECT app.read_only())
              AND recorded_by IS NOT DISTINCT FROM (SELECT app.user_id())
              AND (user_id = (SELECT app.user_id()) OR (SELECT app.is_admin()))
              AND EXISTS (SELECT 1 FROM memberships m
                          WHERE m.org_id = (SELECT app.org_id()) AND m.user_id = consents.user_id));
GRANT SELECT, INSERT (org_id, id, user_id, purpose, notice_version, granted, source)
  ON consents TO datalayer_app;
-- Maintenance reads and imports, but does not rewrite history either.
REVOKE UPDATE, DELETE, TRUNCATE ON consents FROM datalayer_maint;

-- The registry --------------------------------------------------------------------------------
INSERT INTO app.personal_data (table_name, subject_column, match, org_column, columns,
                               secret_columns, erase_action, shared_with_org, note) VALUES
  ('users', 'id', 'id', NULL,
   '{email, display_name, first_name, last_name, preferences, password_hash, totp_secret, totp_enabled_at, totp_last_step, recovery_codes, last_login_at}',
   '{password_hash, totp_secret, totp_last_step, recovery_codes}', 'anonymize', true,
   'the profile; erased only when the subject is erased everywhere (see app.gdpr_erase_in)');
INSERT INTO app.personal_data (table_name, subject_column, match, org_column, columns,
                               secret_columns, erase_action, note) VALUES
  ('memberships', 'user_id', 'id', 'org_id', '{}', '{}', 'delete',
   'the subject leaves the organization; team memberships, shares to them, their API keys and notifications go with it (foreign keys)'),
  ('team_members', 'user_id', 'id', 'org_id', '{}', '{}', 'delete', ''),
  ('api_keys', 'user_id', 'id', 'org_id', '{name}', '{key_hash}', 'delete', 'revoked by deletion'),
  ('auth_tokens', 'user_id', 'id', NULL, '{}', '{token_hash}', 'delete',
   'email verification and password reset tokens'),
  ('auth_tokens', 'email', 'email', 'org_id', '{email}', '{token_hash}', 'delete',
   'invitations to the subject''s address'),
  ('web_sessions', 'user_id', 'id', NULL, '{data}', '{id_hash}', 'delete', 'signed out everywhere'),
  ('notifications', 'user_id', 'id', 'org_id', '{title, message, data}', '{}', 'delete', ''),
  ('workflow_shares', 'user_id', 'id', 'org_id', '{}', '{}', 'delete', 'shares to the subject'),
  ('workflow_shares', 'created_by', 'id', 'org_id', '{}', '{}', 'keep', 'shares the subject granted'),
  ('workflows', 'owner_id', 'id', 'org_id', '{}', '{content_hash}', 'keep',
   'workflows they own stay with the organization (an admin transfers them)'),
  ('workflow_versions', 'created_by', 'id', 'org_id', '{}', '{content_hash}', 'keep', ''),
  ('executions', 'created_by', 'id', 'org_id', '{}', '{}', 'keep', 'executions they started'),
  ('execution_transitions', 'actor_id', 'id', 'org_id', '{}', '{}', 'keep', ''),
  ('credentials', 'created_by', 'id', 'org_id', '{}', '{secret}', 'keep', ''),
  ('credential_access', 'actor_id', 'id', 'org_id', '{}', '{}', 'keep', 'their credential decrypts'),
  ('webhooks', 'created_by', 'id', 'org_id', '{}', '{secret, path_token_hash}', 'keep', ''),
  ('consents', 'user_id', 'id', 'org_id', '{}', '{}', 'keep',
   'proof of consent outlives the erasure, under the pseudonymous id'),
  ('consents', 'recorded_by', 'id', 'org_id', '{}', '{}', 'keep', 'consents they recorded');

INSERT INTO app.personal_data_exempt (table_name, column_name, reason) VALUES
  ('memberships', 'invited_by', 'who invited another member: the row is about the invitee'),
  ('auth_tokens', 'created_by', 'who sent an invitation: the row is about the invitee''s address'),
  -- The audit trail (schema/0015_audit.sql, the other half of this issue; rows naming tables
  -- that do not exist are inert): exported by the export's audit hook and redacted by
  -- app.audit_redact_subject, not by the generic registry statements.
  ('audit_events', 'actor_user_id', 'the audit trail: exported and redacted by the audit hooks'),
  ('audit_events', 'subject_user_id', 'the audit trail: exported and redacted by the audit hooks'),
  ('data_changes', 'actor_user_id', 'the audit trail: redacted by app.audit_redact_subject'),
  ('audit_legal_holds', 'set_by', 'who set a legal hold: the row is about the organization');

-- The audit trail's change capture (schema/0015_audit.sql, when present) keeps personal
-- columns out of before/after, in a redactable part, by its own list app.personal_columns:
-- every personal column of this registry belongs there too (secrets excluded: those are
-- never copied at all). A later migration that registers a table here adds its columns
-- there in the same way.
DO $$
BEGIN
  IF to_regclass('app.personal_columns') IS NOT NULL THEN
    EXECUTE $sql$
      INSERT INTO app.personal_columns (table_name, column_name)
      SELECT DISTINCT p.table_name, c
      FROM app.personal_data p CROSS JOIN LATERAL unnest(p.columns) AS c
      WHERE c <> ALL (p.secret_columns)
        AND NOT EXISTS (SELECT 1 FROM app.secret_columns s
                        WHERE s.table_name = p.table_name AND s.column_name = c)
      ON CONFLICT DO NOTHING $sql$;
  END IF;
END $$;

-- Pseudonyms and masking ------------------------------------------------------------------------
-- The stable pseudonym of an erased user: the same for every run (erasure is idempotent) and
-- not reversible to anything but the user id, which the rows keep anyway.
CREATE FUNCTION app.gdpr_pseudonym(p_user uuid) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$ SELECT 'erased-' || left(encode(sha256(convert_to(p_user::text, 'UTF8')), 'hex'), 16) $$;

-- 'alice@example.com' -> 'a***@example.com'; anything without an @ -> '***'.
CREATE FUNCTION app.mask_email(p_email text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT CASE WHEN p_email IS NULL THEN NULL
              WHEN position('@' IN p_email) > 1
              THEN left(p_email, 1) || '***' || substring(p_email FROM position('@' IN p_email))
              ELSE '***' END
$$;

-- IPv4 to its /24, IPv6 to its /48, as text: '192.0.2.0/24'.
CREATE FUNCTION app.mask_ip(p_ip inet) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT CASE WHEN p_ip IS NULL THEN NULL
              ELSE host(network(set_masklen(p_ip, CASE WHEN family(p_ip) = 4 THEN 24 ELSE 48 END)))
                   || CASE WHEN family(p_ip) = 4 THEN '/24' ELSE '/48' END END
$$;

-- Does the context see user p_subject's personal fields unmasked? Themself, and the owners
-- and admins of the context organization (read-only sessions included: this is a read).
CREATE FUNCTION app.sees_personal_data(p_subject uuid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT p_subject IS NOT DISTINCT FROM app.user_id() AND p_subject IS NOT NULL
      OR (app.org_id() IS NOT NULL AND app.role() IN ('owner', 'admin'))
$$;

-- For views and queries over personal fields of other users (audit trails, member lists):
-- the value itself, or its mask when the context may not see it.
CREATE FUNCTION app.visible_email(p_email text, p_subject uuid) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE WHEN app.sees_personal_data(p_subject) THEN p_email ELSE app.mask_email(p_email) END $$;

CREATE FUNCTION app.visible_ip(p_ip inet, p_subject uuid) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$ SELECT CASE WHEN app.sees_personal_data(p_subject) THEN host(p_ip) ELSE app.mask_ip(p_ip) END $$;

-- The organization's live members with emails masked for roles below admin (their own row
-- unmasked). Invoker rights: the memberships and users policies apply as usual.
CREATE VIEW org_members_masked WITH (security_invoker = true) AS
SELECT m.org_id, m.user_id, m.role, u.display_name,
       app.visible_email(u.email, m.user_id) AS email,
       u.status, m.created_at AS joined_at
FROM memberships m
JOIN users u ON u.id = m.user_id AND u.deleted_at IS NULL
WHERE m.org_id = (SELECT app.org_id());
GRANT SELECT ON org_members_masked TO datalayer_app;

-- Export ----------------------------------------------------------------------------------------
-- The registry's rows about p_user: in the organizations p_orgs (NULL: every organization),
-- plus global rows when p_global (or the shared ones when p_shared). Secret columns are
-- removed from each row. Internal: callers below decide the scope.
CREATE FUNCTION app.gdpr_rows(p_user uuid, p_orgs uuid[], p_global boolean, p_shared boolean)
RETURNS TABLE (table_name text, subject_column text, org_id uuid, data jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  r app.personal_data%ROWTYPE;
  v_email text;
  v_where text;
BEGIN
  SELECT u.email INTO v_email FROM users u WHERE u.id = p_user;
  FOR r IN SELECT * FROM app.personal_data ORDER BY 1, 2 LOOP
    IF r.org_column IS NULL AND NOT (p_global OR (p_shared AND r.shared_with_org)) THEN
      CONTINUE;
    END IF;
    IF r.match = 'email' THEN
      CONTINUE WHEN v_email IS NULL;
      v_where := format('lower(t.%I) = lower($3)', r.subject_column);
    ELSE
      v_where := format('t.%I = $1', r.subject_column);
    END IF;
    IF r.org_column IS NOT NULL AND p_orgs IS NOT NULL THEN
      v_where := v_where || format(' AND t.%I = ANY ($2)', r.org_column);
    END IF;
    RETURN QUERY EXECUTE format(
      'SELECT %L::text, %L::text, %s, to_jsonb(t) - $4 FROM %s t WHERE %s',
      r.table_name, r.subject_column,
      CASE WHEN r.org_column IS NULL THEN 'NULL::uuid' ELSE format('t.%I', r.org_column) END,
      r.table_name::regclass, v_where)
      USING p_user, p_orgs, v_email, r.secret_columns;
  END LOOP;
END $$;

-- Tenant sessions. The subject themself: without an organization context, their data in
-- every organization they belong to plus their global rows; with one, that organization's
-- part plus their global rows. An owner or admin: their organization's part, plus the
-- profile when the subject is a member. Anyone else: insufficient_privilege.
CREATE FUNCTION app.gdpr_export(p_user uuid)
RETURNS TABLE (table_name text, subject_column text, org_id uuid, data jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_org uuid := app.org_id();
  v_self boolean := p_user IS NOT DISTINCT FROM app.user_id() AND p_user IS NOT NULL;
BEGIN
  IF v_org IS NULL THEN
    IF NOT v_self THEN
      RAISE EXCEPTION 'without an organization context only the subject may export their data'
        USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY SELECT * FROM app.gdpr_rows(
      p_user, ARRAY(SELECT m.org_id FROM memberships m WHERE m.user_id = p_user), true, true);
    RETURN;
  END IF;
  IF NOT v_self AND app.role() IS DISTINCT FROM 'owner' AND app.role() IS DISTINCT FROM 'admin' THEN
    RAISE EXCEPTION 'only an organization admin or the subject may export personal data'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN QUERY SELECT * FROM app.gdpr_rows(
    p_user, ARRAY[v_org], v_self,
    EXISTS (SELECT 1 FROM memberships m WHERE m.org_id = v_org AND m.user_id = p_user));
END $$;

-- Maintenance (dl.system()): everything, every organization.
CREATE FUNCTION app.gdpr_export_all(p_user uuid)
RETURNS TABLE (table_name text, subject_column text, org_id uuid, data jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$ SELECT * FROM app.gdpr_rows(p_user, NULL, true, true) $$;

-- Erasure ---------------------------------------------------------------------------------------
-- AUDIT HOOK: once the audit trail exists (schema/0015_audit.sql, the other half of this
-- issue), redact p_user from it in each organization of p_orgs; NULL when it does not exist.
-- Dynamic SQL: nothing here depends on it. app.audit_redact_subject(org, user) also covers
-- the chain of rows without an organization (the zero uuid), used alone when p_orgs is empty.
-- It finds change rows by the subject's ids and by their email addresses, current (users)
-- and historic (captured users rows): so app.gdpr_erase_in calls it before it anonymizes
-- the profile, and once more after, for the change rows the anonymization wrote.
CREATE FUNCTION app.gdpr_redact_audit(p_user uuid, p_orgs uuid[]) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_org uuid;
  v_n bigint;
  v_total bigint := 0;
BEGIN
  IF to_regprocedure('app.audit_redact_subject(uuid, uuid)') IS NULL THEN
    RETURN NULL;
  END IF;
  FOR v_org IN SELECT DISTINCT o
               FROM unnest(CASE WHEN cardinality(p_orgs) > 0 THEN p_orgs
                                ELSE ARRAY['00000000-0000-0000-0000-000000000000'::uuid] END) AS o
               WHERE o IS NOT NULL ORDER BY 1 LOOP
    EXECUTE 'SELECT app.audit_redact_subject($1, $2)::bigint' INTO v_n USING v_org, p_user;
    v_total := v_total + coalesce(v_n, 0);
  END LOOP;
  RETURN v_total;
END $$;

-- Erase p_user's personal data in organization p_org (NULL: every organization), live and
-- soft-deleted rows alike, following the registry: anonymize first, then delete
-- (memberships last, as their foreign keys take dependent rows along). Global rows (the
-- profile, web sessions, user tokens) are erased when p_org is NULL, or when the subject
-- is a member of p_org and of no other organization. Returns what was done per registry
-- entry (rows affected, entries with none left out). Raises, and so undoes everything,
-- when a guard refuses (e.g. the subject is the last owner of an organization).
CREATE FUNCTION app.gdpr_erase_in(p_user uuid, p_org uuid)
RETURNS TABLE (table_name text, subject_column text, action text, affected bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  r app.personal_data%ROWTYPE;
  v_global boolean;
  v_email text;
  v_pseud text := app.gdpr_pseudonym(p_user);
  v_where text;
  v_set text;
  v_bad text;
  v_n bigint;
  v_orgs uuid[];
  v_more uuid[];
  v_redacted boolean := false;
  v_audit bigint;
BEGIN
  -- One erasure of a subject at a time (a concurrent second one waits, then finds it done).
  PERFORM pg_advisory_xact_lock(hashtext('datalayer.gdpr_erase'), hashtext(p_user::text));
  v_global := p_org IS NULL
    OR (EXISTS (SELECT 1 FROM memberships m WHERE m.org_id = p_org AND m.user_id = p_user)
        AND NOT EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = p_user AND m.org_id <> p_org));
  SELECT u.email INTO v_email FROM users u WHERE u.id = p_user;
  -- AUDIT HOOK: the organizations whose audit trail to redact, found before the
  -- memberships and invitations go: p_org, or every organization the subject belongs to,
  -- was invited to, or appears in the audit trail of.
  IF p_org IS NOT NULL THEN
    v_orgs := ARRAY[p_org];
  ELSE
    v_orgs := ARRAY(SELECT m.org_id FROM memberships m WHERE m.user_id = p_user
                    UNION
                    SELECT a.org_id FROM auth_tokens a
                    WHERE a.kind = 'invitation' AND lower(a.email) = lower(v_email));
    IF to_regclass('public.audit_events') IS NOT NULL THEN
      EXECUTE 'SELECT array_agg(DISTINCT e.org_id) FROM audit_events e '
              'WHERE e.actor_user_id = $1 OR e.subject_user_id = $1' INTO v_more USING p_user;
      v_orgs := v_orgs || coalesce(v_more, '{}');
    END IF;
  END IF;
  FOR r IN SELECT * FROM app.personal_data pd
           WHERE pd.erase_action <> 'keep'
           ORDER BY pd.table_name = 'users', pd.erase_action = 'delete',
                    pd.table_name = 'memberships', 1, 2 LOOP
    IF r.org_column IS NULL AND NOT v_global THEN
      CONTINUE;
    END IF;
    IF r.table_name = 'users' AND NOT v_redacted THEN
      -- AUDIT HOOK: while the profile still holds the addresses redaction looks for.
      v_audit := app.gdpr_redact_audit(p_user, v_orgs);
      v_redacted := true;
    END IF;
    IF r.match = 'email' THEN
      CONTINUE WHEN v_email IS NULL;
      v_where := format('lower(%I) = lower($3)', r.subject_column);
    ELSE
      v_where := format('%I = $1', r.subject_column);
    END IF;
    IF r.org_column IS NOT NULL AND p_org IS NOT NULL THEN
      v_where := v_where || format(' AND %I = $2', r.org_column);
    END IF;
    IF r.erase_action = 'delete' THEN
      EXECUTE format('DELETE FROM %s WHERE %s', r.table_name::regclass, v_where)
        USING p_user, p_org, v_email;
    ELSE
      -- Each personal column: an email-like text column gets the pseudonym address, another
      -- NOT NULL text the pseudonym, NOT NULL json '{}', arrays '{}', inet 0.0.0.0; a
      -- nullable column NULL.
      SELECT string_agg(format('%I = %s', a.attname, CASE
               WHEN t.typname IN ('text', 'varchar', 'citext', 'bpchar') AND a.attname ~ 'email'
                 THEN quote_literal(v_pseud || '@erased.invalid')
               WHEN NOT a.attnotnull THEN 'NULL'
               WHEN t.typname IN ('text', 'varchar', 'citext', 'bpchar') THEN quote_literal(v_pseud)
               WHEN t.typname IN ('json', 'jsonb') OR t.typcategory = 'A' THEN '''{}'''
               WHEN t.typname = 'inet' THEN '''0.0.0.0'''
             END), ', ' ORDER BY a.attnum),
             string_agg(c.name, ', ') FILTER (WHERE a.attname IS NULL OR a.attgenerated <> '')
        INTO v_set, v_bad
      FROM unnest(r.columns) AS c (name)
      LEFT JOIN pg_attribute a ON a.attrelid = r.table_name::regclass AND a.attname = c.name
                              AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_type t ON t.oid = a.atttypid;
      IF v_bad IS NOT NULL OR v_set IS NULL OR v_set ~ '= (,|$)' THEN
        RAISE EXCEPTION 'app.personal_data entry %.% names columns erasure cannot anonymize: %',
          r.table_name, r.subject_column, coalesce(v_bad, 'none listed')
          USING ERRCODE = 'invalid_parameter_value';
      END IF;
      EXECUTE format('UPDATE %s SET %s WHERE %s', r.table_name::regclass, v_set, v_where)
        USING p_user, p_org, v_email;
    END IF;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    IF v_n > 0 THEN
      table_name := r.table_name; subject_column := r.subject_column;
      action := r.erase_action; affected := v_n;
      RETURN NEXT;
    END IF;
  END LOOP;
  IF v_global THEN
    -- The account itself: closed (a pseudonymous row stays for the references to it).
    UPDATE users SET deleted_at = coalesce(deleted_at, now()), status = 'suspended'
    WHERE id = p_user AND (deleted_at IS NULL OR status <> 'suspended');
  END IF;
  -- AUDIT HOOK: the rest (or all, when the profile stayed), and the change rows the
  -- profile's anonymization just wrote. Reported as ('audit', 'redact_subject', 'redact', n).
  IF NOT v_redacted THEN
    v_audit := app.gdpr_redact_audit(p_user, v_orgs);
  ELSE
    v_audit := v_audit + app.gdpr_redact_audit(p_user, v_orgs[1:1]);
  END IF;
  IF v_audit IS NOT NULL THEN
    table_name := 'audit'; subject_column := 'redact_subject'; action := 'redact';
    affected := v_audit;
    RETURN NEXT;
  END IF;
END $$;

-- Tenant sessions: an owner or admin erases a subject's data in their organization.
CREATE FUNCTION app.gdpr_erase(p_user uuid)
RETURNS TABLE (table_name text, subject_column text, action text, affected bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
  IF app.org_id() IS NULL OR NOT app.is_admin() THEN
    RAISE EXCEPTION 'only an organization admin may erase personal data'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF p_user IS NULL THEN
    RAISE EXCEPTION 'the subject of an erasure is required' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  -- As with removing a member (memberships_delete): only an owner removes an owner.
  IF NOT app.is_owner() AND EXISTS (SELECT 1 FROM memberships m WHERE m.org_id = app.org_id()
                                     AND m.user_id = p_user AND m.role = 'owner') THEN
    RAISE EXCEPTION 'only an owner may erase an owner' USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN QUERY SELECT * FROM app.gdpr_erase_in(p_user, app.org_id());
END $$;

-- Maintenance (dl.system()): erase everywhere.
CREATE FUNCTION app.gdpr_erase_all(p_user uuid)
RETURNS TABLE (table_name text, subject_column text, action text, affected bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
  IF p_user IS NULL THEN
    RAISE EXCEPTION 'the subject of an erasure is required' USING ERRCODE = 'null_value_not_allowed';
  END IF;
  RETURN QUERY SELECT * FROM app.gdpr_erase_in(p_user, NULL);
END $$;

DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY[
    'app.gdpr_rows(uuid, uuid[], boolean, boolean)', 'app.gdpr_export(uuid)',
    'app.gdpr_redact_audit(uuid, uuid[])',
    'app.gdpr_export_all(uuid)', 'app.gdpr_erase_in(uuid, uuid)', 'app.gdpr_erase(uuid)',
    'app.gdpr_erase_all(uuid)', 'app.gdpr_pseudonym(uuid)', 'app.mask_email(text)',
    'app.mask_ip(inet)', 'app.sees_personal_data(uuid)', 'app.visible_email(text, uuid)',
    'app.visible_ip(inet, uuid)']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END $$;
GRANT EXECUTE ON FUNCTION app.gdpr_export(uuid), app.gdpr_erase(uuid),
                          app.gdpr_pseudonym(uuid), app.mask_email(text), app.mask_ip(inet),
                          app.sees_personal_data(uuid), app.visible_email(text, uuid),
                          app.visible_ip(inet, uuid)
  TO datalayer_app, datalayer_maint;
GRANT EXECUTE ON FUNCTION app.gdpr_export_all(uuid), app.gdpr_erase_all(uuid),
                          app.gdpr_rows(uuid, uuid[], boolean, boolean),
                          app.gdpr_erase_in(uuid, uuid), app.gdpr_redact_audit(uuid, uuid[])
  TO datalayer_maint;
