-- depends: 0018_analytics
-- Search: one tenant-scoped full-text search over workflows, templates, execution errors and
-- notifications (app.search), with prefix matching, ranking, snippets and a typo-tolerant
-- trigram fallback when pg_trgm is installed.
--
-- Why a SECURITY DEFINER function: under RLS, `@@` (and pg_trgm's `%`, `<%`) are not
-- LEAKPROOF, so in a tenant session the planner may not use them as index conditions before
-- the policy's quals; every search would filter the whole organization row by row. The
-- function runs as datalayer_maint (BYPASSRLS), so the GIN indexes are used, and it applies
-- the tenant boundary itself, explicitly: org_id = app.org_id() on every kind (no context:
-- no rows), plus each kind's own read rule (mirroring its table's SELECT policy): workflow
-- visibility and shares, a notification's recipient. tests/test_search.py checks both
-- against RLS, adversarially.
--
-- Kinds are declared in one place, the view app.search_documents: one UNION ALL branch per
-- kind with the same columns (kind, org_id, id, doc, title, body, updated_at) and that kind's
-- read rule in its WHERE. The planner pushes the function's org, kind and match conditions
-- into each branch, where they meet that table's composite GIN index (org_id, tsvector).
-- Adding a kind = a stored tsvector column and a GIN index on its table, and one branch
-- here (README: "Search").

-- Extensions: btree_gin (org_id inside GIN indexes) and pg_trgm (the fuzzy fallback). Both
-- are optional: without them the indexes are plain and the fallback is off.
DO $$ BEGIN
  CREATE EXTENSION IF NOT EXISTS btree_gin;
EXCEPTION WHEN OTHERS THEN
  RAISE NOTICE 'btree_gin is not available (%): search indexes without org_id', SQLERRM;
END $$;
DO $$ BEGIN
  CREATE EXTENSION IF NOT EXISTS pg_trgm;
EXCEPTION WHEN OTHERS THEN
  RAISE NOTICE 'pg_trgm is not available (%): no typo-tolerant search', SQLERRM;
END $$;

-- Search vectors -------------------------------------------------------------------------------
-- workflows.search exists (0007): name A, description B, tags C.
-- Execution errors: the message (A) and the status reason (B), only for executions with an
-- error (NULL otherwise: nothing to index, nothing to compute for successful runs).
ALTER TABLE executions ADD COLUMN error_search tsvector GENERATED ALWAYS AS (
  CASE WHEN error IS NULL THEN NULL ELSE
    setweight(to_tsvector('simple'::regconfig, coalesce(error ->> 'message', '')), 'A')
    || setweight(to_tsvector('simple'::regconfig, coalesce(status_reason, '')), 'B') END
) STORED;
ALTER TABLE notifications ADD COLUMN search tsvector GENERATED ALWAYS AS (
  setweight(to_tsvector('simple'::regconfig, title), 'A')
  || setweight(to_tsvector('simple'::regconfig, message), 'B')
) STORED;

-- Indexes: execution errors and notifications by (org_id, vector) when btree_gin is there,
-- so a search touches one organization's postings; the vector alone otherwise (org_id is
-- then checked on the heap rows).
DO $$
DECLARE
  v_btree boolean := EXISTS (SELECT FROM pg_extension WHERE extname = 'btree_gin');
  v_trgm boolean := EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_trgm');
  v_org text := CASE WHEN v_btree THEN 'org_id, ' ELSE '' END;
