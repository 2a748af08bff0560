-- Webhooks and their events (schema/0013_webhooks.sql). Methods that address an event or a
-- webhook take :org_id: NULL in a tenant session (the context's organization), the row's
-- organization from dl.system(). RLS bounds every statement in a tenant session.

-- name: create :one
-- A webhook of a live workflow of the context organization; no row when there is none.
INSERT INTO webhooks (org_id, id, workflow_id, name, path_token_hash, method, secret,
                      max_attempts)
SELECT w.org_id, :id, w.id, :name, :path_token_hash, :method, :secret, :max_attempts
FROM workflows w
WHERE w.org_id = app.org_id() AND w.id = :workflow_id AND w.deleted_at IS NULL
RETURNING org_id, id, workflow_id, name, method, active, secret, max_attempts,
          0::bigint AS trigger_count, NULL::timestamptz AS last_triggered_at, created_by,
          created_at, updated_at;

-- name: get :one
SELECT h.org_id, h.id, h.workflow_id, h.name, h.method, h.active, h.secret, h.max_attempts,
       (SELECT coalesce(sum(c.trigger_count), 0)::bigint FROM webhook_counters c
        WHERE c.org_id = h.org_id AND c.webhook_id = h.id) AS trigger_count,
       (SELECT max(c.last_triggered_at) FROM webhook_counters c
        WHERE c.org_id = h.org_id AND c.webhook_id = h.id) AS last_triggered_at,
       h.created_by, h.created_at, h.updated_at
FROM webhooks h
WHERE h.org_id = coalesce(:org_id::uuid, app.org_id()) AND h.id = :id;

-- name: list :many
-- The organization's webhooks (of one workflow, when :workflow_id is given), oldest first.
SELECT h.org_id, h.id, h.workflow_id, h.name, h.method, h.active, h.secret, h.max_attempts,
       (SELECT coalesce(sum(c.trigger_count), 0)::bigint FROM webhook_counters c
        WHERE c.org_id = h.org_id AND c.webhook_id = h.id) AS trigger_count,
       (SELECT max(c.last_triggered_at) FROM webhook_counters c
        WHERE c.org_id = h.org_id AND c.webhook_id = h.id) AS last_triggered_at,
       h.created_by, h.created_at, h.updated_at
FROM webhooks h
WHERE h.org_id = app.org_id()
  AND (:workflow_id::uuid IS NULL OR h.workflow_id = :workflow_id::uuid)
ORDER BY h.created_at, h.id
LIMIT :limit;

-- name: set_active :one
UPDATE webhooks SET active = :active, updated_at = now()
WHERE org_id = app.org_id() AND id = :id
RETURNING org_id, id, workflow_id, name, method, active, secret, max_attempts,
          (SELECT coalesce(sum(c.trigger_count), 0)::bigint FROM webhook_counters c
           WHERE c.org_id = webhooks.org_id AND c.webhook_id = webhooks.id) AS trigger_count,
          (SELECT max(c.last_triggered_at) FROM webhook_counters c
           WHERE c.org_id = webhooks.org_id AND c.webhook_id = webhooks.id) AS last_triggered_at,
          created_by, created_at, updated_at;

-- name: set_secret :one
-- A new signing secret (a Keyring blob for this row).
UPDATE webhooks SET secret = :secret, updated_at = now()
WHERE org_id = app.org_id() AND id = :id
RETURNING org_id, id, workflow_id, name, method, active, secret, max_attempts,
          (SELECT coalesce(sum(c.trigger_count), 0)::bigint FROM webhook_counters c
           WHERE c.org_id = webhooks.org_id AND c.webhook_id = webhooks.id) AS trigger_count,
          (SELECT max(c.last_triggered_at) FROM webhook_counters c
           WHERE c.org_id = webhooks.org_id AND c.webhook_id = webhooks.id) AS last_triggered_at,
          created_by, created_at, updated_at;

-- name: delete :execrows
DELETE FROM webhooks WHERE org_id = app.org_id() AND id = :id;

-- name: route :one
-- The webhook of a path-token hash, in any organization (before a tenant context exists).
SELECT org_id, webhook_id, workflow_id, method, active, secret, max_attempts
FROM app.webhook_route(:path_token_hash);

-- name: ingest :one
-- Store an incoming event once per (webhook, idempotency key). No row when the key was
-- stored already (then read it with get_by_key: under READ COMMITTED that next statement
-- sees the concurrent first delivery, which ON CONFLICT waited for) or when the webhook is
-- not there or inactive. A new event counts as a trigger of its webhook (webhook_counters,
-- the shard of this connection).
WITH ins AS (
  INSERT INTO webhook_events (org_id, webhook_id, idempotency_key, event_type, payload,
                              headers, source_ip, max_attempts)
  SELECT h.org_id, h.id, :idempotency_key, :event_type, coalesce(:payload::jsonb, '{}'),
         coalesce(:headers::jsonb, '{}'), :source_ip::inet, h.max_attempts
  FROM webhooks h
  WHERE h.org_id = coalesce(:org_id::uuid, app.org_id()) AND h.id = :webhook_id AND h.active
  ON CONFLICT (org_id, webhook_id, idempotency_key) DO NOTHING
  RETURNING org_id, id, webhook_id, idempotency_key, event_type, payload, headers, source_ip,
            status, attempts, max_attempts, worker_id, lease_expires_at, next_attempt_at,
            execution_id, error, received_at, processed_at, updated_at
), counted AS (
  INSERT INTO webhook_counters AS c (org_id, webhook_id, shard, trigger_count)
  SELECT ins.org_id, ins.webhook_id, pg_backend_pid() % 16, 1 FROM ins
  ON CONFLICT (org_id, webhook_id, shard) DO UPDATE
  SET trigger_count = c.trigger_count + 1, last_triggered_at = now()
)
SELECT org_id, id, webhook_id, idempotency_key, event_type, payload, headers, source_ip,
       status, attempts, max_attempts, worker_id, lease_expires_at, next_attempt_at,
       execution_id, error, received_at, processed_at, updated_at
FROM ins;

-- name: get_by_key :one
SELECT org_id, id, webhook_id, idempotency_key, event_type, payload, headers, source_ip,
       status, attempts, max_attempts, worker_id, lease_expires_at, next_attempt_at,
       execution_id, error, received_at, processed_at, updated_at
FROM webhook_events
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND webhook_id = :webhook_id
  AND idempotency_key = :idempotency_key;

-- name: ingest_many :scalar
-- Many events of one webhook in one statement (parallel arrays); keys already stored, and
-- repeats inside the batch, are skipped. Returns how many were new.
WITH batch AS (
  SELECT DISTINCT ON (b.k) b.k, b.t, b.p, b.hd, b.ip
  FROM unnest(:idempotency_keys::text[], :event_types::text[], :payloads::jsonb[],
              :headers::jsonb[], :source_ips::inet[]) AS b(k, t, p, hd, ip)
  ORDER BY b.k
), ins AS (
  INSERT INTO webhook_events (org_id, webhook_id, idempotency_key, event_type, payload,
                              headers, source_ip, max_attempts)
  SELECT h.org_id, h.id, b.k, coalesce(b.t, ''), coalesce(b.p, '{}'), coalesce(b.hd, '{}'),
         b.ip, h.max_attempts
  FROM webhooks h CROSS JOIN batch b
  WHERE h.org_id = coalesce(:org_id::uuid, app.org_id()) AND h.id = :webhook_id AND h.active
  ON CONFLICT (org_id, webhook_id, idempotency_key) DO NOTHING
  RETURNING 1
), n AS (
  SELECT count(*) AS n FROM ins
), counted AS (
  INSERT INTO webhook_counters AS c (org_id, webhook_id, shard, trigger_count)
  SELECT h.org_id, h.id, pg_backend_pid() % 16, n.n
  FROM n, webhooks h
  WHERE n.n > 0 AND h.org_id = coalesce(:org_id::uuid, app.org_id()) AND h.id = :webhook_id
  ON CONFLICT (org_id, webhook_id, shard) DO UPDATE
  SET trigger_count = c.trigger_count + EXCLUDED.trigger_count, last_triggered_at = now()
)
SELECT n FROM n;

-- name: get_event :one
SELECT org_id, id, webhook_id, idempotency_key, event_type, payload, headers, source_ip,
       status, attempts, max_attempts, worker_id, lease_expires_at, next_attempt_at,
       execution_id, error, received_at, processed_at, updated_at
FROM webhook_events
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND id = :id;

-- name: list_events :many
-- Events of one webhook in some statuses, newest first, keyset-paginated.
SELECT org_id, id, webhook_id, idempotency_key, event_type, payload, headers, source_ip,
       status, attempts, max_attempts, worker_id, lease_expires_at, next_attempt_at,
       execution_id, error, received_at, processed_at, updated_at
FROM webhook_events
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND webhook_id = :webhook_id
  AND status = ANY(:statuses::text[])
  AND (received_at, id) < (:before_received_at, :before_id)
ORDER BY received_at DESC, id DESC
LIMIT :limit;

-- name: claim :many
-- Up to :limit due pending or failed events, now processing on :worker_id for :lease_s
-- seconds (attempts + 1), oldest due first; rows another claimer locked are skipped. From
-- dl.system() every organization's (or only :org_id's), in a tenant session the context's.
UPDATE webhook_events e
SET status = 'processing', worker_id = :worker_id, attempts = e.attempts + 1,
    lease_expires_at = now() + make_interval(secs => :lease_s), updated_at = now()
