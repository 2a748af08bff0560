-- depends: 0027_knowledge_search
-- Change capture of a bulk statement in linear time. Every captured row moved the chain head
-- (an UPDATE of its app.audit_heads row), so a transaction changing n rows of one
-- organization made n versions of that row, and every later lock and update walked them:
-- inserting 8,000 workflows in one statement took 6.7 s, 100,000 about 20 minutes.
--
-- Now only the transaction's first change of an organization's chain moves the head; later
-- changes take their predecessor from the transaction's own newest row, and a deferred
-- constraint trigger moves the head to it once, at commit (or at SET CONSTRAINTS ..
-- IMMEDIATE; the next change then moves it again). The head row lock is still taken first,
-- FOR UPDATE, by every change. The transaction-local setting app.audit_changes_tail names
-- the newest row (organization/seq) so it is found by index probes, not a scan: a session
-- can set it, but it is used only when that row is the head or past it and has no
-- successor, i.e. when it is true (and the deferred trigger, not the setting, decides where
-- the head ends). A rolled-back subtransaction takes its rows, its
-- deferred events and the setting back together. A change is stamped no earlier than
-- now(), so a clock stepping back cannot hide the transaction's rows from the probes.
-- Same rows, same hashes, same chain.

-- At commit, per change row: moves the head to the transaction's newest row of the chain if
-- it is behind (one head lookup, then nothing, for the rows after the first).
CREATE FUNCTION app.audit_changes_head() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM app.audit_heads h
             WHERE h.org_id = NEW.org_id AND h.chain = 'changes' AND h.seq < NEW.seq) THEN
    UPDATE app.audit_heads h SET seq = d.seq, head = d.row_hash
    FROM (SELECT c.seq, c.row_hash FROM data_changes c
          WHERE c.org_id = NEW.org_id AND c.seq >= NEW.seq AND c.at >= now()
          ORDER BY c.seq DESC LIMIT 1) d
    WHERE h.org_id = NEW.org_id AND h.chain = 'changes' AND h.seq < d.seq;
  END IF;
  RETURN NULL;
END $$;
ALTER FUNCTION app.audit_changes_head() OWNER TO datalayer_maint;
REVOKE ALL ON FUNCTION app.audit_changes_head() FROM PUBLIC;
CREATE CONSTRAINT TRIGGER data_changes_head AFTER INSERT ON data_changes
  DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION app.audit_changes_head();

