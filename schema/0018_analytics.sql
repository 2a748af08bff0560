-- depends: 0017_query_performance
-- Workflow analytics: daily roll-ups per workflow, kept incrementally as executions finish,
-- an organization-level materialized view refreshed CONCURRENTLY by a maintenance job, and
-- the functions the run-time role reads them through.
--
-- Roll-up grain: (org_id, workflow_id, day), day = the UTC date an execution finished.
-- Counters add up; durations go into the same fixed 110-bucket log-scale histogram as
-- workflow_stats (schema/0007_workflows.sql), so any range of days merges by adding arrays
-- element-wise and its p95 is read with app.workflow_stats_quantile. hourly[h + 1] counts
-- the executions that finished in UTC hour h (busiest hours).
--
-- Incremental: app.workflow_stats_record (called once per finished execution by the
-- executions triggers) is replaced by a version that upserts the day's row next to the
-- running statistics, in the same function call (no second per-row trigger). The day is the
-- transaction's date: the executions guard sets finished_at := now() for every transition
-- to a final state, so the two agree. Rows imported already finished (maintenance INSERTs
-- with a past finished_at) land on the import day; app.analytics_rebuild_day(day) rebuilds
-- a day from executions (idempotent) to repair that, and the rollup job runs it for the last
-- closed days.
--
-- Organization level: analytics_org_daily (materialized view) aggregates the roll-ups per
-- (org, day) with running totals, so that any range is two rows; the refresh job
-- (REFRESH ... CONCURRENTLY: readers never wait) keeps it current, and organization
-- figures are as of its last run (analytics_state.refreshed_at). Merging the live per-workflow
-- rows at read time instead was measured at 6 ms per day of 200 workflows (110-bucket
-- histograms added through unnest), beyond the 10 ms budget of a dashboard. Per-workflow
-- figures (workflow_range) read the live roll-ups.

CREATE TABLE workflow_daily_stats (
  org_id              uuid NOT NULL,
  workflow_id         uuid NOT NULL,
  day                 date NOT NULL,
  executions          bigint NOT NULL DEFAULT 0,
  successes           bigint NOT NULL DEFAULT 0,
  failures            bigint NOT NULL DEFAULT 0,  -- failed or timed_out
  cancellations       bigint NOT NULL DEFAULT 0,
  timed_executions    bigint NOT NULL DEFAULT 0,
  total_duration_ms   bigint NOT NULL DEFAULT 0,
  min_duration_ms     bigint,
  max_duration_ms     bigint,
  duration_histogram  bigint[] NOT NULL DEFAULT array_fill(0::bigint, ARRAY[110])
                      CONSTRAINT workflow_daily_stats_histogram_size
                      CHECK (cardinality(duration_histogram) = 110),
  hourly              bigint[] NOT NULL DEFAULT array_fill(0::bigint, ARRAY[24])
                      CONSTRAINT workflow_daily_stats_hourly_size CHECK (cardinality(hourly) = 24),
  PRIMARY KEY (org_id, workflow_id, day),
  FOREIGN KEY (org_id, workflow_id) REFERENCES workflows (org_id, id) ON DELETE CASCADE
);
-- Rebuilding a day (maintenance, across organizations). Free space for HOT updates: the
-- upserts change no indexed column.
CREATE INDEX workflow_daily_stats_day_idx ON workflow_daily_stats (day);
ALTER TABLE workflow_daily_stats SET (fillfactor = 70);

-- Statistics are visible with their workflow, and written like workflow_stats: by
-- app.workflow_stats_record (invoker rights: the executions triggers, which run as the
-- maintenance role, or a writer of the organization calling it) and dl.system().
ALTER TABLE workflow_daily_stats ENABLE ROW LEVEL SECURITY;
ALTER TABLE workflow_daily_stats FORCE ROW LEVEL SECURITY;
CREATE POLICY workflow_daily_stats_select ON workflow_daily_stats FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND EXISTS (SELECT 1 FROM workflows w
                     WHERE w.org_id = workflow_daily_stats.org_id
                       AND w.id = workflow_daily_stats.workflow_id));
CREATE POLICY workflow_daily_stats_insert ON workflow_daily_stats FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));
CREATE POLICY workflow_daily_stats_update ON workflow_daily_stats FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()))
  WITH CHECK (org_id = (SELECT app.org_id()));
GRANT SELECT,
      INSERT (org_id, workflow_id, day, executions, successes, failures, cancellations,
              timed_executions, total_duration_ms, min_duration_ms, max_duration_ms,
              duration_histogram, hourly),
      UPDATE (executions, successes, failures, cancellations, timed_executions,
              total_duration_ms, min_duration_ms, max_duration_ms, duration_histogram, hourly)
  ON workflow_daily_stats TO datalayer_app;

-- Element-wise sum of two bigint arrays (NULL elements count as 0; the longer length wins).
CREATE FUNCTION app.bigint_array_add(p_a bigint[], p_b bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT CASE WHEN p_a IS NULL THEN p_b WHEN p_b IS NULL THEN p_a ELSE
    (SELECT array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY i)
     FROM unnest(p_a, p_b) WITH ORDINALITY AS u (x, y, i)) END
$$;
CREATE AGGREGATE app.sum_arrays(bigint[]) (
  SFUNC = app.bigint_array_add, STYPE = bigint[], PARALLEL = SAFE
);

