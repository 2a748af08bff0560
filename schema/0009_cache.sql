-- depends: 0006_permissions
-- Caching (datalayer/cache/): the PostgreSQL cache backend, cache statistics, and the
-- API-key verification that read-through caching needs.
--
-- The backend's tables are UNLOGGED: no WAL, not replicated, emptied after a crash, which
-- for a cache is a cold start. None is a tenant table and datalayer_app holds no privilege
-- on any of them: only the maintenance role reaches them (the backend's own small pool),
-- through the functions below. RLS is enabled and forced anyway, admitting nobody, so a
-- grant added by mistake later still exposes nothing to a tenant session.

CREATE UNLOGGED TABLE cache_entries (
  namespace   text NOT NULL,
  key         text NOT NULL,
  value       bytea NOT NULL,
  tags        text[] NOT NULL DEFAULT '{}',
  expires_at  timestamptz NOT NULL,
  PRIMARY KEY (namespace, key)
);
-- Tag invalidation is one statement: DELETE … WHERE tags && $1 (this index).
CREATE INDEX cache_entries_tags_idx ON cache_entries USING gin (tags);
-- Cleanup takes expired rows in small batches (this index, then TID scans).
CREATE INDEX cache_entries_expires_idx ON cache_entries (expires_at);

-- The clock value of each tag's last invalidation (see datalayer/cache/_backend.py): a load
-- that began before it may not store. Kept two minutes, then pruned.
CREATE UNLOGGED TABLE cache_versions (
  tag         text PRIMARY KEY,
  version     bigint NOT NULL,
  updated_at  timestamptz NOT NULL
);
CREATE INDEX cache_versions_updated_idx ON cache_versions (updated_at);

-- Logged on purpose: the clock never goes back, not even after a crash.
CREATE SEQUENCE cache_clock;

-- One loader per key across processes: a lease row with a random token and an expiry.
CREATE UNLOGGED TABLE cache_leases (
  namespace   text NOT NULL,
  key         text NOT NULL,
  token       text NOT NULL,
  expires_at  timestamptz NOT NULL,
  PRIMARY KEY (namespace, key)
);

CREATE UNLOGGED TABLE cache_counters (
  namespace   text NOT NULL,
  key         text NOT NULL,
  n           bigint NOT NULL,
  expires_at  timestamptz NOT NULL,
  PRIMARY KEY (namespace, key)
);
CREATE INDEX cache_counters_expires_idx ON cache_counters (expires_at);

-- Statistics: each process appends its per-namespace deltas periodically (a regular table:
-- these are worth keeping). Sum over a time range for totals.
CREATE TABLE cache_stats (
  id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  recorded_at  timestamptz NOT NULL DEFAULT now(),
  instance     text NOT NULL,
  backend      text NOT NULL,
  namespace    text NOT NULL,
  hits         bigint NOT NULL,
  misses       bigint NOT NULL,
  sets         bigint NOT NULL,
  deletes      bigint NOT NULL,
  evictions    bigint NOT NULL,
  errors       bigint NOT NULL,
  loads        bigint NOT NULL,
  load_ms      double precision NOT NULL,
  refreshes    bigint NOT NULL
);
CREATE INDEX cache_stats_namespace_idx ON cache_stats (namespace, recorded_at);

DO $$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['cache_entries', 'cache_versions', 'cache_leases', 'cache_counters',
                           'cache_stats']
  LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY %I ON %I USING (false)', t || '_none', t);
    EXECUTE format('REVOKE ALL ON %I FROM PUBLIC, datalayer_app', t);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I TO datalayer_maint', t);
  END LOOP;
END $$;
REVOKE ALL ON SEQUENCE cache_clock FROM PUBLIC, datalayer_app;
GRANT USAGE, SELECT ON SEQUENCE cache_clock TO datalayer_maint;

-- Take the advisory locks of p_tags, in one global order (by hash) so that stores and
-- invalidations never deadlock: shared for a store, exclusive for an invalidation. A store
-- and an invalidation of a common tag thus never interleave: either the invalidation waits
-- and then deletes the stored row, or the store waits and then sees the newer version.
CREATE FUNCTION app.cache_lock_tags(p_tags text[], p_exclusive boolean)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  h integer;
BEGIN
  FOR h IN SELECT DISTINCT hashtext(t) FROM unnest(p_tags) t ORDER BY 1 LOOP
    IF p_exclusive THEN
      PERFORM pg_advisory_xact_lock(3007, h);
    ELSE
      PERFORM pg_advisory_xact_lock_shared(3007, h);
    END IF;
  END LOOP;
END $$;

-- Write an entry and its tags in one row. With p_since, only when none of p_guard (its tags,
-- key and namespace pseudo-tags) was invalidated after clock p_since. Releases p_lease.
CREATE FUNCTION app.cache_store(p_namespace text, p_key text, p_value bytea, p_ttl_ms bigint,
                                p_tags text[], p_guard text[], p_since bigint, p_lease text)
RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_ok boolean := true;
BEGIN
  IF p_since IS NOT NULL THEN
    PERFORM app.cache_lock_tags(p_guard, false);
    -- A new statement, so a new snapshot: it sees every invalidation that held the lock.
    v_ok := NOT EXISTS (SELECT 1 FROM cache_versions
                        WHERE tag = ANY (p_guard) AND version > p_since);
  END IF;
  IF v_ok THEN
    INSERT INTO cache_entries AS e (namespace, key, value, tags, expires_at)
    VALUES (p_namespace, p_key, p_value, p_tags,
            clock_timestamp() + p_ttl_ms * interval '1 millisecond')
    ON CONFLICT (namespace, key) DO UPDATE
      SET value = EXCLUDED.value, tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at;
  END IF;
  IF p_lease IS NOT NULL THEN
    DELETE FROM cache_leases
    WHERE namespace = p_namespace AND key = p_key AND token = p_lease;
  END IF;
  RETURN v_ok;
END $$;

-- Invalidate: bump the versions of p_tags to the next clock value, then delete the entries
-- carrying any of them, the entries p_keys of p_namespace, or (p_all) the whole namespace.
CREATE FUNCTION app.cache_invalidate(p_tags text[], p_namespace text, p_keys text[],
                                     p_all boolean)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_clock bigint;
  v_n bigint;
  v_total bigint := 0;
BEGIN
  PERFORM app.cache_lock_tags(p_tags, true);
  v_clock := nextval('cache_clock');
  INSERT INTO cache_versions AS v (tag, version, updated_at)
  SELECT DISTINCT t, v_clock, clock_timestamp() FROM unnest(p_tags) t
  ON CONFLICT (tag) DO UPDATE SET version = EXCLUDED.version, updated_at = EXCLUDED.updated_at;
  DELETE FROM cache_entries WHERE tags && p_tags;
  GET DIAGNOSTICS v_total = ROW_COUNT;
  IF cardinality(p_keys) > 0 THEN
    DELETE FROM cache_entries WHERE namespace = p_namespace AND key = ANY (p_keys);
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_total := v_total + v_n;
  END IF;
  IF p_all THEN
    DELETE FROM cache_entries WHERE namespace = p_namespace;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    v_total := v_total + v_n;
    DELETE FROM cache_counters WHERE namespace = p_namespace;
  END IF;
  RETURN v_total;
END $$;

-- The current clock (0 before the first invalidation).
CREATE FUNCTION app.cache_clock()
RETURNS bigint
LANGUAGE sql VOLATILE SET search_path = pg_catalog, public, pg_temp
AS $$ SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM cache_clock $$;

-- The value when it is cached (and p_if_absent), else try to take the load lease; with the
-- clock a following store is guarded by.
CREATE FUNCTION app.cache_lease(p_namespace text, p_key text, p_token text, p_ttl_ms bigint,
                                p_if_absent boolean)
RETURNS TABLE (value bytea, leased boolean, clock bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_clock bigint := app.cache_clock();
  v_value bytea;
  v_got boolean;
BEGIN
  IF p_if_absent THEN
    SELECT e.value INTO v_value FROM cache_entries e
    WHERE e.namespace = p_namespace AND e.key = p_key AND e.expires_at > clock_timestamp();
    IF FOUND THEN
      RETURN QUERY SELECT v_value, false, v_clock;
      RETURN;
    END IF;
  END IF;
  INSERT INTO cache_leases AS l (namespace, key, token, expires_at)
  VALUES (p_namespace, p_key, p_token, clock_timestamp() + p_ttl_ms * interval '1 millisecond')
  ON CONFLICT (namespace, key) DO UPDATE
    SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
    WHERE l.expires_at <= clock_timestamp()
  RETURNING true INTO v_got;
  RETURN QUERY SELECT NULL::bytea, coalesce(v_got, false), v_clock;
END $$;

CREATE FUNCTION app.cache_incr(p_namespace text, p_key text, p_ttl_ms bigint)
RETURNS bigint
LANGUAGE sql SET search_path = pg_catalog, public, pg_temp
AS $$
  INSERT INTO cache_counters AS c (namespace, key, n, expires_at)
  VALUES (p_namespace, p_key, 1, clock_timestamp() + p_ttl_ms * interval '1 millisecond')
  ON CONFLICT (namespace, key) DO UPDATE
    SET n = CASE WHEN c.expires_at <= clock_timestamp() THEN 1 ELSE c.n + 1 END,
        expires_at = CASE WHEN c.expires_at <= clock_timestamp() THEN EXCLUDED.expires_at
                          ELSE c.expires_at END
  RETURNING n
$$;

DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY[
    'app.cache_lock_tags(text[], boolean)',
    'app.cache_store(text, text, bytea, bigint, text[], text[], bigint, text)',
    'app.cache_invalidate(text[], text, text[], boolean)', 'app.cache_clock()',
    'app.cache_lease(text, text, text, bigint, boolean)', 'app.cache_incr(text, text, bigint)']
  LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO datalayer_maint', f);
  END LOOP;
END $$;

-- API-key verification for read-through caching: app.verify_api_key plus the key's expiry,
-- so a cached verification never outlives the key. Same rules as app.verify_api_key (it
-- calls it: one definition of "valid"); owned by the maintenance role like it.
CREATE FUNCTION app.verify_api_key_until(p_hash bytea)
RETURNS TABLE (org_id uuid, key_id uuid, user_id uuid, role text, scopes text[],
               valid_until timestamptz)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT v.org_id, v.key_id, v.user_id, v.role, v.scopes, a.expires_at
  FROM app.verify_api_key(p_hash) v
  JOIN api_keys a ON a.org_id = v.org_id AND a.id = v.key_id
$$;
ALTER FUNCTION app.verify_api_key_until(bytea) OWNER TO datalayer_maint;
REVOKE ALL ON FUNCTION app.verify_api_key_until(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.verify_api_key_until(bytea) TO datalayer_app;
