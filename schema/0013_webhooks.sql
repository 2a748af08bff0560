-- depends: 0008_executions 0012_credentials
-- Webhooks: endpoints that start a workflow, and the events they receive.
--
-- A webhook belongs to a workflow. Requests are routed by an unguessable path token (256
-- random bits, shown once at creation); only its sha256 is stored. The token is globally
-- unique by construction (a collision of 256-bit random values does not happen), so the hash
-- has a plain (non-unique) index: a unique index on it would not be led by org_id, and a
-- unique violation would be an existence oracle across tenants. Routing happens before any
-- tenant context, through the SECURITY DEFINER function app.webhook_route(hash), like
-- app.verify_api_key.
--
-- The signing secret is a Keyring blob (AES-256-GCM, bound to (org, 'webhooks', id,
-- 'secret')), registered for key rotation in app.encrypted_columns.
--
-- webhook_events is a queue table. Idempotency: UNIQUE (org_id, webhook_id, idempotency_key),
-- written with INSERT ... ON CONFLICT DO NOTHING, so concurrent deliveries of one key store
-- one row. Status:
--   pending    -> processing (claimed with a lease, attempts + 1)
--   processing -> processed (execution_id linked) | failed (retry at next_attempt_at,
--                 exponential backoff with jitter) | dead (after max_attempts)
--              -> pending | dead when its lease expired (reaper)
--   failed     -> processing (claimed again when due)
--   dead       -> pending (replay, attempts reset)

CREATE TABLE webhooks (
  org_id             uuid NOT NULL,
  id                 uuid NOT NULL,
  workflow_id        uuid NOT NULL,
  name               text NOT NULL DEFAULT '' CONSTRAINT webhooks_name_length
                     CHECK (length(name) <= 200),
  path_token_hash    bytea NOT NULL CONSTRAINT webhooks_token_hash_length
                     CHECK (length(path_token_hash) = 32),
  method             text NOT NULL DEFAULT 'POST' CONSTRAINT webhooks_method_known
                     CHECK (method IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE')),
  active             boolean NOT NULL DEFAULT true,
  secret             bytea NOT NULL,
  max_attempts       integer NOT NULL DEFAULT 5 CONSTRAINT webhooks_max_attempts_range
                     CHECK (max_attempts BETWEEN 1 AND 100),
  created_by         uuid DEFAULT app.user_id(),
  created_at         timestamptz NOT NULL DEFAULT now(),
  updated_at         timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, workflow_id) REFERENCES workflows (org_id, id) ON DELETE CASCADE
);
-- Routing (see above: deliberately not unique).
CREATE INDEX webhooks_token_idx ON webhooks (path_token_hash);
CREATE INDEX webhooks_workflow_idx ON webhooks (org_id, workflow_id);

-- Trigger counts, sharded: every ingest adds to the shard of its connection (backend pid mod
-- 16), so concurrent ingests of one webhook do not queue on one row lock until they commit.
-- A webhook's trigger count is the sum of its shards, its last trigger time their maximum.
CREATE TABLE webhook_counters (
  org_id             uuid NOT NULL,
  webhook_id         uuid NOT NULL,
  shard              smallint NOT NULL CONSTRAINT webhook_counters_shard_range
                     CHECK (shard BETWEEN 0 AND 15),
  trigger_count      bigint NOT NULL DEFAULT 0,
  last_triggered_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, webhook_id, shard),
  FOREIGN KEY (org_id, webhook_id) REFERENCES webhooks (org_id, id) ON DELETE CASCADE
);
ALTER TABLE webhook_counters SET (fillfactor = 50);

CREATE TABLE webhook_events (
  org_id            uuid NOT NULL,
  id                uuid NOT NULL DEFAULT gen_random_uuid(),
  webhook_id        uuid NOT NULL,
  idempotency_key   text NOT NULL CONSTRAINT webhook_events_key_length
                    CHECK (length(idempotency_key) BETWEEN 1 AND 200),
  event_type        text NOT NULL DEFAULT '' CONSTRAINT webhook_events_type_length
                    CHECK (length(event_type) <= 200),
  payload           jsonb NOT NULL DEFAULT '{}',
  headers           jsonb NOT NULL DEFAULT '{}',   -- secrets redacted before storage
  source_ip         inet,
  status            text NOT NULL DEFAULT 'pending'
                    CONSTRAINT webhook_events_status_known
                    CHECK (status IN ('pending', 'processing', 'processed', 'failed', 'dead')),
  attempts          integer NOT NULL DEFAULT 0,
  max_attempts      integer NOT NULL DEFAULT 5,
  worker_id         text CONSTRAINT webhook_events_worker_id_length
                    CHECK (length(worker_id) BETWEEN 1 AND 200),
  lease_expires_at  timestamptz,
  next_attempt_at   timestamptz NOT NULL DEFAULT now(),
  execution_id      uuid,
  error             text CONSTRAINT webhook_events_error_length CHECK (length(error) <= 2000),
  received_at       timestamptz NOT NULL DEFAULT now(),
  processed_at      timestamptz,
  updated_at        timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT webhook_events_idempotency_key UNIQUE (org_id, webhook_id, idempotency_key),
  CONSTRAINT webhook_events_attempts CHECK (max_attempts BETWEEN 1 AND 100
                                            AND attempts BETWEEN 0 AND max_attempts),
  CONSTRAINT webhook_events_processing_has_lease
    CHECK ((status = 'processing') = (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL)),
  CONSTRAINT webhook_events_processed
    CHECK ((status = 'processed') = (processed_at IS NOT NULL)),
  FOREIGN KEY (org_id, webhook_id) REFERENCES webhooks (org_id, id) ON DELETE CASCADE,
  FOREIGN KEY (org_id, execution_id) REFERENCES executions (org_id, id)
    ON DELETE SET NULL (execution_id)
);
ALTER TABLE webhook_events SET (fillfactor = 85, autovacuum_vacuum_scale_factor = 0.02,
                                autovacuum_analyze_scale_factor = 0.02);