-- The running statistics (contract unchanged, see 0007) plus the day's roll-up.
CREATE OR REPLACE FUNCTION app.workflow_stats_record(p_org uuid, p_workflow uuid, p_status text,
                                                     p_duration_ms bigint)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_bucket integer := app.workflow_duration_bucket(p_duration_ms);
  v_timed integer := (p_duration_ms IS NOT NULL)::integer;
  v_ok integer := (p_status = 'succeeded')::integer;
  v_failed integer := (p_status IN ('failed', 'timed_out'))::integer;
  v_cancelled integer := (p_status = 'cancelled')::integer;
  v_hist bigint[] := array_fill(0::bigint, ARRAY[110]);
  v_hourly bigint[] := array_fill(0::bigint, ARRAY[24]);
  v_now timestamp := now() AT TIME ZONE 'UTC';
  v_hour integer := extract(hour FROM v_now)::integer + 1;
BEGIN
  IF p_status IS NULL OR p_status NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN
    RAISE EXCEPTION 'workflow_stats_record: status must be succeeded, failed, cancelled or timed_out'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF p_duration_ms < 0 THEN
    RAISE EXCEPTION 'workflow_stats_record: duration must be >= 0 ms (or NULL)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  v_hist[v_bucket] := v_timed;
  v_hourly[v_hour] := 1;
  INSERT INTO workflow_stats AS s
    (org_id, workflow_id, executions, successes, failures, cancellations, timed_executions,
     total_duration_ms, min_duration_ms, max_duration_ms, duration_histogram,
     last_execution_at)
  VALUES (p_org, p_workflow, 1, v_ok, v_failed, v_cancelled, v_timed,
          coalesce(p_duration_ms, 0), p_duration_ms, p_duration_ms, v_hist, now())
  ON CONFLICT (org_id, workflow_id) DO UPDATE SET
    executions = s.executions + 1,
    successes = s.successes + v_ok,
    failures = s.failures + v_failed,
    cancellations = s.cancellations + v_cancelled,
    timed_executions = s.timed_executions + v_timed,
    total_duration_ms = s.total_duration_ms + coalesce(p_duration_ms, 0),
    min_duration_ms = least(s.min_duration_ms, p_duration_ms),
    max_duration_ms = greatest(s.max_duration_ms, p_duration_ms),
    duration_histogram[v_bucket] = s.duration_histogram[v_bucket] + v_timed,
    last_execution_at = greatest(s.last_execution_at, now());
  INSERT INTO workflow_daily_stats AS d
    (org_id, workflow_id, day, executions, successes, failures, cancellations,
     timed_executions, total_duration_ms, min_duration_ms, max_duration_ms,
     duration_histogram, hourly)
  VALUES (p_org, p_workflow, v_now::date, 1, v_ok, v_failed, v_cancelled, v_timed,
          coalesce(p_duration_ms, 0), p_duration_ms, p_duration_ms, v_hist, v_hourly)
  ON CONFLICT (org_id, workflow_id, day) DO UPDATE SET
    executions = d.executions + 1,
    successes = d.successes + v_ok,
    failures = d.failures + v_failed,
    cancellations = d.cancellations + v_cancelled,
    timed_executions = d.timed_executions + v_timed,
    total_duration_ms = d.total_duration_ms + coalesce(p_duration_ms, 0),
    min_duration_ms = least(d.min_duration_ms, p_duration_ms),
    max_duration_ms = greatest(d.max_duration_ms, p_duration_ms),
    duration_histogram[v_bucket] = d.duration_histogram[v_bucket] + v_timed,
    hourly[v_hour] = d.hourly[v_hour] + 1;
END $$;

-- The set-based form of app.workflow_stats_record for many finished executions at once
-- (same-length arrays): one upsert per workflow into workflow_stats and one per
-- (workflow, day of finished_at) into workflow_daily_stats, in (org, workflow) order so that
-- concurrent batches lock rows in the same order. Used by the executions triggers for
-- statements that finish more than one execution.
CREATE FUNCTION app.workflow_histogram(p_buckets integer[], p_size integer) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp
AS $$
  SELECT array_agg(coalesce(c.n, 0) ORDER BY i.i)
  FROM generate_series(1, p_size) i (i)
  LEFT JOIN (SELECT x, count(*) AS n FROM unnest(p_buckets) x GROUP BY x) c ON c.x = i.i
$$;

