-- Rate limits (schema/0010_ratelimit.sql). `check` runs on the service pool, outside any
-- tenant session, in one round trip; the others are maintenance and reporting queries for
-- dl.system() (datalayer_app holds no privilege on these tables).

-- name: check :one
-- One decision for one key: the single INSERT … ON CONFLICT DO UPDATE … RETURNING inside
-- app.rate_limit_check. Times in microseconds of the server's clock.
SELECT allowed, remaining, retry_after_us, reset_after_us, now_us
FROM app.rate_limit_check(:key, :gcra, :interval_us, :capacity, :cost);

-- name: record_violations :many
-- Add a batch of aggregated rejections (one element per key and window, no duplicates);
-- returns each row's new total, which the caller compares with its alert thresholds.
INSERT INTO rate_limit_violations AS v (key, window_start, window_s, operation, count,
                                        first_at, last_at)
SELECT b.key, b.window_start, :window_s, b.operation, b.count, b.first_at, b.last_at
FROM unnest(:keys::text[], :window_starts::timestamptz[], :operations::text[],
            :counts::bigint[], :first_ats::timestamptz[], :last_ats::timestamptz[])
     AS b (key, window_start, operation, count, first_at, last_at)
ON CONFLICT (key, window_start) DO UPDATE
SET count = v.count + excluded.count,
    first_at = least(v.first_at, excluded.first_at),
    last_at = greatest(v.last_at, excluded.last_at)
RETURNING key, window_start, count;

-- name: violations :many
-- Aggregated rejections in windows starting at or after :since, the most rejected first.
SELECT key, window_start, window_s, operation, count, first_at, last_at
FROM rate_limit_violations
WHERE window_start >= :since
ORDER BY count DESC, key, window_start
LIMIT :limit;

-- name: prune_violations :execrows
-- Retention: drop windows that started before :before.
DELETE FROM rate_limit_violations WHERE window_start < :before;

-- name: sweep :execrows
-- Drop up to :batch buckets that are full again (a missing row means a full bucket, so
-- this changes no decision). The outer `expires_us < …` is re-checked on the row version
-- a concurrent check may have just written, so a bucket drained meanwhile stays.
DELETE FROM rate_limit_buckets b
WHERE b.expires_us < (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
  AND b.key = ANY (ARRAY(
    SELECT key FROM rate_limit_buckets
    WHERE expires_us < (extract(epoch FROM clock_timestamp()) * 1000000)::bigint
    LIMIT :batch));
