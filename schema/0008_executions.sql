-- depends: 0007_workflows
-- Executions: runs of a workflow, their node executions, transition history and state
-- snapshots, and the work queue workers claim from.
--
-- State machine (enforced here, for every caller; see app.execution_transition_allowed):
--
--   queued  -> running | cancelled
--   running -> succeeded | failed | cancelled | timed_out   (finished)
--           -> waiting                                      (paused for an external event)
--           -> queued                                       (lease expired or released: retry path)
--   waiting -> queued | cancelled | timed_out | failed
--
-- An illegal transition raises check_violation naming both states (ValidationError). Every
-- change of status is recorded in execution_transitions by a statement-level trigger (who:
-- the context user and/or the worker; what: the reason; when). A failed or timed-out
-- execution is retried as a *new* execution (attempt + 1, retry_of = the old one), by hand or
-- automatically when its workflow enables it; a crashed worker's execution goes back to the
-- queue in place (attempt + 1). Finished executions report to app.workflow_stats_record.
--
-- node_executions and execution_transitions are append-mostly and partitioned by month on
-- created_at. Their parents are owned by datalayer_maint, which creates the monthly
-- partitions (schema `partitions`) with app.ensure_partitions() from dl.system() and drops
-- old ones with app.drop_partitions_before(); both copy RLS (enabled, forced, the parent's
-- policies) onto every partition they create.

-- Partitions live apart from the tables the application names; only the maintenance role
-- may create there, and the run-time role does not even see the schema.
CREATE SCHEMA partitions;
REVOKE ALL ON SCHEMA partitions FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA partitions TO datalayer_maint;