CREATE FUNCTION app.workflow_stats_record_many(p_org uuid[], p_workflow uuid[],
                                               p_status text[], p_duration_ms bigint[],
                                               p_finished_at timestamptz[])
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM unnest(p_status) s
             WHERE s IS NULL OR s NOT IN ('succeeded', 'failed', 'cancelled', 'timed_out')) THEN
    RAISE EXCEPTION 'workflow_stats_record: status must be succeeded, failed, cancelled or timed_out'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF EXISTS (SELECT 1 FROM unnest(p_duration_ms) d WHERE d < 0) THEN
    RAISE EXCEPTION 'workflow_stats_record: duration must be >= 0 ms (or NULL)'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  INSERT INTO workflow_stats AS s
    (org_id, workflow_id, executions, successes, failures, cancellations, timed_executions,
     total_duration_ms, min_duration_ms, max_duration_ms, duration_histogram,
     last_execution_at)
  SELECT f.org_id, f.workflow_id, count(*), count(*) FILTER (WHERE f.status = 'succeeded'),
         count(*) FILTER (WHERE f.status IN ('failed', 'timed_out')),
         count(*) FILTER (WHERE f.status = 'cancelled'), count(f.duration_ms),
         coalesce(sum(f.duration_ms), 0), min(f.duration_ms), max(f.duration_ms),
         app.workflow_histogram(array_agg(app.workflow_duration_bucket(f.duration_ms))
                                  FILTER (WHERE f.duration_ms IS NOT NULL), 110),
         now()
  FROM unnest(p_org, p_workflow, p_status, p_duration_ms)
       AS f (org_id, workflow_id, status, duration_ms)
  GROUP BY f.org_id, f.workflow_id
  ORDER BY f.org_id, f.workflow_id
  ON CONFLICT (org_id, workflow_id) DO UPDATE SET
    executions = s.executions + excluded.executions,
    successes = s.successes + excluded.successes,
    failures = s.failures + excluded.failures,
    cancellations = s.cancellations + excluded.cancellations,
    timed_executions = s.timed_executions + excluded.timed_executions,
    total_duration_ms = s.total_duration_ms + excluded.total_duration_ms,
    min_duration_ms = least(s.min_duration_ms, excluded.min_duration_ms),
    max_duration_ms = greatest(s.max_duration_ms, excluded.max_duration_ms),
    duration_histogram = app.bigint_array_add(s.duration_histogram, excluded.duration_histogram),
    last_execution_at = greatest(s.last_execution_at, excluded.last_execution_at);
  INSERT INTO workflow_daily_stats AS d
    (org_id, workflow_id, day, executions, successes, failures, cancellations,
     timed_executions, total_duration_ms, min_duration_ms, max_duration_ms,
     duration_histogram, hourly)
  SELECT f.org_id, f.workflow_id, (f.finished_at AT TIME ZONE 'UTC')::date, count(*),
         count(*) FILTER (WHERE f.status = 'succeeded'),
         count(*) FILTER (WHERE f.status IN ('failed', 'timed_out')),
         count(*) FILTER (WHERE f.status = 'cancelled'), count(f.duration_ms),
         coalesce(sum(f.duration_ms), 0), min(f.duration_ms), max(f.duration_ms),
         app.workflow_histogram(array_agg(app.workflow_duration_bucket(f.duration_ms))
                                  FILTER (WHERE f.duration_ms IS NOT NULL), 110),
         app.workflow_histogram(array_agg(extract(hour FROM f.finished_at
                                                  AT TIME ZONE 'UTC')::integer + 1), 24)
  FROM unnest(p_org, p_workflow, p_status, p_duration_ms, coalesce(p_finished_at, '{}'))
       AS f (org_id, workflow_id, status, duration_ms, finished_at)
  GROUP BY f.org_id, f.workflow_id, (f.finished_at AT TIME ZONE 'UTC')::date
  ORDER BY f.org_id, f.workflow_id, 3
  ON CONFLICT (org_id, workflow_id, day) DO UPDATE SET
    executions = d.executions + excluded.executions,
    successes = d.successes + excluded.successes,
    failures = d.failures + excluded.failures,
    cancellations = d.cancellations + excluded.cancellations,
    timed_executions = d.timed_executions + excluded.timed_executions,
    total_duration_ms = d.total_duration_ms + excluded.total_duration_ms,
    min_duration_ms = least(d.min_duration_ms, excluded.min_duration_ms),
    max_duration_ms = greatest(d.max_duration_ms, excluded.max_duration_ms),
    duration_histogram = app.bigint_array_add(d.duration_histogram, excluded.duration_histogram),
    hourly = app.bigint_array_add(d.hourly, excluded.hourly);
END $$;

-- The executions triggers (schema/0008_executions.sql), with statistics recorded per row for
-- a single finished execution and set-based for several; otherwise unchanged.
CREATE OR REPLACE FUNCTION app.executions_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  INSERT INTO execution_transitions (org_id, execution_id, from_status, to_status, attempt,
                                     worker_id, actor_id, reason)
  SELECT n.org_id, n.id, NULL, n.status, n.attempt, n.worker_id, app.user_id(), n.status_reason
  FROM new_rows n;
  -- Finished rows (imports by the maintenance role): one set-based pass, on their own days.
  PERFORM app.workflow_stats_record_many(array_agg(n.org_id), array_agg(n.workflow_id),
                                         array_agg(n.status), array_agg(n.duration_ms),
                                         array_agg(n.finished_at))
  FROM new_rows n WHERE n.status IN ('succeeded', 'failed', 'cancelled', 'timed_out')
  HAVING count(*) > 0;
  IF EXISTS (SELECT 1 FROM new_rows n WHERE n.status = 'queued' AND n.scheduled_at <= now()) THEN
    PERFORM pg_notify('datalayer_executions', '');
  END IF;
  RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION app.executions_after_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  r record;
  v_finished integer;
  v_retries integer;
  v_abandoned integer;
  v_wake boolean;
