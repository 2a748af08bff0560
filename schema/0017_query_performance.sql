-- depends: 0016_gdpr
-- Operator tables: slow-query samples and the last run of each maintenance job.
--
-- Both are maintenance-role only (datalayer_maint, through dl.system(); the default
-- privileges of 0001_roles grant it). datalayer_app holds no privilege on them, so they need
-- no RLS and carry no org_id:
-- * query_performance records how long the *shared code's* statements took (query name,
--   duration, rows, SQLSTATE; never parameter values). It is the operator's view of the
--   layer, not tenant data; letting tenants read it, even their own share, would turn it into
--   a timing side channel on other tenants' data volumes, and recording an org_id would put
--   a tenant key into a table no tenant may read. It is written in batches, off the request
--   path, by each process's QueryMetrics flush task (datalayer/query_performance.py).
-- * maintenance_runs holds one row per job (datalayer/maintenance.py): the last start and
--   end, ok or the error, the job's counts, and when it last succeeded.
--
-- pg_monitor (pg_read_all_stats, pg_read_all_settings) lets the maintenance role read
-- pg_stat_statements' text of the statements the app role ran, other sessions' transactions
-- and shared_preload_libraries (`datalayer stats`, `datalayer health`); granted when the
-- migrating role may grant it.

CREATE TABLE query_performance (
  id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  query_name   text NOT NULL CONSTRAINT query_performance_name_length
               CHECK (length(query_name) BETWEEN 1 AND 200),
  duration_ms  double precision NOT NULL CONSTRAINT query_performance_duration_positive
               CHECK (duration_ms >= 0),
  row_count    bigint NOT NULL DEFAULT 0,
  sqlstate     text CONSTRAINT query_performance_sqlstate_length
               CHECK (length(sqlstate) <= 100),
  instance     text NOT NULL DEFAULT '' CONSTRAINT query_performance_instance_length
               CHECK (length(instance) <= 200),
  executed_at  timestamptz NOT NULL,
  recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX query_performance_name_idx ON query_performance (query_name, executed_at);
CREATE INDEX query_performance_executed_idx ON query_performance (executed_at);

CREATE TABLE maintenance_runs (
  job          text PRIMARY KEY CONSTRAINT maintenance_runs_job_length
               CHECK (length(job) BETWEEN 1 AND 100),
  started_at   timestamptz NOT NULL,
  finished_at  timestamptz,          -- NULL while running (or when the run died)
  ok           boolean,              -- NULL while running
  error        text CONSTRAINT maintenance_runs_error_length CHECK (length(error) <= 2000),
  counts       jsonb NOT NULL DEFAULT '{}',
  instance     text NOT NULL DEFAULT '',
  last_ok_at   timestamptz,
  runs         bigint NOT NULL DEFAULT 0,
  failures     bigint NOT NULL DEFAULT 0
);

REVOKE ALL ON query_performance, maintenance_runs FROM PUBLIC;

DO $$
BEGIN
  GRANT pg_monitor TO datalayer_maint;
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'pg_monitor not granted to datalayer_maint: datalayer stats and health will '
               'see only what the role may see';
END
$$;