-- The transition table of the state machine. Pure: usable in triggers, queries and CHECKs.
CREATE FUNCTION app.execution_transition_allowed(p_from text, p_to text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT CASE p_from
    WHEN 'queued' THEN p_to IN ('running', 'cancelled')
    WHEN 'running' THEN p_to IN ('succeeded', 'failed', 'cancelled', 'timed_out', 'waiting',
                                 'queued')
    WHEN 'waiting' THEN p_to IN ('queued', 'cancelled', 'timed_out', 'failed')
    ELSE false
  END
$$;

-- Backoff before automatic retry number p_attempt + 1: p_base_ms * 2^(p_attempt - 1), capped
-- at one hour, with equal jitter (a uniformly random point in its upper half), so that
-- executions failing together do not all come back at the same instant.
CREATE FUNCTION app.execution_retry_delay(p_base_ms integer, p_attempt integer) RETURNS interval
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$
  SELECT make_interval(secs =>
    least(3600.0, greatest(p_base_ms, 0) / 1000.0 * power(2, least(greatest(p_attempt, 1) - 1, 24)))
    * (0.5 + random() / 2))
$$;

CREATE TABLE executions (
  org_id               uuid NOT NULL,
  id                   uuid NOT NULL DEFAULT gen_random_uuid(),
  workflow_id          uuid NOT NULL,
  workflow_version     integer NOT NULL,
  trigger              text NOT NULL DEFAULT 'manual'
                       CONSTRAINT executions_trigger_known
                       CHECK (trigger IN ('manual', 'webhook', 'schedule', 'sub_workflow')),
  trigger_payload      jsonb NOT NULL DEFAULT '{}',
  input                jsonb NOT NULL DEFAULT '{}',
  output               jsonb,
  error                jsonb,
  status               text NOT NULL DEFAULT 'queued'
                       CONSTRAINT executions_status_known
                       CHECK (status IN ('queued', 'running', 'waiting', 'succeeded', 'failed',
                                         'cancelled', 'timed_out')),
  status_reason        text CONSTRAINT executions_status_reason_length
                       CHECK (length(status_reason) <= 500),
  priority             integer NOT NULL DEFAULT 0
                       CONSTRAINT executions_priority_range CHECK (priority BETWEEN -1000 AND 1000),
  attempt              integer NOT NULL DEFAULT 1,
  max_attempts         integer NOT NULL DEFAULT 3,
  auto_retry           boolean NOT NULL DEFAULT false,
  retry_delay_ms       integer NOT NULL DEFAULT 1000
                       CONSTRAINT executions_retry_delay_range
                       CHECK (retry_delay_ms BETWEEN 0 AND 86400000),
  retry_of             uuid,
  parent_execution_id  uuid,
  root_execution_id    uuid NOT NULL,   -- set on insert: the id itself, or the parent's root
  scheduled_at         timestamptz NOT NULL DEFAULT now(),
  timeout_ms           integer CONSTRAINT executions_timeout_positive CHECK (timeout_ms > 0),
  deadline_at          timestamptz,     -- first start + timeout_ms
  worker_id            text CONSTRAINT executions_worker_id_length
                       CHECK (length(worker_id) BETWEEN 1 AND 200),
  lease_expires_at     timestamptz,
  started_at           timestamptz,
  finished_at          timestamptz,
  duration_ms          bigint GENERATED ALWAYS AS
                       ((extract(epoch FROM finished_at - started_at) * 1000)::bigint) STORED,
  created_by           uuid DEFAULT app.user_id(),
  created_at           timestamptz NOT NULL DEFAULT now(),
  updated_at           timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT executions_attempts CHECK (max_attempts BETWEEN 1 AND 100
                                        AND attempt BETWEEN 1 AND max_attempts),
  CONSTRAINT executions_running_has_lease
    CHECK ((status = 'running') = (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL)),
  CONSTRAINT executions_finished
    CHECK ((finished_at IS NOT NULL)
           = (status IN ('succeeded', 'failed', 'cancelled', 'timed_out'))),
  CONSTRAINT executions_sub_workflow_has_parent
    CHECK ((trigger = 'sub_workflow') = (parent_execution_id IS NOT NULL)),
  CONSTRAINT executions_parent_not_self CHECK (parent_execution_id <> id),
  FOREIGN KEY (org_id, workflow_id) REFERENCES workflows (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, workflow_id, workflow_version)
    REFERENCES workflow_versions (org_id, workflow_id, version),
  FOREIGN KEY (org_id, parent_execution_id) REFERENCES executions (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, retry_of) REFERENCES executions (org_id, id) ON DELETE SET NULL (retry_of)
);
-- A queue table: rows change status (and leave the queue index) at a high rate. Free space
-- in each page lets lease renewals be HOT updates (no index touches lease_expires_at).
ALTER TABLE executions SET (fillfactor = 85, autovacuum_vacuum_scale_factor = 0.02,
                            autovacuum_analyze_scale_factor = 0.02);

-- The work queue: due queued executions by priority, then scheduled time. Only queued rows
-- are in it, so it stays as small as the backlog.
CREATE INDEX executions_queue_idx ON executions (priority DESC, scheduled_at)
  WHERE status = 'queued';
-- Running executions by worker: heartbeats (one statement per worker) and the reaper (which
-- reads the few running rows' leases). Deliberately not on lease_expires_at, which every
-- heartbeat changes: an index on it would make each renewal a non-HOT update.
CREATE INDEX executions_running_idx ON executions (worker_id) WHERE status = 'running';
-- Deadlines of running and waiting executions (set once, at the first start).
CREATE INDEX executions_deadline_idx ON executions (deadline_at)
  WHERE deadline_at IS NOT NULL AND status IN ('running', 'waiting');
-- Lists: newest first, for the organization and per workflow.
CREATE INDEX executions_recent_idx ON executions (org_id, created_at DESC, id DESC);
CREATE INDEX executions_workflow_idx ON executions (org_id, workflow_id, created_at DESC, id DESC);
-- Sub-workflow trees (and the parent foreign key).
CREATE INDEX executions_parent_idx ON executions (org_id, parent_execution_id)
  WHERE parent_execution_id IS NOT NULL;
-- An attempt is retried at most once (by hand or automatically), whichever comes first.
CREATE UNIQUE INDEX executions_retry_of_key ON executions (org_id, retry_of)
  WHERE retry_of IS NOT NULL;

-- Transition history: append-only, written only by the triggers below (which also delete
-- it with its execution).
CREATE TABLE execution_transitions (
  org_id        uuid NOT NULL,
  execution_id  uuid NOT NULL,
  id            bigserial NOT NULL,
  from_status   text,                 -- NULL: the execution was created
  to_status     text NOT NULL,
  attempt       integer NOT NULL,
  worker_id     text,
  actor_id      uuid,                 -- the context user who caused it, if any
  reason        text,
  created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (org_id, execution_id, created_at, id)
) PARTITION BY RANGE (created_at);

CREATE TABLE node_executions (
  org_id        uuid NOT NULL,
  id            uuid NOT NULL DEFAULT gen_random_uuid(),
  execution_id  uuid NOT NULL,
  node_id       text NOT NULL CONSTRAINT node_executions_node_id_length
                CHECK (length(node_id) BETWEEN 1 AND 200),
  node_name     text NOT NULL DEFAULT '' CONSTRAINT node_executions_node_name_length
                CHECK (length(node_name) <= 200),
  node_type     text NOT NULL DEFAULT '' CONSTRAINT node_executions_node_type_length
                CHECK (length(node_type) <= 200),
  status        text NOT NULL DEFAULT 'running'
                CONSTRAINT node_executions_status_known
                CHECK (status IN ('running', 'succeeded', 'failed', 'skipped', 'cancelled')),
  input         jsonb,
  output        jsonb,
  error         jsonb,
  attempt       integer NOT NULL DEFAULT 1 CONSTRAINT node_executions_attempt_positive
                CHECK (attempt >= 1),
  started_at    timestamptz NOT NULL DEFAULT now(),
  finished_at   timestamptz,
  duration_ms   bigint GENERATED ALWAYS AS
                ((extract(epoch FROM finished_at - started_at) * 1000)::bigint) STORED,
  created_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id, created_at),
  CONSTRAINT node_executions_finished CHECK ((finished_at IS NULL) = (status = 'running')),
  FOREIGN KEY (org_id, execution_id) REFERENCES executions (org_id, id) ON DELETE CASCADE
) PARTITION BY RANGE (created_at);
-- The timeline of one execution (and the foreign key's cascade).
CREATE INDEX node_executions_execution_idx ON node_executions (org_id, execution_id, created_at);

-- State snapshots: checkpoints a worker writes so that a later attempt can resume.
CREATE TABLE execution_snapshots (
  org_id        uuid NOT NULL,
  execution_id  uuid NOT NULL,
  seq           integer NOT NULL CONSTRAINT execution_snapshots_seq_positive CHECK (seq >= 1),
  attempt       integer NOT NULL,
  state         jsonb NOT NULL,
  reason        text NOT NULL DEFAULT '' CONSTRAINT execution_snapshots_reason_length
                CHECK (length(reason) <= 500),
  created_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, execution_id, seq),
  FOREIGN KEY (org_id, execution_id) REFERENCES executions (org_id, id) ON DELETE CASCADE
);

-- Triggers -----------------------------------------------------------------------------------

-- Row-level, before: the state machine and the columns it owns (timestamps, lease, root).
CREATE FUNCTION app.executions_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF TG_OP = 'INSERT' THEN
    -- Only the maintenance role (seeding, imports) may insert history in another state.
    IF NEW.status <> 'queued' AND NOT pg_has_role(current_user, 'datalayer_maint', 'MEMBER') THEN
      RAISE EXCEPTION 'a new execution starts queued, not %', NEW.status
        USING ERRCODE = 'check_violation', CONSTRAINT = 'executions_status_transition',
              TABLE = 'executions';
    END IF;
    IF NEW.parent_execution_id IS NULL THEN
      NEW.root_execution_id := NEW.id;
    ELSE
      SELECT p.root_execution_id INTO NEW.root_execution_id
      FROM executions p WHERE p.org_id = NEW.org_id AND p.id = NEW.parent_execution_id;
      NEW.root_execution_id := coalesce(NEW.root_execution_id, NEW.parent_execution_id);
    END IF;
    IF NEW.status = 'running' AND NEW.started_at IS NULL THEN
      NEW.started_at := now();
    END IF;
    RETURN NEW;
  END IF;
  IF OLD.status IN ('succeeded', 'failed', 'cancelled', 'timed_out')
     AND NEW.status = OLD.status AND NEW.retry_of IS NOT DISTINCT FROM OLD.retry_of THEN
    -- Finished is final (only the retry_of foreign key's ON DELETE SET NULL may touch it).
    RAISE EXCEPTION 'a finished execution cannot change (it is %)', OLD.status
      USING ERRCODE = 'check_violation', CONSTRAINT = 'executions_status_transition',
            TABLE = 'executions';
  END IF;
  IF NEW.status IS DISTINCT FROM OLD.status THEN
    IF NOT app.execution_transition_allowed(OLD.status, NEW.status) THEN
      RAISE EXCEPTION 'illegal execution status transition from % to %', OLD.status, NEW.status
        USING ERRCODE = 'check_violation', CONSTRAINT = 'executions_status_transition',
              TABLE = 'executions';
    END IF;
    IF NEW.status_reason IS NOT DISTINCT FROM OLD.status_reason THEN
      NEW.status_reason := NULL;  -- a reason belongs to the transition that set it
    END IF;
    IF NEW.status = 'running' THEN
      IF OLD.started_at IS NULL THEN
        NEW.started_at := now();
        NEW.deadline_at := now() + make_interval(secs => NEW.timeout_ms / 1000.0);
      END IF;
    ELSE
      NEW.worker_id := NULL;
      NEW.lease_expires_at := NULL;
    END IF;
    IF NEW.status IN ('succeeded', 'failed', 'cancelled', 'timed_out') THEN
      NEW.finished_at := now();
      NEW.deadline_at := NULL;
    END IF;
  END IF;
  NEW.updated_at := now();
  RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION app.executions_guard() FROM PUBLIC;

CREATE TRIGGER executions_guard_insert BEFORE INSERT ON executions
  FOR EACH ROW EXECUTE FUNCTION app.executions_guard();
-- Not for a pure lease renewal (the heartbeat), which changes nothing the guard owns.
CREATE TRIGGER executions_guard_update BEFORE UPDATE ON executions
  FOR EACH ROW WHEN (NEW.status IS DISTINCT FROM OLD.status
                     OR NEW.lease_expires_at IS NOT DISTINCT FROM OLD.lease_expires_at)
  EXECUTE FUNCTION app.executions_guard();

-- Statement-level, after: history, statistics, automatic retries and the new-work signal,
-- once per statement (a batch claim records its transitions in one INSERT). SECURITY DEFINER
-- (owned by datalayer_maint) because the history is not writable by datalayer_app at all.
-- Statistics are recorded in (org, workflow) order so that concurrent batches take the
-- statistics rows' locks in the same order and cannot deadlock.
CREATE FUNCTION app.executions_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  r record;
BEGIN
  INSERT INTO execution_transitions (org_id, execution_id, from_status, to_status, attempt,
                                     worker_id, actor_id, reason)
  SELECT n.org_id, n.id, NULL, n.status, n.attempt, n.worker_id, app.user_id(), n.status_reason
  FROM new_rows n;
  FOR r IN SELECT n.org_id, n.workflow_id, n.status, n.duration_ms FROM new_rows n
           WHERE n.status IN ('succeeded', 'failed', 'cancelled', 'timed_out')
           ORDER BY n.org_id, n.workflow_id LOOP
    PERFORM app.workflow_stats_record(r.org_id, r.workflow_id, r.status, r.duration_ms);
  END LOOP;
  IF EXISTS (SELECT 1 FROM new_rows n WHERE n.status = 'queued' AND n.scheduled_at <= now()) THEN
    PERFORM pg_notify('datalayer_executions', '');
  END IF;
  RETURN NULL;
END $$;

CREATE FUNCTION app.executions_after_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  r record;
  v_finished integer;
  v_retries integer;
  v_abandoned integer;
  v_wake boolean;
BEGIN
  -- One pass over the statement's rows: record the changes of status, and count what else
  -- there is to do (a heartbeat changes no status and stops here).
  WITH changed AS (
    SELECT n.org_id, n.id, n.status, n.attempt, n.max_attempts, n.auto_retry, n.scheduled_at,
           n.status_reason, o.status AS old_status, coalesce(n.worker_id, o.worker_id) AS worker_id
    FROM new_rows n JOIN old_rows o ON o.org_id = n.org_id AND o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status
  ), recorded AS (
    INSERT INTO execution_transitions (org_id, execution_id, from_status, to_status, attempt,
                                       worker_id, actor_id, reason)
    SELECT c.org_id, c.id, c.old_status, c.status, c.attempt, c.worker_id, app.user_id(),
           c.status_reason
    FROM changed c
  )
  SELECT count(*) FILTER (WHERE c.status IN ('succeeded', 'failed', 'cancelled', 'timed_out')),
         count(*) FILTER (WHERE c.status IN ('failed', 'timed_out') AND c.auto_retry
                                AND c.attempt < c.max_attempts),
         count(*) FILTER (WHERE c.old_status = 'running'
                                AND c.status IN ('queued', 'failed', 'cancelled', 'timed_out')),
         coalesce(bool_or(c.status = 'queued' AND c.scheduled_at <= now()), false)
  INTO v_finished, v_retries, v_abandoned, v_wake
  FROM changed c;
  IF v_abandoned > 0 THEN
    -- An attempt that ended without finishing (worker lost, failed, cancelled, timed out)
    -- leaves no node running: its running nodes are closed as cancelled.
    UPDATE node_executions ne
    SET status = 'cancelled', finished_at = clock_timestamp(),
        error = jsonb_build_object('message', 'the execution stopped running (' || n.status || ')')
    FROM new_rows n JOIN old_rows o ON o.org_id = n.org_id AND o.id = n.id
    WHERE o.status = 'running' AND n.status IN ('queued', 'failed', 'cancelled', 'timed_out')
      AND ne.org_id = n.org_id AND ne.execution_id = n.id AND ne.created_at >= n.created_at
      AND ne.status = 'running';
  END IF;
  IF v_finished > 0 THEN
    FOR r IN SELECT n.org_id, n.workflow_id, n.status, n.duration_ms
             FROM new_rows n JOIN old_rows o ON o.org_id = n.org_id AND o.id = n.id
             WHERE n.status IS DISTINCT FROM o.status
               AND n.status IN ('succeeded', 'failed', 'cancelled', 'timed_out')
             ORDER BY n.org_id, n.workflow_id LOOP
      PERFORM app.workflow_stats_record(r.org_id, r.workflow_id, r.status, r.duration_ms);
    END LOOP;
  END IF;
  IF v_retries > 0 THEN
    -- Automatic retries: a new attempt after a jittered exponential backoff.
    INSERT INTO executions (org_id, workflow_id, workflow_version, trigger, trigger_payload,
                            input, priority, timeout_ms, attempt, max_attempts, auto_retry,
                            retry_delay_ms, retry_of, parent_execution_id, scheduled_at,
                            status_reason)
    SELECT n.org_id, n.workflow_id, n.workflow_version, n.trigger, n.trigger_payload, n.input,
           n.priority, n.timeout_ms, n.attempt + 1, n.max_attempts, true, n.retry_delay_ms,
           n.id, n.parent_execution_id,
           now() + app.execution_retry_delay(n.retry_delay_ms, n.attempt),
           format('automatic retry %s of %s', n.attempt + 1, n.max_attempts)
    FROM new_rows n JOIN old_rows o ON o.org_id = n.org_id AND o.id = n.id
    WHERE n.status IS DISTINCT FROM o.status AND n.status IN ('failed', 'timed_out')
      AND n.auto_retry AND n.attempt < n.max_attempts
    ORDER BY n.org_id, n.id
    ON CONFLICT DO NOTHING;
  END IF;
  IF v_wake THEN
    PERFORM pg_notify('datalayer_executions', '');
  END IF;
  RETURN NULL;
END $$;

-- The history goes with its execution. (A trigger rather than a foreign key: the history is
-- written only here, from the execution row itself, so a per-row foreign-key check on every
-- transition would verify what cannot be otherwise.)
CREATE FUNCTION app.executions_after_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  DELETE FROM execution_transitions t
  USING old_rows o WHERE t.org_id = o.org_id AND t.execution_id = o.id;
  RETURN NULL;
END $$;

CREATE TRIGGER executions_after_insert AFTER INSERT ON executions
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION app.executions_after_insert();
CREATE TRIGGER executions_after_update AFTER UPDATE ON executions
  REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION app.executions_after_update();
CREATE TRIGGER executions_after_delete AFTER DELETE ON executions
  REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION app.executions_after_delete();

-- Row-level security ------------------------------------------------------------------------
-- Every member reads; writers (app.can_write()) enqueue, cancel, retry and may run a
-- tenant-scoped worker. Cross-tenant workers run from dl.system() (BYPASSRLS).
ALTER TABLE executions ENABLE ROW LEVEL SECURITY;
ALTER TABLE executions FORCE ROW LEVEL SECURITY;
CREATE POLICY executions_select ON executions FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY executions_insert ON executions FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));
CREATE POLICY executions_update ON executions FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()))
  WITH CHECK (org_id = (SELECT app.org_id()));

