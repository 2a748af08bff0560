-- Slow-query samples (schema/0017_query_performance.sql): maintenance role only, from
-- dl.system(). Written by QueryMetrics' flush task; read by `datalayer stats`.

-- name: record :exec
-- One batch of samples: the arrays are parallel, one element per slow execution.
INSERT INTO query_performance (query_name, duration_ms, row_count, sqlstate, instance,
                               executed_at)
SELECT x.query_name, x.duration_ms, x.row_count, x.sqlstate, :instance::text, x.executed_at
FROM unnest(:query_names::text[], :durations_ms::float8[], :rows_::bigint[],
            :sqlstates::text[], :executed_at::timestamptz[])
     AS x(query_name, duration_ms, row_count, sqlstate, executed_at);

-- name: slowest :many
-- Samples since :since per query, the largest total first: how many, their median, p95 and
-- maximum duration, and the last one.
SELECT query_name, count(*)::bigint AS samples,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
       max(duration_ms) AS max_ms, max(executed_at) AS last_at
FROM query_performance
WHERE executed_at >= :since
GROUP BY query_name
ORDER BY sum(duration_ms) DESC
LIMIT :limit;

-- name: prune :execrows
-- Retention, one batch: samples executed before :before, up to :batch rows.
DELETE FROM query_performance
WHERE id = ANY (ARRAY(SELECT id FROM query_performance WHERE executed_at < :before
                      ORDER BY executed_at LIMIT :batch));
