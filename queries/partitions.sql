-- Monthly partitions of the append-mostly tables (node_executions, execution_transitions):
-- maintenance only, from dl.system(). See app.ensure_partitions in schema/0008_executions.sql.

-- name: ensure :many
-- Create the default partition and the months from :months_back before the current month to
-- :months_ahead after it, RLS enabled, forced and the parent's policies copied; idempotent.
-- Returns the partitions created.
SELECT name FROM app.ensure_partitions(:months_ahead, :months_back) AS name;

-- name: drop_before :many
-- Retention: drop the monthly partitions that end on or before :before (not in the current
-- month) and delete older rows from the default partitions. Returns the partitions dropped.
SELECT name FROM app.drop_partitions_before(:before) AS name;