ALTER TABLE execution_transitions ENABLE ROW LEVEL SECURITY;
ALTER TABLE execution_transitions FORCE ROW LEVEL SECURITY;
CREATE POLICY execution_transitions_select ON execution_transitions FOR SELECT
  USING (org_id = (SELECT app.org_id()));

ALTER TABLE node_executions ENABLE ROW LEVEL SECURITY;
ALTER TABLE node_executions FORCE ROW LEVEL SECURITY;
CREATE POLICY node_executions_select ON node_executions FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY node_executions_insert ON node_executions FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));
CREATE POLICY node_executions_update ON node_executions FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()))
  WITH CHECK (org_id = (SELECT app.org_id()));

ALTER TABLE execution_snapshots ENABLE ROW LEVEL SECURITY;
ALTER TABLE execution_snapshots FORCE ROW LEVEL SECURITY;
CREATE POLICY execution_snapshots_select ON execution_snapshots FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY execution_snapshots_insert ON execution_snapshots FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));

-- Privileges: identity, history and the columns triggers own are not writable ---------------
GRANT SELECT,
      INSERT (org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input,
              priority, attempt, max_attempts, auto_retry, retry_delay_ms, retry_of,
              parent_execution_id, scheduled_at, timeout_ms, status_reason),
      UPDATE (status, status_reason, output, error, priority, attempt, scheduled_at,
              worker_id, lease_expires_at)
  ON executions TO datalayer_app;