BEGIN
  -- One pass over the statement's rows: record the changes of status, and count what else
  -- there is to do (a heartbeat changes no status and stops here).
  WITH changed AS (
    SELECT n.org_id, n.id, n.status, n.attempt, n.max_attempts, n.auto_retry, n.scheduled_at,
           n.status_reason, o.status AS old_status, coalesce(n.worker_id, o.worker_id) AS worker_id
    FROM new_rows n JOIN old_rows o ON o.org_id = n.org_id AND o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status
  ), recorded AS (
    INSERT INTO execution_transitions (org_id, execution_id, from_status, to_status, attempt,
                                       worker_id, actor_id, reason)
    SELECT c.org_id, c.id, c.old_status, c.status, c.attempt, c.worker_id, app.user_id(),
           c.status_reason
    FROM changed c
  )
  SELECT count(*) FILTER (WHERE c.status IN ('succeeded', 'failed', 'cancelled', 'timed_out')),
         count(*) FILTER (WHERE c.status IN ('failed', 'timed_out') AND c.auto_retry
                                AND c.attempt < c.max_attempts),
         count(*) FILTER (WHERE c.old_status = 'running'
                                AND c.status IN ('queued', 'failed', 'cancelled', 'timed_out')),
         coalesce(bool_or(c.status = 'queued' AND c.scheduled_at <= now()), false)
  INTO v_finished, v_retries, v_abandoned, v_wake
  FROM changed c;
  IF v_abandoned > 0 THEN
    -- An attempt that ended without finishing (worker lost, failed, cancelled, timed out)
    -- leaves no node running: its running nodes are closed as cancelled.
    UPDATE node_executions ne
    SET status = 'cancelled', finished_at = clock_timestamp(),
        error = jsonb_build_object('message', 'the execution stopped running (' || n.status || ')')
    FROM new_rows n JOIN old_rows o ON o.org_id = n.org_id AND o.id = n.id
    WHERE o.status = 'running' AND n.status IN ('queued', 'failed', 'cancelled', 'timed_out')
      AND ne.org_id = n.org_id AND ne.execution_id = n.id AND ne.created_at >= n.created_at
      AND ne.status = 'running';
  END IF;
  IF v_finished = 1 THEN
    -- One finished execution (a worker's finish): the per-row path, two element updates.
    FOR r IN SELECT n.org_id, n.workflow_id, n.status, n.duration_ms
             FROM new_rows n JOIN old_rows o ON o.org_id = n.org_id AND o.id = n.id
             WHERE n.status IS DISTINCT FROM o.status
               AND n.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') LOOP
      PERFORM app.workflow_stats_record(r.org_id, r.workflow_id, r.status, r.duration_ms);
    END LOOP;
  ELSIF v_finished > 1 THEN
    -- A batch (complete_many, a reaper): one upsert per workflow and one per workflow-day,
    -- instead of updating the same rows once per execution.
    PERFORM app.workflow_stats_record_many(array_agg(n.org_id), array_agg(n.workflow_id),
                                           array_agg(n.status), array_agg(n.duration_ms),
                                           array_agg(n.finished_at))
    FROM new_rows n JOIN old_rows o ON o.org_id = n.org_id AND o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status
      AND n.status IN ('succeeded', 'failed', 'cancelled', 'timed_out');
  END IF;
  IF v_retries > 0 THEN
    -- Automatic retries: a new attempt after a jittered exponential backoff.
    INSERT INTO executions (org_id, workflow_id, workflow_version, trigger, trigger_payload,
                            input, priority, timeout_ms, attempt, max_attempts, auto_retry,
                            retry_delay_ms, retry_of, parent_execution_id, scheduled_at,
                            status_reason)
    SELECT n.org_id, n.workflow_id, n.workflow_version, n.trigger, n.trigger_payload, n.input,
           n.priority, n.timeout_ms, n.attempt + 1, n.max_attempts, true, n.retry_delay_ms,
           n.id, n.parent_execution_id,
           now() + app.execution_retry_delay(n.retry_delay_ms, n.attempt),
           format('automatic retry %s of %s', n.attempt + 1, n.max_attempts)
    FROM new_rows n JOIN old_rows o ON o.org_id = n.org_id AND o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status AND n.status IN ('failed', 'timed_out')
      AND n.auto_retry AND n.attempt < n.max_attempts
    ORDER BY n.org_id, n.id
    ON CONFLICT DO NOTHING;
  END IF;
  IF v_wake THEN
    PERFORM pg_notify('datalayer_executions', '');
  END IF;
  RETURN NULL;
END $$;


-- Rebuild one day's roll-ups from executions (finished on that UTC day): idempotent, and
-- exact for a closed day. Rows of workflows with no execution that day are removed. Do not
-- rebuild days whose executions were purged by retention: the roll-ups outlive them.
-- Returns the number of roll-up rows written. Maintenance only.
CREATE FUNCTION app.analytics_rebuild_day(p_day date) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_rows integer;
BEGIN
  IF p_day IS NULL OR p_day > (now() AT TIME ZONE 'UTC')::date THEN
    RAISE EXCEPTION 'analytics_rebuild_day: the day must not be in the future'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- One rebuilder per day at a time.
  PERFORM pg_advisory_xact_lock(hashtext('datalayer.analytics.rebuild'), p_day - date '2000-01-01');
  DELETE FROM workflow_daily_stats WHERE day = p_day;
  INSERT INTO workflow_daily_stats
    (org_id, workflow_id, day, executions, successes, failures, cancellations,
     timed_executions, total_duration_ms, min_duration_ms, max_duration_ms,
     duration_histogram, hourly)
  SELECT e.org_id, e.workflow_id, p_day, count(*),
         count(*) FILTER (WHERE e.status = 'succeeded'),
         count(*) FILTER (WHERE e.status IN ('failed', 'timed_out')),
         count(*) FILTER (WHERE e.status = 'cancelled'),
         count(e.duration_ms), coalesce(sum(e.duration_ms), 0), min(e.duration_ms),
         max(e.duration_ms),
         (SELECT array_agg(coalesce(c.n, 0) ORDER BY b.i)
          FROM generate_series(1, 110) b (i)
          LEFT JOIN (SELECT app.workflow_duration_bucket(x) AS i, count(*) AS n
                     FROM unnest(array_agg(e.duration_ms)) x WHERE x IS NOT NULL
                     GROUP BY 1) c ON c.i = b.i),
         (SELECT array_agg(coalesce(c.n, 0) ORDER BY h.i)
          FROM generate_series(1, 24) h (i)
          LEFT JOIN (SELECT extract(hour FROM t)::integer + 1 AS i, count(*) AS n
                     FROM unnest(array_agg(e.finished_at)) t GROUP BY 1) c ON c.i = h.i)
  FROM executions e
  WHERE e.finished_at >= p_day AND e.finished_at < p_day + 1
    AND e.status IN ('succeeded', 'failed', 'cancelled', 'timed_out')
  GROUP BY e.org_id, e.workflow_id;
  GET DIAGNOSTICS v_rows = ROW_COUNT;
  RETURN v_rows;
END $$;

-- The organization level ---------------------------------------------------------------------

-- The jobs' state: the view's last refresh, the last day the rollup job rebuilt.
CREATE TABLE analytics_state (
  id               boolean PRIMARY KEY DEFAULT true CONSTRAINT analytics_state_single CHECK (id),
  refreshed_at     timestamptz,
  rebuilt_through  date
);
INSERT INTO analytics_state DEFAULT VALUES;

-- Per (org, day): the day's figures and the running totals of every day up to it, so that a
-- range of closed days is the difference of two rows (two arrays to subtract, whatever the
-- range's length).
CREATE MATERIALIZED VIEW analytics_org_daily AS
SELECT o.*,
       app.workflow_stats_quantile(o.duration_histogram, 0.95, o.min_duration_ms,
                                   o.max_duration_ms) AS p95_duration_ms,
       sum(o.executions) OVER w::bigint AS cum_executions,
       sum(o.successes) OVER w::bigint AS cum_successes,
       sum(o.failures) OVER w::bigint AS cum_failures,
       sum(o.cancellations) OVER w::bigint AS cum_cancellations,
       sum(o.timed_executions) OVER w::bigint AS cum_timed_executions,
       sum(o.total_duration_ms) OVER w::bigint AS cum_total_duration_ms,
       app.sum_arrays(o.duration_histogram) OVER w AS cum_duration_histogram,
       app.sum_arrays(o.hourly) OVER w AS cum_hourly
FROM (SELECT d.org_id, d.day, sum(d.executions)::bigint AS executions,
             sum(d.successes)::bigint AS successes, sum(d.failures)::bigint AS failures,
             sum(d.cancellations)::bigint AS cancellations,
             sum(d.timed_executions)::bigint AS timed_executions,
             sum(d.total_duration_ms)::bigint AS total_duration_ms,
             min(d.min_duration_ms) AS min_duration_ms, max(d.max_duration_ms) AS max_duration_ms,
             app.sum_arrays(d.duration_histogram) AS duration_histogram,
             app.sum_arrays(d.hourly) AS hourly
      FROM workflow_daily_stats d
      GROUP BY d.org_id, d.day) o
WINDOW w AS (PARTITION BY o.org_id ORDER BY o.day);
-- Unique: REFRESH ... CONCURRENTLY needs it; also the readers' lookup.
CREATE UNIQUE INDEX analytics_org_daily_key ON analytics_org_daily (org_id, day);

-- The per-workflow counters without the arrays (a narrow copy: ranking a month of 200
-- workflows reads 6,000 small rows, not 6,000 rows of histograms). Top failing workflows.
CREATE MATERIALIZED VIEW analytics_workflow_daily AS
SELECT d.org_id, d.day, d.workflow_id, d.executions, d.successes, d.failures
FROM workflow_daily_stats d;
CREATE UNIQUE INDEX analytics_workflow_daily_key
  ON analytics_workflow_daily (org_id, day, workflow_id);

-- The context organization's days in [p_from, p_to] (as of the last refresh). Nothing
-- without a context.
CREATE FUNCTION app.analytics_org_days(p_from date, p_to date)
RETURNS TABLE (day date, executions bigint, successes bigint, failures bigint,
               cancellations bigint, timed_executions bigint, total_duration_ms bigint,
               min_duration_ms bigint, max_duration_ms bigint, p95_duration_ms double precision,
               hourly bigint[])
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT m.day, m.executions, m.successes, m.failures, m.cancellations, m.timed_executions,
         m.total_duration_ms, m.min_duration_ms, m.max_duration_ms, m.p95_duration_ms,
         m.hourly
  FROM analytics_org_daily m
  WHERE m.org_id = app.org_id() AND m.day >= p_from AND m.day <= p_to
$$;

-- The context organization's totals over [p_from, p_to] in one row (as of the last
-- refresh): the difference of the running totals at the range's last day and before its
-- first, i.e. two rows whatever the range's length.
CREATE FUNCTION app.analytics_org_totals(p_from date, p_to date)
RETURNS TABLE (executions bigint, successes bigint, failures bigint, cancellations bigint,
               timed_executions bigint, total_duration_ms bigint, min_duration_ms bigint,
               max_duration_ms bigint, duration_histogram bigint[], hourly bigint[])
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  WITH hi AS (SELECT m.* FROM analytics_org_daily m
              WHERE m.org_id = app.org_id() AND m.day >= p_from AND m.day <= p_to
              ORDER BY m.day DESC LIMIT 1),
  lo AS (SELECT m.* FROM analytics_org_daily m
         WHERE m.org_id = app.org_id() AND m.day < p_from AND EXISTS (SELECT FROM hi)
         ORDER BY m.day DESC LIMIT 1),
  extremes AS (SELECT min(m.min_duration_ms) AS lo_ms, max(m.max_duration_ms) AS hi_ms
               FROM analytics_org_daily m
               WHERE m.org_id = app.org_id() AND m.day >= p_from AND m.day <= p_to)
  SELECT coalesce(hi.cum_executions - coalesce(lo.cum_executions, 0), 0)::bigint,
         coalesce(hi.cum_successes - coalesce(lo.cum_successes, 0), 0)::bigint,
         coalesce(hi.cum_failures - coalesce(lo.cum_failures, 0), 0)::bigint,
         coalesce(hi.cum_cancellations - coalesce(lo.cum_cancellations, 0), 0)::bigint,
         coalesce(hi.cum_timed_executions - coalesce(lo.cum_timed_executions, 0), 0)::bigint,
         coalesce(hi.cum_total_duration_ms - coalesce(lo.cum_total_duration_ms, 0), 0)::bigint,
         x.lo_ms, x.hi_ms,
         CASE WHEN lo.org_id IS NULL THEN hi.cum_duration_histogram
              ELSE (SELECT array_agg(a - b ORDER BY i)
                    FROM unnest(hi.cum_duration_histogram, lo.cum_duration_histogram)
                         WITH ORDINALITY u (a, b, i)) END,
         CASE WHEN lo.org_id IS NULL THEN hi.cum_hourly
              ELSE (SELECT array_agg(a - b ORDER BY i)
                    FROM unnest(hi.cum_hourly, lo.cum_hourly) WITH ORDINALITY u (a, b, i)) END
  FROM extremes x LEFT JOIN hi ON true LEFT JOIN lo ON true
$$;

-- Per-workflow totals of the organization over [p_from, p_to], as of the last refresh (no
-- names: callers join workflows under RLS, which drops the workflows the context may not
-- see).
CREATE FUNCTION app.analytics_workflow_totals(p_from date, p_to date)
RETURNS TABLE (workflow_id uuid, executions bigint, successes bigint, failures bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT d.workflow_id, sum(d.executions)::bigint, sum(d.successes)::bigint,
         sum(d.failures)::bigint
  FROM analytics_workflow_daily d
  WHERE d.org_id = app.org_id() AND d.day >= p_from AND d.day <= p_to
  GROUP BY d.workflow_id
$$;

-- Refresh the view and record when, in the caller's transaction (maintenance only;
-- dl.system()). Concurrent refreshers queue on the view's lock.
CREATE FUNCTION app.analytics_refresh() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  UPDATE analytics_state SET refreshed_at = now();
  REFRESH MATERIALIZED VIEW CONCURRENTLY analytics_org_daily;
  REFRESH MATERIALIZED VIEW CONCURRENTLY analytics_workflow_daily;
END $$;

-- Ownership and privileges: the view and the functions belong to the maintenance role
-- (which refreshes); the run-time role reads only through the org-filtering functions.
ALTER MATERIALIZED VIEW analytics_org_daily OWNER TO datalayer_maint;
ALTER MATERIALIZED VIEW analytics_workflow_daily OWNER TO datalayer_maint;
REVOKE ALL ON analytics_org_daily, analytics_workflow_daily FROM PUBLIC;
REVOKE ALL ON analytics_state FROM PUBLIC;
-- REFRESH ... CONCURRENTLY diffs through a temporary table, created as the view's owner.
DO $$ BEGIN
  EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO datalayer_maint', current_database());
END $$;
DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY['app.bigint_array_add(bigint[], bigint[])',
                           'app.sum_arrays(bigint[])',
                           'app.workflow_histogram(integer[], integer)',
                           'app.workflow_stats_record_many(uuid[], uuid[], text[], bigint[], timestamptz[])']
  LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO datalayer_app, datalayer_maint', f);
  END LOOP;
  FOREACH f IN ARRAY ARRAY['app.analytics_org_days(date, date)',
                           'app.analytics_org_totals(date, date)',
                           'app.analytics_workflow_totals(date, date)']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO datalayer_app, datalayer_maint', f);
  END LOOP;
  FOREACH f IN ARRAY ARRAY['app.analytics_rebuild_day(date)', 'app.analytics_refresh()']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO datalayer_maint', f);
  END LOOP;
END $$;

-- System metrics ------------------------------------------------------------------------------
-- A time series store for operator-level metrics (database latency, pool use, queue depths,
-- cache hit rates…): points (series, time, value) of series (name, labels jsonb), partitioned
-- by time, rolled up 1 minute → 1 hour → 1 day (count, sum, min, max) by an idempotent job,
-- and dropped by whole partitions per resolution (metrics.retention, editable).
--
-- Tenancy: these are the platform's own figures, not a tenant's, so they live in schema
-- `metrics`, reachable by the maintenance role (dl.system()) only; the run-time role has no
-- privilege there. (Per-tenant usage is workflow analytics above, under RLS. A tenant-facing
-- metric would be an org_id label read through a definer function, like the views above.)
-- The schema is not `public` on purpose: app.ensure_partitions manages every maintenance-owned
-- partitioned table in `public` by months, and metrics need days.
CREATE SCHEMA metrics;
REVOKE ALL ON SCHEMA metrics FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA metrics TO datalayer_maint;
-- Names only (so that `datalayer check` can prepare the metrics queries on any pooled
-- connection): the run-time role holds no privilege on any table or function here.
GRANT USAGE ON SCHEMA metrics TO datalayer_app;

CREATE TABLE metrics.series (
  id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name        text NOT NULL CONSTRAINT series_name_format
              CHECK (name ~ '^[a-zA-Z_:][a-zA-Z0-9_:.]{0,199}$'),
  labels      jsonb NOT NULL DEFAULT '{}' CONSTRAINT series_labels_object
              CHECK (jsonb_typeof(labels) = 'object' AND pg_column_size(labels) <= 2048),
  created_at  timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT series_key UNIQUE (name, labels)
);
CREATE INDEX series_labels_idx ON metrics.series USING gin (labels jsonb_path_ops);

-- Raw points: daily partitions. Roll-ups: 1m daily, 1h monthly, 1d yearly partitions.
CREATE TABLE metrics.points (
  series_id  bigint NOT NULL,
  time       timestamptz NOT NULL,
  value      double precision NOT NULL
) PARTITION BY RANGE (time);
CREATE INDEX points_series_idx ON metrics.points (series_id, time);

CREATE TABLE metrics.rollup_1m (
  series_id bigint NOT NULL, bucket timestamptz NOT NULL, count bigint NOT NULL,
  sum double precision NOT NULL, min double precision NOT NULL, max double precision NOT NULL,
  PRIMARY KEY (series_id, bucket)
) PARTITION BY RANGE (bucket);
CREATE TABLE metrics.rollup_1h (LIKE metrics.rollup_1m INCLUDING ALL) PARTITION BY RANGE (bucket);
CREATE TABLE metrics.rollup_1d (LIKE metrics.rollup_1m INCLUDING ALL) PARTITION BY RANGE (bucket);

-- Per resolution: its table, partition size, retention, and how far the job has rolled up
-- (every bucket before `through` is final; later ones are computed from raw points on read).
CREATE TABLE metrics.resolutions (
  resolution  text PRIMARY KEY,
  step        interval NOT NULL,
  tbl         text NOT NULL,
  part_unit   text NOT NULL CHECK (part_unit IN ('day', 'month', 'year')),
  keep        interval NOT NULL CHECK (keep > interval '0'),
  through     timestamptz
);
INSERT INTO metrics.resolutions (resolution, step, tbl, part_unit, keep) VALUES
  ('raw', interval '1 second', 'points', 'day', interval '3 days'),
  ('1m', interval '1 minute', 'rollup_1m', 'day', interval '30 days'),
  ('1h', interval '1 hour', 'rollup_1h', 'month', interval '400 days'),
  ('1d', interval '1 day', 'rollup_1d', 'year', interval '3650 days');

-- Partitions of p_tbl (metrics.<p_tbl>_pYYYYMMDD, one per p_unit) covering [p_from, p_to);
-- a default partition catches what falls outside, and its rows move into a partition created
-- for them. Idempotent; returns the number created.
CREATE FUNCTION metrics.ensure_partitions(p_tbl text, p_unit text, p_from timestamptz,
                                          p_to timestamptz)
RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, metrics, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  v_start timestamptz := date_trunc(p_unit, p_from);
  v_end timestamptz;
  v_name text;
  v_key text := CASE WHEN p_tbl = 'points' THEN 'time' ELSE 'bucket' END;
  v_made integer := 0;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('datalayer.metrics.partitions'));
  IF to_regclass(format('metrics.%I', p_tbl || '_default')) IS NULL THEN
    EXECUTE format('CREATE TABLE metrics.%I PARTITION OF metrics.%I DEFAULT',
                   p_tbl || '_default', p_tbl);
  END IF;
  WHILE v_start < p_to LOOP
    v_end := v_start + ('1 ' || p_unit)::interval;
    v_name := format('%s_p%s', p_tbl, to_char(v_start, 'YYYYMMDD'));
    IF to_regclass(format('metrics.%I', v_name)) IS NULL THEN
      EXECUTE format('CREATE TABLE metrics.%I (LIKE metrics.%I INCLUDING DEFAULTS)',
                     v_name, p_tbl);
      EXECUTE format('WITH moved AS (DELETE FROM metrics.%I WHERE %I >= $1 AND %I < $2 '
                     'RETURNING *) INSERT INTO metrics.%I SELECT * FROM moved',
                     p_tbl || '_default', v_key, v_key, v_name) USING v_start, v_end;
      EXECUTE format('ALTER TABLE metrics.%I ATTACH PARTITION metrics.%I FOR VALUES FROM (%L) '
                     'TO (%L)', p_tbl, v_name, v_start, v_end);
      v_made := v_made + 1;
    END IF;
    v_start := v_end;
  END LOOP;
  RETURN v_made;
