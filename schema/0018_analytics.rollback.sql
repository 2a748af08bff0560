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