BEGIN
  -- Workflows: the word alone, not (org_id, search). Measured at 100,000 workflows of one
  -- organization, a 5-letter prefix matching 1,250: the composite index reads the
  -- organization's whole org_id posting list (4.2 ms), the plain one the word's (0.4 ms),
  -- and the planner preferred the composite one. The organization is checked on the heap
  -- row. Templates have their own small index, so that the template branch does not visit
  -- every matching workflow's page to find the few templates among them. fastupdate off:
  -- workflows are written rarely and read often, and a pending list is scanned by every
  -- search until (auto)vacuum merges it.
  DROP INDEX workflows_search_idx;
  CREATE INDEX workflows_search_idx ON workflows USING gin (search)
    WITH (fastupdate = off) WHERE deleted_at IS NULL AND NOT is_template;
  CREATE INDEX workflows_template_search_idx ON workflows USING gin (search)
    WITH (fastupdate = off) WHERE deleted_at IS NULL AND is_template;
  EXECUTE format('CREATE INDEX executions_error_search_idx ON executions '
                 'USING gin (%serror_search) WHERE error_search IS NOT NULL', v_org);
  EXECUTE format('CREATE INDEX notifications_search_idx ON notifications '
                 'USING gin (%ssearch)', v_org);
  IF v_trgm THEN
    CREATE INDEX workflows_name_trgm_idx ON workflows USING gin (name gin_trgm_ops)
      WHERE deleted_at IS NULL;
  END IF;
END $$;

-- The tsquery of user text, built without parsing the text as tsquery syntax: its words are
-- the lexemes to_tsvector('simple') finds (operators, quotes and colons are separators
-- there), each quoted and escaped, each a prefix (type-ahead), AND-ed in order of
-- appearance. At most 8 words of the first 200 characters. NULL when there is no word.
CREATE FUNCTION app.search_tsquery(p_text text) RETURNS tsquery
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT string_agg('''' || replace(replace(t.lexeme, '\', '\\'), '''', '''''') || ''':*',
                    ' & ' ORDER BY t.pos)::tsquery
  FROM (SELECT u.lexeme, u.positions[1] AS pos
        FROM unnest(to_tsvector('simple'::regconfig, left(coalesce(p_text, ''), 200))) u
        ORDER BY u.positions[1] LIMIT 8) t
$$;

-- The searchable documents, one branch per kind (see the header). Owned by the maintenance
-- role; only app.search reads it.
CREATE VIEW app.search_documents WITH (security_invoker = true) AS
SELECT 'workflow'::text AS kind, w.org_id, w.id, w.search AS doc, w.name AS title,
       w.description AS body, w.updated_at
FROM workflows w
WHERE w.deleted_at IS NULL AND NOT w.is_template
  AND (w.visibility IN ('organization', 'public')
       OR w.owner_id = (SELECT app.user_id())
       OR (SELECT app.role()) IN ('owner', 'admin')
       OR (w.visibility = 'team' AND w.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))
       OR EXISTS (SELECT 1 FROM workflow_shares s
                  WHERE s.org_id = w.org_id AND s.workflow_id = w.id
                    AND (s.user_id = (SELECT app.user_id()) OR s.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))))
UNION ALL
SELECT 'template', w.org_id, w.id, w.search, w.name, w.description, w.updated_at
FROM workflows w
WHERE w.deleted_at IS NULL AND w.is_template
  AND (w.visibility IN ('organization', 'public')
       OR w.owner_id = (SELECT app.user_id())
       OR (SELECT app.role()) IN ('owner', 'admin')
       OR (w.visibility = 'team' AND w.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))
       OR EXISTS (SELECT 1 FROM workflow_shares s
                  WHERE s.org_id = w.org_id AND s.workflow_id = w.id
                    AND (s.user_id = (SELECT app.user_id()) OR s.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))))
UNION ALL
SELECT 'execution', e.org_id, e.id, e.error_search, 'Execution ' || e.status,
       coalesce(e.error ->> 'message', '') || coalesce(' (' || e.status_reason || ')', ''),
       e.updated_at
FROM executions e
WHERE e.error_search IS NOT NULL
UNION ALL
SELECT 'notification', n.org_id, n.id, n.search, n.title, n.message, n.created_at
FROM notifications n
WHERE n.user_id = (SELECT app.user_id()) AND (n.expires_at IS NULL OR n.expires_at > now());