END $$;

-- Roll up, idempotently: 1m buckets from raw points, then 1h from 1m, then 1d from 1h, for
-- the closed buckets after each resolution's `through` (re-aggregating the last
-- p_overlap of them, for late points), at most p_max_span per run (the first run covers the
-- raw retention; catch-up after a longer downtime
-- takes several runs). Buckets are recomputed from their source, never incremented, so
-- running twice, or concurrently (one waits on the advisory lock), changes nothing.
-- Returns the rows written per resolution.
CREATE FUNCTION metrics.rollup(p_overlap interval DEFAULT interval '5 minutes',
                               p_max_span interval DEFAULT interval '4 days')
RETURNS TABLE (resolution text, rows_written bigint)
LANGUAGE plpgsql SET search_path = pg_catalog, metrics, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  r record;
  v_src record;
  v_from timestamptz;
  v_to timestamptz;
  v_src_through timestamptz;
  v_rows bigint;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('datalayer.metrics.rollup'));
  FOR r IN SELECT * FROM metrics.resolutions WHERE metrics.resolutions.resolution <> 'raw'
           ORDER BY step LOOP
    SELECT * INTO v_src FROM metrics.resolutions s
    WHERE s.step < r.step ORDER BY s.step DESC LIMIT 1;
    -- The source is final up to: now - one step for raw (late points), else its through.
    v_src_through := CASE WHEN v_src.resolution = 'raw'
                          THEN date_trunc('minute', now()) - interval '1 minute'
                          ELSE v_src.through END;
    CONTINUE WHEN v_src_through IS NULL;
    v_to := date_bin(r.step, v_src_through, timestamptz '2000-01-01');
    v_from := coalesce(r.through - CASE WHEN v_src.resolution = 'raw' THEN p_overlap
                                        ELSE r.step END,
                       date_bin(r.step, now() - (SELECT keep FROM metrics.resolutions
                                                 WHERE metrics.resolutions.resolution = 'raw'),
                                timestamptz '2000-01-01'));
    v_to := least(v_to, v_from + p_max_span);
    CONTINUE WHEN v_to <= v_from;
    PERFORM metrics.ensure_partitions(r.tbl, r.part_unit, v_from, v_to);
    IF v_src.resolution = 'raw' THEN
      EXECUTE format(
        'INSERT INTO metrics.%I (series_id, bucket, count, sum, min, max) '
        'SELECT p.series_id, date_bin($3, p.time, timestamptz ''2000-01-01''), count(*), '
        '       sum(p.value), min(p.value), max(p.value) '
        'FROM metrics.points p WHERE p.time >= $1 AND p.time < $2 GROUP BY 1, 2 '
        'ON CONFLICT (series_id, bucket) DO UPDATE SET count = excluded.count, '
        '  sum = excluded.sum, min = excluded.min, max = excluded.max', r.tbl)
        USING v_from, v_to, r.step;
    ELSE
      EXECUTE format(
        'INSERT INTO metrics.%I (series_id, bucket, count, sum, min, max) '
        'SELECT s.series_id, date_bin($3, s.bucket, timestamptz ''2000-01-01''), '
        '       sum(s.count)::bigint, sum(s.sum), min(s.min), max(s.max) '
        'FROM metrics.%I s WHERE s.bucket >= $1 AND s.bucket < $2 GROUP BY 1, 2 '
        'ON CONFLICT (series_id, bucket) DO UPDATE SET count = excluded.count, '
        '  sum = excluded.sum, min = excluded.min, max = excluded.max', r.tbl, v_src.tbl)
        USING v_from, v_to, r.step;
    END IF;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    UPDATE metrics.resolutions s SET through = v_to WHERE s.resolution = r.resolution;
    resolution := r.resolution;
    rows_written := v_rows;
    RETURN NEXT;
  END LOOP;