-- The queue: due pending and failed (awaiting retry) events only, so it stays as small as
-- the backlog.
CREATE INDEX webhook_events_queue_idx ON webhook_events (next_attempt_at)
  WHERE status IN ('pending', 'failed');
-- Leases of events being processed (the reaper).
CREATE INDEX webhook_events_processing_idx ON webhook_events (lease_expires_at)
  WHERE status = 'processing';
-- Per-webhook lists and statistics over a time window.
CREATE INDEX webhook_events_webhook_idx ON webhook_events (org_id, webhook_id, received_at);
-- Retention (cross-tenant, oldest first).
CREATE INDEX webhook_events_received_idx ON webhook_events (received_at);
CREATE INDEX webhook_events_execution_idx ON webhook_events (org_id, execution_id)
  WHERE execution_id IS NOT NULL;

-- Routing: the webhook of a path-token hash, in any organization, before a tenant context
-- exists (a tenant-scoped session is refused). Returns the encrypted secret for signature
-- verification; no row when the token is unknown or its organization is deleted.
CREATE FUNCTION app.webhook_route(p_hash bytea)
RETURNS TABLE (org_id uuid, webhook_id uuid, workflow_id uuid, method text, active boolean,
               secret bytea, max_attempts integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
  PERFORM app.require_no_tenant();
  RETURN QUERY
  SELECT w.org_id, w.id, w.workflow_id, w.method, w.active, w.secret, w.max_attempts
  FROM webhooks w
  JOIN organizations o ON o.id = w.org_id AND o.deleted_at IS NULL
  WHERE w.path_token_hash = p_hash
  LIMIT 1;
END $$;
ALTER FUNCTION app.webhook_route(bytea) OWNER TO datalayer_maint;
REVOKE ALL ON FUNCTION app.webhook_route(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.webhook_route(bytea) TO datalayer_app, datalayer_maint;

-- Row-level security: members read; writers manage webhooks and their events. Workers and
-- the HTTP ingest path run from dl.system() (BYPASSRLS) or a writer's tenant session.
ALTER TABLE webhooks ENABLE ROW LEVEL SECURITY;
ALTER TABLE webhooks FORCE ROW LEVEL SECURITY;
CREATE POLICY webhooks_select ON webhooks FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY webhooks_insert ON webhooks FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));
CREATE POLICY webhooks_update ON webhooks FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()))
  WITH CHECK (org_id = (SELECT app.org_id()));
CREATE POLICY webhooks_delete ON webhooks FOR DELETE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));

ALTER TABLE webhook_counters ENABLE ROW LEVEL SECURITY;
ALTER TABLE webhook_counters FORCE ROW LEVEL SECURITY;
CREATE POLICY webhook_counters_select ON webhook_counters FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY webhook_counters_insert ON webhook_counters FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));
CREATE POLICY webhook_counters_update ON webhook_counters FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()))
  WITH CHECK (org_id = (SELECT app.org_id()));

ALTER TABLE webhook_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE webhook_events FORCE ROW LEVEL SECURITY;
CREATE POLICY webhook_events_select ON webhook_events FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY webhook_events_insert ON webhook_events FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));
CREATE POLICY webhook_events_update ON webhook_events FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()))
  WITH CHECK (org_id = (SELECT app.org_id()));

-- Privileges: identity and the token hash are set once; events are never deleted by the
-- run-time role (retention runs from dl.system()).
GRANT SELECT,
      INSERT (org_id, id, workflow_id, name, path_token_hash, method, active, secret,
              max_attempts),
      UPDATE (name, method, active, secret, max_attempts, updated_at),
      DELETE
  ON webhooks TO datalayer_app;
GRANT SELECT, INSERT (org_id, webhook_id, shard, trigger_count, last_triggered_at),
      UPDATE (trigger_count, last_triggered_at)
  ON webhook_counters TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, id, webhook_id, idempotency_key, event_type, payload, headers, source_ip,
              max_attempts),
      UPDATE (status, attempts, worker_id, lease_expires_at, next_attempt_at, execution_id,
              error, processed_at, updated_at)
  ON webhook_events TO datalayer_app;

-- Key rotation: the encrypted secret column (app.encrypted_columns: schema/0012_credentials).
INSERT INTO app.encrypted_columns (table_name, column_name, org_column, id_column)
VALUES ('webhooks', 'secret', 'org_id', 'id');