FROM (SELECT q.org_id, q.id FROM webhook_events q
      WHERE q.status IN ('pending', 'failed') AND q.next_attempt_at <= now()
        AND (:org_id::uuid IS NULL OR q.org_id = :org_id::uuid)
      ORDER BY q.next_attempt_at
      LIMIT :limit
      FOR UPDATE SKIP LOCKED) picked, webhooks h
WHERE e.org_id = picked.org_id AND e.id = picked.id
  AND h.org_id = e.org_id AND h.id = e.webhook_id
RETURNING e.org_id, e.id, e.webhook_id, h.workflow_id, e.idempotency_key, e.event_type,
          e.payload, e.headers, e.source_ip, e.status, e.attempts, e.max_attempts,
          e.worker_id, e.lease_expires_at, e.received_at;

-- name: mark_processed :one
-- The event :worker_id holds (attempt :attempts) was processed into :execution_id. No row
-- when the worker no longer holds it (its lease expired and it went back to the queue).
UPDATE webhook_events
SET status = 'processed', execution_id = :execution_id, processed_at = now(), error = NULL,
    worker_id = NULL, lease_expires_at = NULL, updated_at = now()
WHERE org_id = :org_id AND id = :id AND status = 'processing' AND worker_id = :worker_id
  AND attempts = :attempts