END $$;

-- Retention: drop every partition of each resolution that ends before now() - keep (whole
-- partitions only: the partition holding the cut-off stays until it has aged out entirely),
-- and delete the default partitions' rows older than that. Returns the partitions dropped.
CREATE FUNCTION metrics.apply_retention() RETURNS SETOF text
LANGUAGE plpgsql SET search_path = pg_catalog, metrics, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  r record;
  p record;
  v_cut timestamptz;
  v_upper timestamptz;
BEGIN
  PERFORM pg_advisory_xact_lock(hashtext('datalayer.metrics.partitions'));
  FOR r IN SELECT * FROM metrics.resolutions LOOP
    v_cut := now() - r.keep;
    FOR p IN SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = format('metrics.%I', r.tbl)::regclass ORDER BY c.relname LOOP
      IF p.bound = 'DEFAULT' THEN
        EXECUTE format('DELETE FROM metrics.%I WHERE %I < $1', p.name,
                       CASE WHEN r.tbl = 'points' THEN 'time' ELSE 'bucket' END) USING v_cut;
        CONTINUE;
      END IF;
      v_upper := substring(p.bound FROM 'TO \(''([^'']+)''\)')::timestamptz;
      IF v_upper <= v_cut THEN
        EXECUTE format('DROP TABLE metrics.%I', p.name);
        RETURN NEXT p.name;
      END IF;
    END LOOP;
  END LOOP;