GRANT SELECT ON execution_transitions TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, id, execution_id, node_id, node_name, node_type, status, input, attempt,
              started_at),
      UPDATE (status, output, error, finished_at)
  ON node_executions TO datalayer_app;
GRANT SELECT, INSERT (org_id, execution_id, seq, attempt, state, reason)
  ON execution_snapshots TO datalayer_app;

-- Monthly partitions ------------------------------------------------------------------------
-- Managed tables: range-partitioned on one timestamptz column, in schema public, owned by
-- datalayer_maint (which must own a parent to add partitions to it). Partitions are named
-- partitions.<table>_pYYYYMM (UTC months) plus partitions.<table>_default, which catches rows
-- outside the created months; creating a month moves its rows out of the default partition.

-- RLS on a partition: enabled, forced, and the parent's policies copied. (Reading through the
-- parent applies the parent's policies; these guard the partition when it is named directly.)
CREATE FUNCTION app.secure_partition(p_parent regclass, p_partition regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  p record;
BEGIN
  EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY',
                 p_partition);
  FOR p IN SELECT pol.polname,
                  CASE WHEN pol.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END AS kind,
                  CASE pol.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT'
                                  WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' ELSE 'ALL' END AS cmd,
                  CASE WHEN pol.polroles = '{0}' THEN 'PUBLIC'
                       ELSE (SELECT string_agg(quote_ident(rolname), ', ')
                             FROM pg_roles WHERE oid = ANY (pol.polroles)) END AS roles,
                  pg_get_expr(pol.polqual, pol.polrelid) AS qual,
                  pg_get_expr(pol.polwithcheck, pol.polrelid) AS with_check
           FROM pg_policy pol
           WHERE pol.polrelid = p_parent
             AND NOT EXISTS (SELECT 1 FROM pg_policy x
                             WHERE x.polrelid = p_partition AND x.polname = pol.polname) LOOP
    EXECUTE format('CREATE POLICY %I ON %s AS %s FOR %s TO %s%s%s', p.polname, p_partition,
                   p.kind, p.cmd, p.roles,
                   CASE WHEN p.qual IS NULL THEN '' ELSE ' USING (' || p.qual || ')' END,
                   CASE WHEN p.with_check IS NULL THEN ''
                        ELSE ' WITH CHECK (' || p.with_check || ')' END);
  END LOOP;
