-- depends: 0006_permissions
-- Rate limiting: bucket state (one row per key) and aggregated violations.
--
-- Neither table is a tenant table and datalayer_app holds no privilege on either: checks go
-- through app.rate_limit_check (SECURITY DEFINER, owned by the maintenance role), violations
-- are written and read through dl.system(). Keys are built by datalayer/ratelimit/limits.py
-- ('<algorithm>:<operation>|o=<org>|u=<user>|i=<ip>').
--
-- Time is the server's: clock_timestamp() in integer microseconds since the epoch. A
-- limit arrives as (interval_us, capacity): one request is worth interval_us of credit
-- (period / rate, rounded to a whole microsecond), capacity = rate + burst. All arithmetic
-- is bigint, so the result is exact, and is the same as the Redis and memory backends'.

-- UNLOGGED: a check writes one row version and no WAL, so the commit does not wait for a
-- WAL flush and the table adds nothing to replication traffic. The price: after a crash
-- (not a clean restart) PostgreSQL empties the table, and standbys do not have it, so after
-- a crash or a failover every key starts again with a full bucket: a one-off allowance of
-- at most one extra burst per key. Rate-limit state is ephemeral by nature; the violations
-- table below, which is evidence, is logged.
CREATE UNLOGGED TABLE rate_limit_buckets (
  key         text PRIMARY KEY
              CONSTRAINT rate_limit_buckets_key_length CHECK (length(key) BETWEEN 1 AND 512),
  -- token_bucket: credit in microseconds (0 .. capacity * interval_us);
  -- gcra: the theoretical arrival time, microseconds since the epoch.
  level       bigint NOT NULL,
  at_us       bigint NOT NULL,   -- server time of the last check (never moves backwards)
  granted     boolean NOT NULL,  -- the last check's decision, read back by RETURNING
  expires_us  bigint NOT NULL    -- from then on the row means "full bucket": sweepable
) WITH (fillfactor = 50);       -- room on the page for HOT updates (no indexed column changes)
ALTER TABLE rate_limit_buckets ENABLE ROW LEVEL SECURITY;
ALTER TABLE rate_limit_buckets FORCE ROW LEVEL SECURITY;
CREATE POLICY rate_limit_buckets_none ON rate_limit_buckets USING (false);

