-- Undo 0025_conversation_turns: the turns trigger of 0022 (aggregates for every statement),
-- and the limit check a definer function with its own search_path again.
CREATE OR REPLACE FUNCTION app.conversation_turns_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  r record;
  v_sessions integer;
  v_updated integer;
BEGIN
  SELECT count(DISTINCT (n.org_id, n.session_id)) INTO v_sessions FROM new_rows n;
  UPDATE conversation_sessions s
  SET turn_count = s.turn_count + a.n,
      latency_total_ms = s.latency_total_ms + a.total,
      latency_max_ms = greatest(s.latency_max_ms, a.max_ms),
      latency_hist = app.hist_add(s.latency_hist, a.hist),
      p95_latency_ms = app.hist_p95(app.hist_add(s.latency_hist, a.hist),
                                    greatest(s.latency_max_ms, a.max_ms)),
      tokens_in = s.tokens_in + a.tin,
      tokens_out = s.tokens_out + a.tout,
      last_turn_at = greatest(s.last_turn_at, a.last_at),
      updated_at = now()
  FROM (SELECT n.org_id, n.session_id, count(*)::integer AS n, sum(n.total_ms) AS total,
               max(n.total_ms) AS max_ms, app.latency_hist(array_agg(n.total_ms)) AS hist,
               sum(n.tokens_in) AS tin, sum(n.tokens_out) AS tout, max(n.created_at) AS last_at
        FROM new_rows n GROUP BY n.org_id, n.session_id) a
  WHERE s.org_id = a.org_id AND s.id = a.session_id AND s.status = 'active';
  GET DIAGNOSTICS v_updated = ROW_COUNT;
  IF v_updated < v_sessions THEN
    RAISE EXCEPTION 'a turn can only be added to an active conversation session'
      USING ERRCODE = 'check_violation', CONSTRAINT = 'conversation_turns_session_active',
            TABLE = 'conversation_turns';
  END IF;
  FOR r IN SELECT n.org_id, n.user_id, count(*) AS n FROM new_rows n
           GROUP BY n.org_id, n.user_id ORDER BY n.org_id, n.user_id LOOP
    PERFORM app.twin_check_limit(r.org_id, r.user_id, 'turns', r.n);
  END LOOP;
  RETURN NULL;
END $$;

DROP FUNCTION app.hist_bump(integer[], integer);
ALTER FUNCTION app.twin_check_limit(uuid, uuid, text, bigint) SECURITY DEFINER
  SET search_path = pg_catalog, public, pg_temp;
