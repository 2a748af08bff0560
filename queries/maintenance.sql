-- The last run of each maintenance job (schema/0017_query_performance.sql): maintenance role
-- only, from dl.system(). See datalayer/maintenance.py.

-- name: start :scalar
-- A run of :job begins (finished_at and ok NULL until it ends), unless a run finished at or
-- after :since, when the caller's maintain() began (another process has just done the
-- work; the jobs are periodic clean-ups, so that run covers this one): then NULL.
INSERT INTO maintenance_runs AS m (job, started_at, instance)
VALUES (:job, clock_timestamp(), :instance)
ON CONFLICT (job) DO UPDATE
SET started_at = EXCLUDED.started_at, finished_at = NULL, ok = NULL, error = NULL,
    instance = EXCLUDED.instance
WHERE m.finished_at IS NULL OR m.finished_at < :since
RETURNING started_at;

-- name: finished :exec
-- The run of :job ended: ok, or the error, and the job's counts.
INSERT INTO maintenance_runs (job, started_at, finished_at, ok, error, counts, instance,
                              last_ok_at, runs, failures)
VALUES (:job, :started_at, clock_timestamp(), :ok, :error, :counts, :instance,
        CASE WHEN :ok THEN clock_timestamp() END, 1, CASE WHEN :ok THEN 0 ELSE 1 END)
ON CONFLICT (job) DO UPDATE
SET started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at, ok = EXCLUDED.ok,
    error = EXCLUDED.error, counts = EXCLUDED.counts, instance = EXCLUDED.instance,
    last_ok_at = coalesce(EXCLUDED.last_ok_at, maintenance_runs.last_ok_at),
    runs = maintenance_runs.runs + 1,
    failures = maintenance_runs.failures + EXCLUDED.failures;

-- name: last_runs :many
-- Every job's last run, by name.
SELECT job, started_at, finished_at, ok, error, counts, instance, last_ok_at, runs, failures
FROM maintenance_runs
ORDER BY job;