-- One decision. Exactly one statement runs per call: INSERT … ON CONFLICT DO UPDATE …
-- RETURNING. Concurrent checks of one key serialize on the row lock that ON CONFLICT DO
-- UPDATE takes, and each computes from the latest committed state (READ COMMITTED re-reads
-- the conflicting row), so N concurrent callers can never both spend the last token.
-- `now` is taken once per statement, before a possible wait on that lock, and is clamped
-- to the row's at_us so time never runs backwards for a key; a request that waited is
-- therefore judged at the (earlier) moment it arrived, which can only be stricter.
-- Outputs: allowed, tokens remaining, microseconds until a request of this cost could
-- pass (0 when allowed) and until the bucket is full again, and the server time used.
CREATE FUNCTION app.rate_limit_check(p_key text, p_gcra boolean, p_interval_us bigint,
                                     p_capacity bigint, p_cost bigint,
                                     OUT allowed boolean, OUT remaining bigint,
                                     OUT retry_after_us bigint, OUT reset_after_us bigint,
                                     OUT now_us bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_full bigint := p_capacity * p_interval_us;  -- a full bucket, in microseconds of credit
  v_need bigint := p_cost * p_interval_us;      -- what this request costs
BEGIN
  IF app.org_id() IS NOT NULL THEN
    RAISE EXCEPTION 'rate limits are checked outside tenant sessions (dl.limiter)'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  IF p_interval_us IS NULL OR p_interval_us < 1 OR p_capacity IS NULL OR p_capacity < 1
     OR p_cost IS NULL OR p_cost < 1 OR p_cost > p_capacity THEN
    RAISE EXCEPTION 'rate limit arguments out of range (need interval >= 1 us, 1 <= cost <= capacity)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_gcra THEN
    -- GCRA: allowed iff the new theoretical arrival time stays within v_full of now.
    INSERT INTO rate_limit_buckets AS b (key, level, at_us, granted, expires_us)
    SELECT p_key, n.now + v_need, n.now, true, n.now + v_need
    FROM (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS now) n
    ON CONFLICT (key) DO UPDATE SET (level, at_us, granted, expires_us) = (
      SELECT CASE WHEN s.ok THEN s.tat + v_need ELSE s.tat END, s.now, s.ok,
             CASE WHEN s.ok THEN s.tat + v_need ELSE s.tat END
      FROM (SELECT t.tat, t.now, t.tat + v_need - t.now <= v_full AS ok
            FROM (SELECT greatest(b.level, b.at_us, excluded.at_us) AS tat,
                         greatest(b.at_us, excluded.at_us) AS now) t) s)
    RETURNING b.granted, (v_full - (b.level - b.at_us)) / p_interval_us,
              CASE WHEN b.granted THEN 0 ELSE b.level + v_need - b.at_us - v_full END,
              b.level - b.at_us, b.at_us
    INTO allowed, remaining, retry_after_us, reset_after_us, now_us;
  ELSE
    -- Token bucket: credit refills one microsecond per microsecond, up to v_full.
    INSERT INTO rate_limit_buckets AS b (key, level, at_us, granted, expires_us)
    SELECT p_key, v_full - v_need, n.now, true, n.now + v_need
    FROM (SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint AS now) n
    ON CONFLICT (key) DO UPDATE SET (level, at_us, granted, expires_us) = (
      SELECT CASE WHEN s.ok THEN s.lvl - v_need ELSE s.lvl END, s.now, s.ok,
             s.now + v_full - CASE WHEN s.ok THEN s.lvl - v_need ELSE s.lvl END
      FROM (SELECT t.lvl, t.now, t.lvl >= v_need AS ok
            FROM (SELECT least(v_full, b.level + greatest(0, excluded.at_us - b.at_us)) AS lvl,
                         greatest(b.at_us, excluded.at_us) AS now) t) s)
    RETURNING b.granted, b.level / p_interval_us,
              CASE WHEN b.granted THEN 0 ELSE v_need - b.level END,
              v_full - b.level, b.at_us
    INTO allowed, remaining, retry_after_us, reset_after_us, now_us;
  END IF;
END $$;
ALTER FUNCTION app.rate_limit_check(text, boolean, bigint, bigint, bigint) OWNER TO datalayer_maint;
REVOKE ALL ON FUNCTION app.rate_limit_check(text, boolean, bigint, bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.rate_limit_check(text, boolean, bigint, bigint, bigint)
  TO datalayer_app;

-- Rejections, aggregated: one row per key and window (Limiter batches them in memory and
-- adds its counts here with one UPSERT per flush), never one row per rejected request.
CREATE TABLE rate_limit_violations (
  key           text NOT NULL
                CONSTRAINT rate_limit_violations_key_length CHECK (length(key) BETWEEN 1 AND 512),
  window_start  timestamptz NOT NULL,
  window_s      integer NOT NULL CONSTRAINT rate_limit_violations_window_positive
                CHECK (window_s > 0),
  operation     text NOT NULL,
  count         bigint NOT NULL CONSTRAINT rate_limit_violations_count_positive CHECK (count > 0),
  first_at      timestamptz NOT NULL,
  last_at       timestamptz NOT NULL,
  PRIMARY KEY (key, window_start),
  CONSTRAINT rate_limit_violations_times CHECK (first_at <= last_at)
);
CREATE INDEX rate_limit_violations_window_idx ON rate_limit_violations (window_start);
ALTER TABLE rate_limit_violations ENABLE ROW LEVEL SECURITY;
ALTER TABLE rate_limit_violations FORCE ROW LEVEL SECURITY;
CREATE POLICY rate_limit_violations_none ON rate_limit_violations USING (false);
