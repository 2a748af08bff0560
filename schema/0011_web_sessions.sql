-- depends: 0004_identity 0005_auth
-- Web sessions, the PostgreSQL store (used when Redis is not configured; with Redis they
-- live in `session:<hash>` hashes). Not database sessions: see datalayer/web_sessions.py.
--
-- A web session belongs to a user, who is global (users has no org_id), so the table is
-- global too: which organization a request acts for is the application's choice, made
-- per request (a Context), and may be kept in `data`. datalayer_app holds no privilege on
-- the table; the SECURITY DEFINER functions below are the only way in, and they refuse to
-- run inside a tenant context: a session is looked up before any context exists.
--
-- Session ids are 256-bit random tokens that only the client holds; the table stores
-- their sha256, so a copy of the table (a backup, a leak) does not hold one live id.
CREATE TABLE web_sessions (
  id_hash         bytea PRIMARY KEY
                  CONSTRAINT web_sessions_hash_length CHECK (length(id_hash) = 32),
  user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  data            jsonb NOT NULL DEFAULT '{}'
                  CONSTRAINT web_sessions_data_object CHECK (jsonb_typeof(data) = 'object'),
  idle_timeout    interval NOT NULL
                  CONSTRAINT web_sessions_idle_positive CHECK (idle_timeout > interval '0'),
  created_at      timestamptz NOT NULL,
  last_seen_at    timestamptz NOT NULL,
  expires_at      timestamptz NOT NULL,  -- sliding: last touch + idle_timeout, capped below
  max_expires_at  timestamptz NOT NULL,  -- absolute lifetime; touching never passes it
  CONSTRAINT web_sessions_expiry_capped CHECK (expires_at <= max_expires_at)
);
CREATE INDEX web_sessions_user_idx ON web_sessions (user_id);
CREATE INDEX web_sessions_expires_idx ON web_sessions (expires_at);
ALTER TABLE web_sessions ENABLE ROW LEVEL SECURITY;
ALTER TABLE web_sessions FORCE ROW LEVEL SECURITY;
CREATE POLICY web_sessions_none ON web_sessions USING (false);

CREATE FUNCTION app.web_session_create(p_hash bytea, p_user_id uuid, p_data jsonb,
                                       p_idle interval, p_max_age interval)
RETURNS TABLE (created_at timestamptz, expires_at timestamptz, max_expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
  PERFORM app.require_no_tenant();
  RETURN QUERY
  INSERT INTO web_sessions AS s (id_hash, user_id, data, idle_timeout, created_at,
                                 last_seen_at, expires_at, max_expires_at)
  VALUES (p_hash, p_user_id, coalesce(p_data, '{}'), p_idle, now(), now(),
          now() + least(p_idle, p_max_age), now() + p_max_age)
  RETURNING s.created_at, s.expires_at, s.max_expires_at;
END $$;

-- The live session with this hash. With p_touch the expiry slides to now + idle_timeout
-- (never past max_expires_at), but is only written when it would move by more than
-- min(idle_timeout / 20, 1 minute): an active session costs at most one write a minute,
-- and the idle timeout is honoured to within that slack.
CREATE FUNCTION app.web_session_get(p_hash bytea, p_touch boolean)
RETURNS TABLE (user_id uuid, data jsonb, created_at timestamptz, expires_at timestamptz,
               max_expires_at timestamptz)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
#variable_conflict use_column
BEGIN
  PERFORM app.require_no_tenant();
  IF p_touch THEN
    RETURN QUERY
    UPDATE web_sessions s
    SET last_seen_at = now(), expires_at = least(now() + s.idle_timeout, s.max_expires_at)
    WHERE s.id_hash = p_hash AND s.expires_at > now()
      AND s.expires_at < least(now() + s.idle_timeout, s.max_expires_at)
                         - least(s.idle_timeout / 20, interval '1 minute')
    RETURNING s.user_id, s.data, s.created_at, s.expires_at, s.max_expires_at;
    IF FOUND THEN
      RETURN;
    END IF;
  END IF;
  RETURN QUERY
  SELECT s.user_id, s.data, s.created_at, s.expires_at, s.max_expires_at
  FROM web_sessions s WHERE s.id_hash = p_hash AND s.expires_at > now();
END $$;

-- Revocation deletes the row, expired or not; the result says whether it was live.
CREATE FUNCTION app.web_session_revoke(p_hash bytea)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_live boolean;
BEGIN
  PERFORM app.require_no_tenant();
  DELETE FROM web_sessions WHERE id_hash = p_hash RETURNING expires_at > now() INTO v_live;
  RETURN coalesce(v_live, false);
END $$;

-- Every session of a user (sign out everywhere, password change, account suspension);
-- returns how many were live.
CREATE FUNCTION app.web_session_revoke_user(p_user_id uuid)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_count bigint;
BEGIN
  PERFORM app.require_no_tenant();
  WITH gone AS (DELETE FROM web_sessions WHERE user_id = p_user_id RETURNING expires_at)
  SELECT count(*) FILTER (WHERE expires_at > now()) INTO v_count FROM gone;
  RETURN v_count;
END $$;

DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY[
    'app.web_session_create(bytea, uuid, jsonb, interval, interval)',
    'app.web_session_get(bytea, boolean)', 'app.web_session_revoke(bytea)',
    'app.web_session_revoke_user(uuid)']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO datalayer_app', f);
  END LOOP;
END $$;