RETURNING org_id, id, webhook_id, idempotency_key, event_type, payload, headers, source_ip,
          status, attempts, max_attempts, worker_id, lease_expires_at, next_attempt_at,
          execution_id, error, received_at, processed_at, updated_at;

-- name: mark_processed_many :many
-- mark_processed for a batch (parallel arrays) in one statement; returns those marked.
UPDATE webhook_events e
SET status = 'processed', execution_id = b.execution_id, processed_at = now(), error = NULL,
    worker_id = NULL, lease_expires_at = NULL, updated_at = now()
FROM unnest(:org_ids::uuid[], :ids::uuid[], :attempts::int[], :execution_ids::uuid[])
       AS b(org_id, id, attempts, execution_id)
WHERE e.org_id = b.org_id AND e.id = b.id AND e.status = 'processing'
  AND e.worker_id = :worker_id AND e.attempts = b.attempts
RETURNING e.org_id, e.id, e.attempts, e.processed_at;

-- name: mark_failed :one
-- Processing the event failed: retry after :base_delay_ms * 2^(attempts-1) with jitter
-- (app.execution_retry_delay), or dead after its last attempt. Fenced like mark_processed.
UPDATE webhook_events
SET status = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'failed' END,
    next_attempt_at = CASE WHEN attempts >= max_attempts THEN next_attempt_at
                           ELSE now() + app.execution_retry_delay(:base_delay_ms, attempts) END,
    error = left(:error, 2000), worker_id = NULL, lease_expires_at = NULL, updated_at = now()
