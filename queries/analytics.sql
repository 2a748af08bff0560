-- Workflow analytics (schema/0018_analytics.sql): daily roll-ups per workflow (live),
-- organization figures from the analytics_org_daily materialized view (as of its last
-- refresh). Ranges are UTC dates, both ends included.

-- name: org_range :one
-- The context organization's totals over [:from_day, :to_day] (as of the last refresh).
SELECT d.executions, d.successes, d.failures, d.cancellations,
       (d.total_duration_ms::float8 / nullif(d.timed_executions, 0)) AS avg_duration_ms,
       app.workflow_stats_quantile(d.duration_histogram, 0.95, d.min_duration_ms,
                                   d.max_duration_ms) AS p95_duration_ms
FROM app.analytics_org_totals(:from_day::date, :to_day::date) d;

-- name: workflow_range :one
-- One workflow's totals over [:from_day, :to_day] (nothing when the context cannot see it).
WITH d AS (
  SELECT d.* FROM workflow_daily_stats d
  WHERE d.org_id = app.org_id() AND d.workflow_id = :workflow_id
    AND d.day >= :from_day::date AND d.day <= :to_day::date)
SELECT coalesce(sum(d.executions), 0)::bigint AS executions,
       coalesce(sum(d.successes), 0)::bigint AS successes,
       coalesce(sum(d.failures), 0)::bigint AS failures,
       coalesce(sum(d.cancellations), 0)::bigint AS cancellations,
       (sum(d.total_duration_ms)::float8 / nullif(sum(d.timed_executions), 0)) AS avg_duration_ms,
       app.workflow_stats_quantile(
         (SELECT array_agg(x.v ORDER BY x.i) FROM (
            SELECT u.i, sum(u.c)::bigint AS v
            FROM d d2, unnest(d2.duration_histogram) WITH ORDINALITY u (c, i) GROUP BY u.i) x),
         0.95, min(d.min_duration_ms), max(d.max_duration_ms)) AS p95_duration_ms
FROM d;

-- name: user_range :one
-- Totals over [:from_day, :to_day] of the workflows :user_id owns (that the context sees).
WITH d AS (
  SELECT d.* FROM workflows w
  JOIN workflow_daily_stats d ON d.org_id = w.org_id AND d.workflow_id = w.id
  WHERE w.org_id = app.org_id() AND w.owner_id = :user_id
    AND d.day >= :from_day::date AND d.day <= :to_day::date)
SELECT coalesce(sum(d.executions), 0)::bigint AS executions,
       coalesce(sum(d.successes), 0)::bigint AS successes,
       coalesce(sum(d.failures), 0)::bigint AS failures,
       coalesce(sum(d.cancellations), 0)::bigint AS cancellations,
       (sum(d.total_duration_ms)::float8 / nullif(sum(d.timed_executions), 0)) AS avg_duration_ms,
       app.workflow_stats_quantile(
         (SELECT array_agg(x.v ORDER BY x.i) FROM (
            SELECT u.i, sum(u.c)::bigint AS v
            FROM d d2, unnest(d2.duration_histogram) WITH ORDINALITY u (c, i) GROUP BY u.i) x),
         0.95, min(d.min_duration_ms), max(d.max_duration_ms)) AS p95_duration_ms
FROM d;

-- name: daily :many
-- The context organization's figures per day over [:from_day, :to_day] (days with
-- executions only, as of the last refresh), oldest first.
SELECT d.day, d.executions, d.successes, d.failures, d.cancellations,
       (d.total_duration_ms::float8 / nullif(d.timed_executions, 0)) AS avg_duration_ms,
       d.p95_duration_ms
FROM app.analytics_org_days(:from_day::date, :to_day::date) d
ORDER BY d.day;

-- name: top_failing :many
-- The workflows with the most failures over [:from_day, :to_day] that the context may see
-- (as of the last refresh).
SELECT t.workflow_id, w.name, t.executions, t.failures,
       (t.failures::float8 / nullif(t.executions, 0)) AS failure_rate
FROM app.analytics_workflow_totals(:from_day::date, :to_day::date) t
JOIN workflows w ON w.org_id = app.org_id() AND w.id = t.workflow_id
WHERE t.failures > 0
ORDER BY t.failures DESC, t.workflow_id
LIMIT :limit;

-- name: busiest_hours :many
-- Executions per UTC hour of day over [:from_day, :to_day], busiest first.
SELECT (h.i - 1)::integer AS hour, sum(h.n)::bigint AS executions
FROM app.analytics_org_days(:from_day::date, :to_day::date) d
CROSS JOIN LATERAL unnest(d.hourly) WITH ORDINALITY AS h (n, i)
GROUP BY h.i
HAVING sum(h.n) > 0
ORDER BY executions DESC, hour
LIMIT :limit;

-- name: refresh :exec
-- Maintenance (dl.system()): refresh analytics_org_daily CONCURRENTLY.
SELECT app.analytics_refresh();

-- name: rebuild_day :scalar
-- Maintenance (dl.system()): rebuild one day's roll-ups from executions; rows written.
SELECT app.analytics_rebuild_day(:day::date);

-- name: state :one
-- Maintenance (dl.system()): the view's last refresh and the last rebuilt day.
SELECT refreshed_at, rebuilt_through FROM analytics_state;

-- name: set_rebuilt :exec
-- Maintenance (dl.system()): record the last day the rollup job rebuilt.
UPDATE analytics_state SET rebuilt_through = greatest(rebuilt_through, :day::date);