CREATE OR REPLACE PROCEDURE app.audit_capture(p_table text)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_rel regclass := to_regclass(format('public.%I', p_table));
  v_fn text := format('app.%I', 'audit_capture__' || p_table);
  v_pk_cols text[];
  v_org_col text;
  v_skip text[];
  v_personal text[];
  v_frameworks text;
  v_pk text;
  v_org text;
  v_all text;
  v_oldj text;
  v_newj text;
  v_changed_expr text;
  v_unchanged_expr text;
  v_split text;
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
  -- Every column (in jsonb key order: an insert lists them all as changed).
  SELECT quote_literal(array_agg(k)::text) || '::text[]' INTO v_all
  FROM jsonb_object_keys((SELECT jsonb_object_agg(attname, 1) FROM pg_attribute
                          WHERE attrelid = v_rel AND attnum > 0 AND NOT attisdropped)) k;
  -- The copied columns as jsonb of OLD and NEW (column by column: a skipped column, a
  -- search vector say, is never converted).
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
  -- Changed columns of an update, sorted by name (skipped ones included: named, not copied);
  -- and the unchanged copied ones, removed from the before/after copies.
  WITH cols AS (
    SELECT a.attname::text AS name, a.attname::text = ANY(v_skip) AS skipped,
           t.typname = 'citext' OR NOT EXISTS (
             SELECT 1 FROM pg_operator WHERE oprname = '='
             AND oprleft = a.atttypid AND oprright = a.atttypid) AS as_text
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = v_rel AND a.attnum > 0 AND NOT a.attisdropped
  ), ops AS (
    SELECT name, skipped, format(CASE WHEN as_text THEN 'OLD.%I::text' ELSE 'OLD.%I' END, name) AS l,
           format(CASE WHEN as_text THEN 'NEW.%I::text' ELSE 'NEW.%I' END, name) AS r
    FROM cols
  )
  SELECT 'array_remove(ARRAY[' || string_agg(
           format('CASE WHEN %s IS DISTINCT FROM %s THEN %L END', l, r, name),
           ', ' ORDER BY name) || ']::text[], NULL)',
         coalesce('array_remove(ARRAY[' || string_agg(
                    format('CASE WHEN %s IS NOT DISTINCT FROM %s THEN %L END', l, r, name),
                    ', ' ORDER BY name) FILTER (WHERE NOT skipped) || ']::text[], NULL)',
                  '''{}''::text[]')
  INTO v_changed_expr, v_unchanged_expr
  FROM ops;
  -- Personal columns this table has among its copied ones.
  SELECT array_agg(DISTINCT p.column_name ORDER BY p.column_name) INTO v_personal
  FROM app.personal_columns p
  JOIN pg_attribute a ON a.attrelid = v_rel AND a.attname = p.column_name
                     AND a.attnum > 0 AND NOT a.attisdropped
  WHERE p.table_name IN (p_table, '*') AND p.column_name <> ALL(v_skip);
  v_split := CASE WHEN v_personal IS NULL THEN '' ELSE format($s$
  IF (v_b ?| %1$s) OR (v_a ?| %1$s) THEN
    v_p := jsonb_strip_nulls(jsonb_build_object(
      'before', (SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(v_b) e
                 WHERE e.key = ANY(%1$s)),
      'after', (SELECT jsonb_object_agg(e.key, e.value) FROM jsonb_each(v_a) e
                WHERE e.key = ANY(%1$s))));
    v_b := v_b - %1$s;
    v_a := v_a - %1$s;
    v_salt := uuid_send(gen_random_uuid());
  END IF;$s$, quote_literal(v_personal::text) || '::text[]') END;
  v_frameworks := quote_literal(coalesce(
    (app.audit_classify('change.' || p_table, 'success')).frameworks, '{}')::text) || '::text[]';
  -- The primary key as jsonb, and the organization, of the row (new row; old for a delete).
  SELECT 'jsonb_build_object(' || string_agg(format('%L, v_r->%L', c, c), ', ') || ')'
  INTO v_pk FROM unnest(v_pk_cols) c;
  v_org := CASE WHEN v_org_col IS NULL THEN 'NULL::uuid'
                ELSE format('(v_r->>%L)::uuid', v_org_col) END;
  v_body := format($b$
DECLARE
  v_changed text[];
  v_unchanged text[];
  v_b jsonb;
  v_a jsonb;
  v_p jsonb;
  v_salt bytea;
  v_r jsonb;
  v_org uuid;
  v_seq bigint;
  v_prev bytea;
  v_pk jsonb;
  v_id uuid;
  v_at timestamptz;
  v_cmt bytea;
  v_hash bytea;
  v_actor uuid;
  v_request text;
  v_last bigint;
  v_more boolean;
BEGIN
  IF TG_OP = 'INSERT' THEN
    v_a := %5$s;
    v_changed := %8$s;
    v_r := v_a;
  ELSIF TG_OP = 'DELETE' THEN
    v_b := %6$s;
    v_r := v_b;
  ELSE
    v_changed := %7$s;
    IF cardinality(v_changed) = 0 THEN
      RETURN NULL;  -- an update that changed nothing
    END IF;
    v_unchanged := %9$s;
    v_r := %5$s;
    v_a := nullif(v_r - v_unchanged, '{}');
    v_b := nullif(%6$s - v_unchanged, '{}');
  END IF;%3$s
  v_org := coalesce(%1$s, app.org_id(), '00000000-0000-0000-0000-000000000000'::uuid);
  v_pk := %2$s;
  SELECT h.seq, h.head INTO v_seq, v_prev FROM app.audit_heads h
  WHERE h.org_id = v_org AND h.chain = 'changes' FOR UPDATE;
  IF NOT FOUND THEN
    SELECT t.first_seq - 1, t.prev INTO v_seq, v_prev FROM app.audit_take(v_org, 'changes', 0) t;
  END IF;
  -- Rows past the head are this transaction's own (it holds the head; committed ones moved
  -- it), numbered on from it and stamped at or after now() (which prunes the partitions).
  -- The tail setting names the newest: trusted only if that row is there and is the last.
  v_last := CASE WHEN split_part(current_setting('app.audit_changes_tail', true), '/', 1)
                      = v_org::text
                 THEN split_part(current_setting('app.audit_changes_tail', true), '/', 2)::bigint
            END;
  v_more := false;
  IF v_last >= v_seq AND NOT EXISTS (SELECT 1 FROM data_changes d WHERE d.org_id = v_org
                                     AND d.seq = v_last + 1 AND d.at >= now()) THEN
    IF v_last = v_seq THEN
      v_more := true;  -- the transaction's first change moved the head here
    ELSE
      SELECT d.row_hash INTO v_prev FROM data_changes d
      WHERE d.org_id = v_org AND d.seq = v_last AND d.at >= now();
      v_more := FOUND;
    END IF;
  END IF;
  IF v_more THEN
    v_seq := v_last;
  ELSIF EXISTS (SELECT 1 FROM data_changes d WHERE d.org_id = v_org AND d.seq = v_seq + 1
                AND d.at >= now()) THEN
    -- Rows past the head, but the tail names another organization's (changes interleaved).
    SELECT d.seq, d.row_hash INTO v_seq, v_prev FROM data_changes d
    WHERE d.org_id = v_org AND d.seq > v_seq AND d.at >= now()
    ORDER BY d.seq DESC LIMIT 1;
    v_more := true;
  ELSE
    SELECT h.seq, h.head INTO v_seq, v_prev FROM app.audit_heads h
    WHERE h.org_id = v_org AND h.chain = 'changes';
  END IF;
  v_seq := v_seq + 1;
  v_id := gen_random_uuid();
  v_at := greatest(clock_timestamp(), now());
  v_actor := app.user_id();
  v_request := app.request_id();
  v_cmt := app.audit_commit(v_salt, NULL, NULL, v_p);
  v_hash := app.audit_change_hash(v_prev, v_org, v_seq, v_id, v_at, TG_TABLE_NAME, v_pk, TG_OP,
                                  v_actor, v_request, v_changed, %4$s, v_b, v_a,
                                  v_cmt);
  -- The transaction's first change moves the head; later ones leave it to the deferred
  -- app.audit_changes_head (one more row version at commit, not one per change).
  WITH u AS (
    UPDATE app.audit_heads h SET seq = v_seq, head = v_hash
    WHERE NOT v_more AND h.org_id = v_org AND h.chain = 'changes'
  )
  INSERT INTO data_changes (org_id, seq, id, at, table_name, row_pk, op, actor_user_id,
                            request_id, changed_columns, frameworks, before, after, personal,
                            pii_salt, pii_commit, prev_hash, row_hash)
  VALUES (v_org, v_seq, v_id, v_at, TG_TABLE_NAME, v_pk, TG_OP, v_actor, v_request,
          v_changed, %4$s, v_b, v_a, v_p, v_salt, v_cmt, v_prev, v_hash);
  PERFORM set_config('app.audit_changes_tail', v_org::text || '/' || v_seq, true);
  RETURN NULL;
END
$b$, v_org, v_pk, v_split, v_frameworks, v_newj, v_oldj, v_changed_expr, v_all,
   v_unchanged_expr);
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

DO $$
DECLARE
  t text;
BEGIN
  FOR t IN SELECT a.table_name FROM app.audit_tables a ORDER BY 1 LOOP
    CALL app.audit_capture(t);
  END LOOP;
END $$;
