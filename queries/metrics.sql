-- System metrics (schema/0018_analytics.sql, schema `metrics`): operator-level time series,
-- maintenance role only (dl.system()).

-- name: record :execrows
-- Bulk ingest: same-length arrays of names, labels, times and values. Unknown series are
-- created (concurrent ingests of a new series agree on one id).
WITH input AS (
  SELECT * FROM unnest(:names::text[], :labels::jsonb[], :times::timestamptz[],
                       :values::float8[]) AS i (name, labels, time, value)),
keys AS (SELECT DISTINCT name, labels FROM input),
known AS (SELECT s.id, s.name, s.labels FROM metrics.series s
          JOIN keys k ON s.name = k.name AND s.labels = k.labels),
added AS (INSERT INTO metrics.series (name, labels)
          SELECT k.name, k.labels FROM keys k
          WHERE NOT EXISTS (SELECT 1 FROM known x WHERE x.name = k.name AND x.labels = k.labels)
          ON CONFLICT (name, labels) DO UPDATE SET name = excluded.name
          RETURNING id, name, labels),
ids AS (SELECT * FROM known UNION ALL SELECT * FROM added)
INSERT INTO metrics.points (series_id, time, value)
SELECT ids.id, i.time, i.value FROM input i
JOIN ids ON ids.name = i.name AND ids.labels = i.labels;

-- name: series :many
-- The series :name whose labels contain :labels (all of them aggregated), over
-- [:start, :end) in buckets of :resolution's step: final roll-ups before the resolution's
-- `through`, raw points aggregated on the fly after it.
WITH r AS (SELECT * FROM metrics.resolutions WHERE resolution = :resolution),
s AS (SELECT id FROM metrics.series WHERE name = :name AND labels @> :labels::jsonb),
parts AS (
  SELECT m.bucket, m.count, m.sum, m.min, m.max FROM metrics.rollup_1m m, r
  WHERE r.resolution = '1m' AND m.series_id IN (SELECT id FROM s)
    AND m.bucket >= :start AND m.bucket < least(:end, r.through)
  UNION ALL
  SELECT m.bucket, m.count, m.sum, m.min, m.max FROM metrics.rollup_1h m, r
  WHERE r.resolution = '1h' AND m.series_id IN (SELECT id FROM s)
    AND m.bucket >= :start AND m.bucket < least(:end, r.through)
  UNION ALL
  SELECT m.bucket, m.count, m.sum, m.min, m.max FROM metrics.rollup_1d m, r
  WHERE r.resolution = '1d' AND m.series_id IN (SELECT id FROM s)
    AND m.bucket >= :start AND m.bucket < least(:end, r.through)
  UNION ALL
  SELECT date_bin(r.step, p.time, timestamptz '2000-01-01'), count(*), sum(p.value),
         min(p.value), max(p.value)
  FROM metrics.points p, r
  WHERE p.series_id IN (SELECT id FROM s)
    AND p.time >= greatest(:start, coalesce(r.through, '-infinity')) AND p.time < :end
  GROUP BY 1)
SELECT bucket, sum(count)::bigint AS count, sum(sum) AS sum, min(min) AS min, max(max) AS max,
       (sum(sum) / nullif(sum(count), 0)) AS avg
FROM parts
GROUP BY bucket
ORDER BY bucket;

-- name: resolutions :many
-- Every resolution: step, retention and how far it is rolled up.
SELECT resolution, step, keep, through FROM metrics.resolutions ORDER BY step;

-- name: set_retention :execrows
-- How long :resolution (raw, 1m, 1h, 1d) is kept.
UPDATE metrics.resolutions SET keep = :keep::interval WHERE resolution = :resolution;

-- name: rollup :many
-- The roll-up job's statement (see metrics.rollup).
SELECT resolution, rows_written FROM metrics.rollup();

-- name: ensure_raw_partitions :scalar
-- Raw partitions from today to :days_ahead days ahead; how many were created.
SELECT metrics.ensure_partitions('points', 'day', now(),
                                 now() + make_interval(days => :days_ahead::integer));

-- name: apply_retention :many
-- Drop the partitions past each resolution's retention; their names.
SELECT metrics.apply_retention() AS partition;
