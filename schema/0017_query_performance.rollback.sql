DROP TABLE maintenance_runs;
DROP TABLE query_performance;
-- pg_monitor stays granted: roles are cluster-wide, other databases may rely on it.
