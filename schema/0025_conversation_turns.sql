-- depends: 0024_audit_search
-- Turn appends, the hot path: a statement inserting one turn (every append_turn) takes a
-- fast path in the turns trigger. It reads that row once and updates the session with plain
-- scalars, where the general path (batches, seeding) groups the transition table per session
-- and builds a histogram from an array. Same locks in the same order (session row, then the
-- user's meter row), same errors.
--
-- The meter and the limit stay in one place, app.twin_check_limit, which becomes a plain
-- invoker function: it is only ever called by the definer trigger functions of 0022 and
-- this one (they run as datalayer_maint with a fixed search_path, which it now inherits),
-- and EXECUTE stays revoked from PUBLIC, so datalayer_app still cannot call it. As a definer
-- function with its own search_path every call switched the role and the path and back.
-- Measured in-server (a procedure appending 4,000 turns over 100 sessions, one transaction
-- each, asynchronous commit): the append with its trigger went from about 480 to 250 us CPU.
ALTER FUNCTION app.twin_check_limit(uuid, uuid, text, bigint) SECURITY INVOKER RESET ALL;

-- p_hist with the bucket of p_ms (app.latency_bounds()) counted once more.
CREATE FUNCTION app.hist_bump(p_hist integer[], p_ms integer) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  v_b constant integer := width_bucket(greatest(p_ms, 0), app.latency_bounds());
BEGIN
  p_hist[v_b] := coalesce(p_hist[v_b], 0) + 1;
  RETURN p_hist;
END $$;
REVOKE ALL ON FUNCTION app.hist_bump(integer[], integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.hist_bump(integer[], integer) TO datalayer_app, datalayer_maint;

CREATE OR REPLACE FUNCTION app.conversation_turns_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  t record;
  r record;
  v_sessions integer;
  v_updated integer;
BEGIN
  SELECT count(*) OVER () AS n_rows, n.org_id, n.session_id, n.user_id, n.total_ms,
         n.tokens_in, n.tokens_out, n.created_at
    INTO t FROM new_rows n LIMIT 1;
  IF t.n_rows = 1 THEN
    v_sessions := 1;
    UPDATE conversation_sessions s
    SET turn_count = s.turn_count + 1,
        latency_total_ms = s.latency_total_ms + t.total_ms,
        latency_max_ms = greatest(s.latency_max_ms, t.total_ms),
        latency_hist = app.hist_bump(s.latency_hist, t.total_ms),
        p95_latency_ms = app.hist_p95(app.hist_bump(s.latency_hist, t.total_ms),
                                      greatest(s.latency_max_ms, t.total_ms)),
        tokens_in = s.tokens_in + t.tokens_in,
        tokens_out = s.tokens_out + t.tokens_out,
        last_turn_at = greatest(s.last_turn_at, t.created_at),
        updated_at = now()
    WHERE s.org_id = t.org_id AND s.id = t.session_id AND s.status = 'active';
  ELSE
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
  END IF;
  GET DIAGNOSTICS v_updated = ROW_COUNT;
  IF v_updated < v_sessions THEN
    RAISE EXCEPTION 'a turn can only be added to an active conversation session'
      USING ERRCODE = 'check_violation', CONSTRAINT = 'conversation_turns_session_active',
            TABLE = 'conversation_turns';
  END IF;
  IF t.n_rows = 1 THEN
    PERFORM app.twin_check_limit(t.org_id, t.user_id, 'turns', 1);
    RETURN NULL;
  END IF;
  FOR r IN SELECT n.org_id, n.user_id, count(*) AS n FROM new_rows n
           GROUP BY n.org_id, n.user_id ORDER BY n.org_id, n.user_id LOOP
    PERFORM app.twin_check_limit(r.org_id, r.user_id, 'turns', r.n);
  END LOOP;
  RETURN NULL;
END $$;