CREATE FUNCTION app.search(p_text text, p_kinds text[], p_limit integer, p_fuzzy boolean)
RETURNS TABLE (kind text, id uuid, title text, snippet text, rank real, fuzzy boolean,
               updated_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
-- Typo tolerance: 0.4 lets "slak notifcation" find "Slack notification sender" (0.57).
SET pg_trgm.word_similarity_threshold = 0.4 AS $$
DECLARE
  v_org uuid := app.org_id();
  v_query tsquery := app.search_tsquery(p_text);
  v_limit integer := least(greatest(coalesce(p_limit, 20), 1), 100);
  v_found integer;
BEGIN
  IF v_org IS NULL OR v_query IS NULL THEN
    RETURN;  -- no tenant context, or no word to search for
  END IF;
  -- Per kind, at most 100 candidates (in index order, i.e. physical order) are ranked: a
  -- very broad query (a short prefix matching thousands of rows) is ranked among those; a
  -- more specific one among all its matches. Each kind is one LATERAL pass over its branch of
  -- app.search_documents (the others are gated off), through that table's GIN index.
  RETURN QUERY
  SELECT h.kind, h.id, h.title,
         ts_headline('simple'::regconfig, h.title || ' — ' || left(h.body, 2000), v_query,
                     'MaxWords=20, MinWords=8, MaxFragments=2, StartSel=<b>, StopSel=</b>'),
         h.rank, false, h.updated_at
  FROM (SELECT c.kind, c.id, c.title, c.body, c.updated_at,
               ts_rank_cd(c.doc, v_query) AS rank
        FROM unnest(p_kinds) AS k (kind)
        CROSS JOIN LATERAL (SELECT d.kind, d.id, d.title, d.body, d.updated_at, d.doc
                            FROM app.search_documents d
                            WHERE d.kind = k.kind AND d.org_id = v_org AND d.doc @@ v_query
                            LIMIT 100) c
        ORDER BY rank DESC, c.id
        LIMIT v_limit) h
  ORDER BY h.rank DESC, h.id;
  GET DIAGNOSTICS v_found = ROW_COUNT;
  IF v_found > 0 OR NOT p_fuzzy OR NOT p_kinds && ARRAY['workflow', 'template'] THEN
    RETURN;
  END IF;
  -- Nothing matched: names similar to the text, word by word (pg_trgm's <%; only reached
  -- when the caller detected the extension).
  RETURN QUERY
  SELECT h.kind, h.id, h.title, h.title, h.sim, true, h.updated_at
  FROM (SELECT CASE WHEN w.is_template THEN 'template' ELSE 'workflow' END AS kind, w.id,
               w.name AS title, word_similarity(left(p_text, 200), w.name)::real AS sim,
               w.updated_at
        FROM workflows w
        WHERE w.org_id = v_org AND w.deleted_at IS NULL
          AND left(p_text, 200) <% w.name
          AND (w.visibility IN ('organization', 'public')
               OR w.owner_id = (SELECT app.user_id())
               OR (SELECT app.role()) IN ('owner', 'admin')
               OR (w.visibility = 'team' AND w.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))
               OR EXISTS (SELECT 1 FROM workflow_shares s
                          WHERE s.org_id = w.org_id AND s.workflow_id = w.id
                            AND (s.user_id = (SELECT app.user_id())
                                 OR s.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))))
        ORDER BY sim DESC, w.id
        LIMIT v_limit) h
  WHERE h.kind = ANY (p_kinds)
  ORDER BY h.sim DESC, h.id;
END $$;

-- Is the typo-tolerant fallback usable here? (DataLayer start-up asks once.)
CREATE FUNCTION app.search_fuzzy_available() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_trgm')
     AND to_regclass('public.workflows_name_trgm_idx') IS NOT NULL
$$;

ALTER VIEW app.search_documents OWNER TO datalayer_maint;
REVOKE ALL ON app.search_documents FROM PUBLIC;
ALTER FUNCTION app.search(text, text[], integer, boolean) OWNER TO datalayer_maint;
REVOKE ALL ON FUNCTION app.search(text, text[], integer, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION app.search_tsquery(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION app.search_fuzzy_available() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.search(text, text[], integer, boolean), app.search_tsquery(text),
                          app.search_fuzzy_available()
  TO datalayer_app, datalayer_maint;
