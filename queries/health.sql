-- Health figures from the catalog (datalayer/health.py), run from dl.system(): the
-- maintenance role holds pg_read_all_stats (schema/0017) to see other sessions.

-- name: server :one
-- Server version, whether this server is a standby, and its replay delay when it is.
SELECT current_setting('server_version') AS server_version,
       pg_is_in_recovery() AS in_recovery,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_delay_s;

-- name: replicas :many
-- Standbys streaming from this server (none: an empty list) and how far behind they are.
SELECT application_name, host(client_addr) AS client_addr, state, sync_state,
       extract(epoch FROM replay_lag)::float8 AS replay_lag_s,
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::int8 AS lag_bytes
FROM pg_stat_replication
ORDER BY application_name;

-- name: oldest_transaction :one
-- The longest-running open transaction in this database, other than ours.
SELECT pid, state, extract(epoch FROM now() - xact_start)::float8 AS age_s,
       application_name
FROM pg_stat_activity
WHERE datname = current_database() AND xact_start IS NOT NULL AND pid <> pg_backend_pid()
  AND backend_type = 'client backend'
ORDER BY xact_start
LIMIT 1;