END $$;

ALTER TABLE metrics.series OWNER TO datalayer_maint;
ALTER TABLE metrics.points OWNER TO datalayer_maint;
ALTER TABLE metrics.rollup_1m OWNER TO datalayer_maint;
ALTER TABLE metrics.rollup_1h OWNER TO datalayer_maint;
ALTER TABLE metrics.rollup_1d OWNER TO datalayer_maint;
ALTER TABLE metrics.resolutions OWNER TO datalayer_maint;
ALTER FUNCTION metrics.ensure_partitions(text, text, timestamptz, timestamptz)
  OWNER TO datalayer_maint;
ALTER FUNCTION metrics.rollup(interval, interval) OWNER TO datalayer_maint;
ALTER FUNCTION metrics.apply_retention() OWNER TO datalayer_maint;
REVOKE ALL ON FUNCTION metrics.ensure_partitions(text, text, timestamptz, timestamptz),
                       metrics.rollup(interval, interval), metrics.apply_retention()
  FROM PUBLIC;
-- Raw partitions for today and the next two days (the rollup job keeps them ahead), owned by
-- the maintenance role like every later one (retention drops them).
DO $$ BEGIN
  SET LOCAL ROLE datalayer_maint;
  PERFORM metrics.ensure_partitions('points', 'day', now(), now() + interval '3 days');
  RESET ROLE;
END $$;