WHERE org_id = :org_id AND id = :id AND status = 'processing' AND worker_id = :worker_id
  AND attempts = :attempts
RETURNING org_id, id, webhook_id, idempotency_key, event_type, payload, headers, source_ip,
          status, attempts, max_attempts, worker_id, lease_expires_at, next_attempt_at,
          execution_id, error, received_at, processed_at, updated_at;

-- name: reap :many
-- Events whose lease expired go back to the queue at once, or dead after their last attempt.
UPDATE webhook_events e
SET status = CASE WHEN e.attempts >= e.max_attempts THEN 'dead' ELSE 'pending' END,
    next_attempt_at = now(), worker_id = NULL, lease_expires_at = NULL,
    error = coalesce(e.error, 'lease expired'), updated_at = now()
FROM (SELECT q.org_id, q.id FROM webhook_events q
      WHERE q.status = 'processing' AND q.lease_expires_at < now()
      ORDER BY q.lease_expires_at
      LIMIT :limit
      FOR UPDATE SKIP LOCKED) picked
WHERE e.org_id = picked.org_id AND e.id = picked.id
RETURNING e.org_id, e.id, e.webhook_id, e.idempotency_key, e.event_type, e.payload,
          e.headers, e.source_ip, e.status, e.attempts, e.max_attempts, e.worker_id,
          e.lease_expires_at, e.next_attempt_at, e.execution_id, e.error, e.received_at,
          e.processed_at, e.updated_at;

-- name: replay :many
-- Dead events of one webhook (all, or just :ids) back to the queue with fresh attempts.
UPDATE webhook_events
SET status = 'pending', attempts = 0, next_attempt_at = now(), error = NULL, updated_at = now()
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND webhook_id = :webhook_id
  AND status = 'dead' AND (:ids::uuid[] IS NULL OR id = ANY(:ids::uuid[]))
RETURNING org_id, id, webhook_id, idempotency_key, event_type, payload, headers, source_ip,
          status, attempts, max_attempts, worker_id, lease_expires_at, next_attempt_at,
          execution_id, error, received_at, processed_at, updated_at;

-- name: stats :one
-- Per webhook over events received since :since: counts by status and the p95 time from
-- receipt to processing (webhook_events_webhook_idx bounds the scan to the window).
SELECT count(*) AS received,
       count(*) FILTER (WHERE e.status = 'pending') AS pending,
       count(*) FILTER (WHERE e.status = 'processing') AS processing,
       count(*) FILTER (WHERE e.status = 'processed') AS processed,
       count(*) FILTER (WHERE e.status = 'failed') AS failed,
       count(*) FILTER (WHERE e.status = 'dead') AS dead,
       (percentile_cont(0.95) WITHIN GROUP (
          ORDER BY extract(epoch FROM e.processed_at - e.received_at) * 1000)
        FILTER (WHERE e.status = 'processed'))::float8 AS p95_ms
FROM webhook_events e
WHERE e.org_id = coalesce(:org_id::uuid, app.org_id()) AND e.webhook_id = :webhook_id
  AND e.received_at >= :since;

-- name: purge :execrows
-- Retention: delete up to :limit processed or dead events received before :before (one
-- short batch; call again until it deletes fewer than :limit). Rows locked by a worker are
-- skipped, never waited for. From dl.system().
DELETE FROM webhook_events
WHERE ctid = ANY(ARRAY(
  SELECT q.ctid FROM webhook_events q
  WHERE q.received_at < :before AND q.status IN ('processed', 'dead')
  ORDER BY q.received_at
  LIMIT :limit
  FOR UPDATE SKIP LOCKED));
