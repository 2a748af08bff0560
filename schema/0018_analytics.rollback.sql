-- Restore app.workflow_stats_record as schema/0007_workflows.sql defines it.
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
END $$;
-- Restore the executions triggers as schema/0008_executions.sql defines them.
CREATE OR REPLACE FUNCTION app.executions_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  r record;
BEGIN
  INSERT INTO execution_transitions (org_id, execution_id, from_status, to_status, attempt,
                                     worker_id, actor_id, reason)
  SELECT n.org_id, n.id, NULL, n.status, n.attempt, n.worker_id, app.user_id(), n.status_reason
  FROM new_rows n;
  FOR r IN SELECT n.org_id, n.workflow_id, n.status, n.duration_ms FROM new_rows n
           WHERE n.status IN ('succeeded', 'failed', 'cancelled', 'timed_out')
           ORDER BY n.org_id, n.workflow_id LOOP
    PERFORM app.workflow_stats_record(r.org_id, r.workflow_id, r.status, r.duration_ms);
  END LOOP;
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
  IF v_finished > 0 THEN
    FOR r IN SELECT n.org_id, n.workflow_id, n.status, n.duration_ms
             FROM new_rows n JOIN old_rows o ON o.org_id = n.org_id AND o.id = n.id
             WHERE n.status IS DISTINCT FROM o.status
               AND n.status IN ('succeeded', 'failed', 'cancelled', 'timed_out')
             ORDER BY n.org_id, n.workflow_id LOOP
      PERFORM app.workflow_stats_record(r.org_id, r.workflow_id, r.status, r.duration_ms);
    END LOOP;
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

DROP FUNCTION app.workflow_stats_record_many(uuid[], uuid[], text[], bigint[], timestamptz[]);
DROP FUNCTION app.workflow_histogram(integer[], integer);
DROP FUNCTION app.analytics_refresh();
DROP FUNCTION app.analytics_workflow_totals(date, date);
DROP FUNCTION app.analytics_org_totals(date, date);
DROP FUNCTION app.analytics_org_days(date, date);
DROP MATERIALIZED VIEW analytics_workflow_daily;
DROP MATERIALIZED VIEW analytics_org_daily;
DROP TABLE analytics_state;
DROP FUNCTION app.analytics_rebuild_day(date);
DROP AGGREGATE app.sum_arrays(bigint[]);
DROP FUNCTION app.bigint_array_add(bigint[], bigint[]);
DROP TABLE workflow_daily_stats;
DO $$ BEGIN
  EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM datalayer_maint', current_database());
END $$;
DROP SCHEMA metrics CASCADE;