END $$;

-- Create the default partition and the monthly partitions from p_months_back months before the
-- current month to p_months_ahead months after it, for every managed table. Idempotent;
-- returns the names created. Run from dl.system() ahead of time (a cron job, the worker's
-- reaper loop); the migration runs it for the current and next month.
CREATE FUNCTION app.ensure_partitions(p_months_ahead integer DEFAULT 2,
                                      p_months_back integer DEFAULT 0)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  t record;
  v_default text;
  v_name text;
  v_from timestamptz;
  v_to timestamptz;
  v_cols text;
  v_moved jsonb;
BEGIN
  IF p_months_ahead NOT BETWEEN 0 AND 120 OR p_months_back NOT BETWEEN 0 AND 120 THEN
    RAISE EXCEPTION 'months ahead and back must each be between 0 and 120'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- One maintainer at a time (workers call this on start): the others then find it done.
  PERFORM pg_advisory_xact_lock(hashtext('datalayer.partitions'));
  FOR t IN SELECT c.oid::regclass AS parent, c.relname::text AS name, a.attname::text AS key
           FROM pg_partitioned_table pt
           JOIN pg_class c ON c.oid = pt.partrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = pt.partattrs[0]
           WHERE pt.partstrat = 'r' AND pt.partnatts = 1
             AND a.atttypid = 'timestamptz'::regtype
             AND c.relowner = 'datalayer_maint'::regrole
           ORDER BY c.relname LOOP
    v_default := t.name || '_default';
    IF to_regclass(format('partitions.%I', v_default)) IS NULL THEN
      EXECUTE format('CREATE TABLE partitions.%I PARTITION OF %s DEFAULT', v_default, t.parent);
      PERFORM app.secure_partition(t.parent, format('partitions.%I', v_default)::regclass);
      RETURN NEXT v_default;
    END IF;
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO v_cols
    FROM pg_attribute
    WHERE attrelid = t.parent AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
    FOR i IN -p_months_back .. p_months_ahead LOOP
      v_from := date_trunc('month', now()) + make_interval(months => i);
      v_to := v_from + interval '1 month';
      v_name := format('%s_p%s', t.name, to_char(v_from, 'YYYYMM'));
      CONTINUE WHEN to_regclass(format('partitions.%I', v_name)) IS NOT NULL;
      -- Rows of this month that went to the default partition move into the new one.
      EXECUTE format('WITH moved AS (DELETE FROM partitions.%I WHERE %I >= $1 AND %I < $2 '
                     'RETURNING *) SELECT jsonb_agg(to_jsonb(moved)) FROM moved',
                     v_default, t.key, t.key)
        INTO v_moved USING v_from, v_to;
      EXECUTE format('CREATE TABLE partitions.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                     v_name, t.parent, v_from, v_to);
      PERFORM app.secure_partition(t.parent, format('partitions.%I', v_name)::regclass);
      IF v_moved IS NOT NULL THEN
        EXECUTE format('INSERT INTO %s (%s) SELECT %s FROM jsonb_populate_recordset(NULL::%s, $1)',
                       t.parent, v_cols, v_cols, t.parent) USING v_moved;
      END IF;
      RETURN NEXT v_name;
    END LOOP;
  END LOOP;
END $$;

-- Retention: drop every monthly partition of the managed tables that ends on or before
-- p_before, and delete the default partitions' rows older than it. Refuses to reach into the
-- current month. Returns the partitions dropped.
CREATE FUNCTION app.drop_partitions_before(p_before date)
RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp SET timezone = 'UTC' AS $$
DECLARE
  t record;
  p record;
  v_to timestamptz;
BEGIN
  IF p_before IS NULL OR p_before > date_trunc('month', now()) THEN
    RAISE EXCEPTION 'retention may drop only months before the current one (before %)',
      to_char(date_trunc('month', now()), 'YYYY-MM-DD')
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  PERFORM pg_advisory_xact_lock(hashtext('datalayer.partitions'));
  FOR t IN SELECT c.oid::regclass AS parent, c.relname::text AS name, a.attname::text AS key
           FROM pg_partitioned_table pt
           JOIN pg_class c ON c.oid = pt.partrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = pt.partattrs[0]
           WHERE pt.partstrat = 'r' AND pt.partnatts = 1
             AND a.atttypid = 'timestamptz'::regtype
             AND c.relowner = 'datalayer_maint'::regrole
           ORDER BY c.relname LOOP
    FOR p IN SELECT i.inhrelid::regclass AS part, c.relname::text AS name,
                    pg_get_expr(c.relpartbound, c.oid) AS bound
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = t.parent ORDER BY c.relname LOOP
      IF p.bound = 'DEFAULT' THEN
        EXECUTE format('DELETE FROM %s WHERE %I < $1', p.part, t.key) USING p_before;
        CONTINUE;
      END IF;
      v_to := substring(p.bound FROM 'TO \(''([^'']+)''\)')::timestamptz;
      IF v_to <= p_before THEN
        EXECUTE format('DROP TABLE %s', p.part);
        RETURN NEXT p.name;
      END IF;
    END LOOP;
  END LOOP;
END $$;

ALTER TABLE execution_transitions OWNER TO datalayer_maint;
ALTER TABLE node_executions OWNER TO datalayer_maint;
DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY[
    'app.executions_after_insert()', 'app.executions_after_update()',
    'app.executions_after_delete()',
    'app.secure_partition(regclass, regclass)', 'app.ensure_partitions(integer, integer)',
    'app.drop_partitions_before(date)']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END $$;
-- Maintenance only: the run-time role neither creates nor drops partitions.
GRANT EXECUTE ON FUNCTION app.ensure_partitions(integer, integer),
                          app.drop_partitions_before(date),
                          app.secure_partition(regclass, regclass) TO datalayer_maint;
REVOKE ALL ON FUNCTION app.execution_transition_allowed(text, text),
                       app.execution_retry_delay(integer, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.execution_transition_allowed(text, text),
                          app.execution_retry_delay(integer, integer)
  TO datalayer_app, datalayer_maint;

-- PERFORM, not SELECT: yoyo prints the rows of a SELECT in a migration to stdout.
DO $$ BEGIN PERFORM app.ensure_partitions(1); END $$;
