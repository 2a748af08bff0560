-- Undo 0015_audit: capture triggers, audit tables and functions; the partition helpers of
-- 0008_executions as they were.
DO $$
DECLARE
  t text;
BEGIN
  FOR t IN SELECT table_name FROM app.audit_tables LOOP
    IF to_regclass(format('public.%I', t)) IS NOT NULL THEN
      EXECUTE format('DROP TRIGGER IF EXISTS audit_capture ON public.%I', t);
    END IF;
    EXECUTE format('DROP FUNCTION IF EXISTS app.%I()', 'audit_capture__' || t);
  END LOOP;
END $$;
DROP FUNCTION app.audit_registry_changed() CASCADE;
DROP TRIGGER credential_access_audit ON credential_access;
DROP TRIGGER executions_audit_cancel ON executions;
DROP TRIGGER executions_audit_retry ON executions;
DROP TABLE audit_events;
DROP TABLE data_changes;
DROP TABLE audit_retention_policies;
DROP TABLE app.audit_retention_defaults;
DROP TABLE audit_legal_holds;
DROP TABLE audit_retention_log;
DROP PROCEDURE app.audit_capture(text);
DROP PROCEDURE app.audit_uncapture(text);
DROP FUNCTION app.audit_events_before_insert();
DROP FUNCTION app.audit_events_after_insert();
DROP FUNCTION app.audit_credential_access();
DROP FUNCTION app.audit_execution_control();
DROP FUNCTION app.audit_auth_event(uuid, text, text, inet, text, jsonb);
DROP FUNCTION app.audit_redact_subject(uuid, uuid);
DROP FUNCTION app.audit_retention_cut(uuid, text);
DROP FUNCTION app.audit_retention_delete(uuid, text, bigint, integer);
DROP FUNCTION app.audit_retention_drop(text, jsonb);
DROP FUNCTION app.audit_partitions();
DROP FUNCTION app.audit_keep_days(uuid, text, text[]);
DROP FUNCTION app.audit_take(uuid, text, integer);
DROP FUNCTION app.audit_guard();
DROP FUNCTION app.audit_no_truncate();
DROP FUNCTION app.audit_bypass();
DROP FUNCTION app.audit_event_hash(bytea, uuid, bigint, uuid, timestamptz, text, text, text,
                                   text[], uuid, uuid, text, text, text, jsonb, bytea);
DROP FUNCTION app.audit_change_hash(bytea, uuid, bigint, uuid, timestamptz, text, jsonb, text,
                                    uuid, text, text[], text[], jsonb, jsonb, bytea);
DROP FUNCTION app.audit_commit(bytea, inet, text, jsonb);
DROP FUNCTION app.epoch_us(timestamptz);
DROP FUNCTION app.audit_risk(text, text);
DROP FUNCTION app.audit_classify(text, text);
DROP TABLE app.audit_heads;
DROP TABLE app.audit_rules;
DROP TABLE app.audit_tables;
DROP TABLE app.personal_columns;
DROP TABLE app.audit_omit_columns;
DROP TABLE app.secret_columns;
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
  -- One maintainer at a time (workers call this on start): the others then find it done.
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
      -- Rows of this month that went to the default partition move into the new one.
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
      RETURN NEXT v_name;
    END LOOP;
  END LOOP;
END $$;

-- Retention: drop every monthly partition of the managed tables that ends on or before
-- p_before, and delete the default partitions' rows older than it. Refuses to reach into the
-- current month. Returns the partitions dropped.
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
  END IF;
  RETURN QUERY SELECT k.org_id, k.id, k.user_id, k.role, k.scopes;
END $$;
