-- The PostgreSQL cache backend (datalayer/cache/postgres.py) and cache statistics. Every
-- query here runs as the maintenance role; datalayer_app may run none of them.

-- name: get :scalar
-- A live entry's stored bytes (expired rows wait for cleanup but are never returned).
SELECT value FROM cache_entries
WHERE namespace = :namespace AND key = :key AND expires_at > clock_timestamp();

-- name: get_many :many
SELECT key, value FROM cache_entries
WHERE namespace = :namespace AND key = ANY (:keys::text[]) AND expires_at > clock_timestamp();

-- name: store :scalar
-- Write an entry with its tags (guarded by :since when not NULL; see app.cache_store).
SELECT app.cache_store(:namespace, :key, :value, :ttl_ms, :tags::text[], :guard::text[],
                       :since, :lease);

-- name: store_many :exec
-- Unguarded writes of several entries (namespace, key, value, ttl, tags as one array each;
-- tags as a JSON array of arrays, since SQL arrays cannot be ragged).
INSERT INTO cache_entries AS e (namespace, key, value, tags, expires_at)
SELECT x.namespace, x.key, x.value,
       ARRAY(SELECT jsonb_array_elements_text(x.tags)),
       clock_timestamp() + x.ttl_ms * interval '1 millisecond'
FROM unnest(:namespaces::text[], :keys::text[], :values_::bytea[], :ttls_ms::bigint[],
            :tags_json::jsonb[]) AS x (namespace, key, value, ttl_ms, tags)
ON CONFLICT (namespace, key) DO UPDATE
  SET value = EXCLUDED.value, tags = EXCLUDED.tags, expires_at = EXCLUDED.expires_at;

-- name: invalidate :scalar
-- Bump :tags and delete what carries them, plus :keys of :namespace, or all of it (:all_).
SELECT app.cache_invalidate(:tags::text[], :namespace, :keys::text[], :all_);

-- name: lease :one
SELECT value, leased, clock
FROM app.cache_lease(:namespace, :key, :token, :ttl_ms, :if_absent);

-- name: release :exec
DELETE FROM cache_leases WHERE namespace = :namespace AND key = :key AND token = :token;

-- name: clock :scalar
SELECT app.cache_clock();

-- name: incr :scalar
SELECT app.cache_incr(:namespace, :key, :ttl_ms);

-- name: cleanup_expired :execrows
-- One batch of expired entries: rows another cleaner holds are skipped, and each batch is
-- its own short transaction (the caller loops), so no long locks. now() (stable, unlike
-- clock_timestamp()) keeps the expiry index usable; the TIDs are then deleted directly.
DELETE FROM cache_entries
WHERE ctid = ANY (ARRAY(SELECT ctid FROM cache_entries
                        WHERE expires_at <= now()
                        LIMIT :batch FOR UPDATE SKIP LOCKED));

-- name: cleanup_aux :scalar
-- Expired leases and counters, and versions older than :version_ttl_s seconds.
WITH l AS (DELETE FROM cache_leases WHERE expires_at <= now() RETURNING 1),
     c AS (DELETE FROM cache_counters WHERE expires_at <= now() RETURNING 1),
     v AS (DELETE FROM cache_versions
           WHERE updated_at < now() - :version_ttl_s * interval '1 second'
           RETURNING 1)
SELECT (SELECT count(*) FROM l) + (SELECT count(*) FROM c) + (SELECT count(*) FROM v)
       AS removed;

-- name: record_stats :exec
-- One row per namespace of one process's counters since its previous flush.
INSERT INTO cache_stats (instance, backend, namespace, hits, misses, sets, deletes, evictions,
                         errors, loads, load_ms, refreshes)
SELECT :instance::text, :backend::text, x.*
FROM unnest(:namespaces::text[], :hits::bigint[], :misses::bigint[], :sets::bigint[],
            :deletes::bigint[], :evictions::bigint[], :errors::bigint[], :loads::bigint[],
            :load_ms::float8[], :refreshes::bigint[]) AS x;

-- name: prune_stats :execrows
-- Statistics older than :keep_days days (each process's maintenance runs it).
DELETE FROM cache_stats WHERE recorded_at < now() - :keep_days * interval '1 day';

-- name: stats_totals :many
-- Totals per namespace since :since, over every process (for dashboards and checks).
SELECT namespace, sum(hits)::bigint AS hits, sum(misses)::bigint AS misses,
       sum(sets)::bigint AS sets, sum(evictions)::bigint AS evictions,
       sum(errors)::bigint AS errors, sum(loads)::bigint AS loads,
       sum(load_ms) AS load_ms
FROM cache_stats WHERE recorded_at >= :since
GROUP BY namespace ORDER BY namespace;
