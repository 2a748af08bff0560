-- Undo 0027_knowledge_search: the search of 0022 (documents joined for every match), and
-- no index of deleted documents.
CREATE OR REPLACE FUNCTION app.knowledge_search(p_query text, p_limit integer)
RETURNS TABLE (chunk_id bigint, document_id uuid, seq integer, heading text, content text,
               token_count integer, rank real, snippet text, title text, source text,
               mime_type text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_q tsquery := websearch_to_tsquery('english'::regconfig, p_query);
  v_org text := app.org_id()::text;
  v_user text := app.user_id()::text;
BEGIN
  IF p_limit NOT BETWEEN 1 AND 100 THEN
    RAISE EXCEPTION 'search limit must be between 1 and 100'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF numnode(v_q) = 0 OR v_org IS NULL OR v_user IS NULL THEN
    RETURN;
  END IF;
  -- The term index drives the plan whatever the statistics say: the matches are found first
  -- (a MATERIALIZED CTE: no join order can start from the documents), and the owner filter
  -- compares text on purpose, since as uuid equalities with values unknown at plan time the
  -- planner may prefer the primary key's org_id prefix and read a whole library.
  RETURN QUERY
  WITH hits AS MATERIALIZED (
    SELECT c.org_id, c.id, c.document_id, ts_rank_cd(c.tsv, v_q) AS rank
    FROM knowledge_chunks c
    WHERE c.tsv @@ v_q AND c.org_id::text = v_org AND c.user_id::text = v_user
  ), top AS (
    SELECT h.org_id, h.id, h.document_id, h.rank, d.title, d.source, d.mime_type
    FROM hits h
    JOIN knowledge_documents d ON d.org_id = h.org_id AND d.id = h.document_id
    WHERE d.deleted_at IS NULL
    ORDER BY h.rank DESC, h.id
    LIMIT p_limit
  )
  -- Text and snippets for the returned rows only.
  SELECT c.id, c.document_id, c.seq, c.heading, c.content, c.token_count, top.rank,
         ts_headline('english'::regconfig, c.content, v_q,
                     'MaxFragments=2, MinWords=5, MaxWords=18, StartSel=[, StopSel=]'),
         top.title, top.source, top.mime_type
  FROM top
  JOIN knowledge_chunks c ON c.org_id = top.org_id AND c.id = top.id
  ORDER BY top.rank DESC, top.id;
END $$;

DROP INDEX knowledge_documents_deleted_idx;
