-- Catalog figures behind `datalayer stats` recommendations (datalayer/stats.py), run from
-- dl.system(). Thresholds are parameters so operators (and tests) can tune them.

-- name: seq_scanned_tables :many
-- Tables of at least :min_rows rows read by sequential scans more often than by indexes.
SELECT format('%I.%I', schemaname, relname) AS table_name, n_live_tup::int8 AS live_rows,
       seq_scan::int8 AS seq_scans, coalesce(idx_scan, 0)::int8 AS index_scans,
       seq_tup_read::int8 AS rows_read_by_seq_scans
FROM pg_stat_user_tables
WHERE n_live_tup >= :min_rows AND seq_scan > coalesce(idx_scan, 0) AND seq_scan >= :min_scans
ORDER BY seq_tup_read DESC
LIMIT 50;

-- name: unused_indexes :many
-- Indexes never scanned since statistics were reset, at least :min_bytes large, that back
-- no constraint (primary key, unique, exclusion: those enforce rules even unread).
SELECT format('%I.%I', s.schemaname, s.indexrelname) AS index_name,
       format('%I.%I', s.schemaname, s.relname) AS table_name,
       pg_relation_size(s.indexrelid)::int8 AS bytes
FROM pg_stat_user_indexes s
JOIN pg_index i ON i.indexrelid = s.indexrelid
WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary AND NOT i.indisexclusion
  AND pg_relation_size(s.indexrelid) >= :min_bytes
  AND NOT EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = s.indexrelid)
ORDER BY bytes DESC
LIMIT 50;

-- name: duplicate_indexes :many
-- Pairs of indexes of one table where the first is redundant: the same definition
-- (columns, operator classes, expressions, predicate) as the second, or, for plain btree
-- indexes, a leading prefix of it. A unique index is only redundant with an identical one.
SELECT format('%I.%I', n.nspname, ci.relname) AS index_name,
       format('%I.%I', n.nspname, co.relname) AS covered_by,
       format('%I.%I', n.nspname, t.relname) AS table_name,
       (a.indkey::text = b.indkey::text) AS identical,
       pg_relation_size(a.indexrelid)::int8 AS bytes
FROM pg_index a
JOIN pg_index b ON b.indrelid = a.indrelid AND b.indexrelid <> a.indexrelid
JOIN pg_class ci ON ci.oid = a.indexrelid
JOIN pg_class co ON co.oid = b.indexrelid
JOIN pg_class t ON t.oid = a.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'
  AND ci.relam = co.relam
  AND a.indexprs IS NULL AND b.indexprs IS NULL
  AND a.indpred IS NULL AND b.indpred IS NULL
  AND NOT a.indisprimary
  AND (
    -- identical: keep the primary key / unique one, or the older one (lower oid)
    (a.indkey::text = b.indkey::text AND a.indclass::text = b.indclass::text
     AND (b.indisprimary OR (b.indisunique AND NOT a.indisunique)
          OR (a.indisunique = b.indisunique AND b.indexrelid < a.indexrelid)))
    OR
    -- a strict leading prefix of a btree index (a non-unique, so no rule is lost)
    (NOT a.indisunique AND ci.relam = (SELECT oid FROM pg_am WHERE amname = 'btree')
     AND a.indnatts = a.indnkeyatts AND a.indnkeyatts < b.indnkeyatts
     AND (string_to_array(b.indkey::text, ' '))[1 : a.indnkeyatts]
         = string_to_array(a.indkey::text, ' ')
     AND (string_to_array(b.indclass::text, ' '))[1 : a.indnkeyatts]
         = string_to_array(a.indclass::text, ' '))
  )
ORDER BY 1;

-- name: dead_tuples :many
-- Tables whose dead rows exceed :min_dead and :ratio of their live rows.
SELECT format('%I.%I', schemaname, relname) AS table_name, n_live_tup::int8 AS live_rows,
       n_dead_tup::int8 AS dead_rows, last_vacuum, last_autovacuum
FROM pg_stat_user_tables
WHERE n_dead_tup >= :min_dead AND n_dead_tup > :ratio * greatest(n_live_tup, 1)
ORDER BY n_dead_tup DESC
LIMIT 50;

-- name: cache_hit :one
-- Shared-buffer hits and reads of this database since statistics were reset.
SELECT blks_hit::int8 AS hits, blks_read::int8 AS reads
FROM pg_stat_database
WHERE datname = current_database();

-- name: table_rows :many
-- Estimated rows of every table and partition (for "large" in plan checks).
SELECT c.relname AS name, format('%I.%I', n.nspname, c.relname) AS table_name,
       greatest(c.reltuples, 0)::int8 AS estimated_rows
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname !~ '^pg_toast';
