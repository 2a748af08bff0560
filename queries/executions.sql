-- Executions: enqueue and read (tenant sessions), the work queue (workers, usually from
-- dl.system()), node executions, snapshots, timeline and sub-workflow tree.
--
-- Row-addressing queries take `:org_id` and fall back to the context's organization when it
-- is NULL: a tenant session passes NULL (and RLS confines it to its organization anyway), a
-- cross-tenant worker in dl.system() passes the execution's organization. Worker writes are
-- fenced by (worker_id, attempt): a worker whose lease was taken over changes nothing.

-- name: enqueue :one
-- A new queued execution of a live workflow the context can see, at its current version (or
-- :version). Retry policy from the version's settings->'retry' ({"enabled": true,
-- "max_attempts": N, "base_delay_ms": M}) unless :max_attempts is given; no row when the
-- workflow (or the version) is not there.
INSERT INTO executions (org_id, workflow_id, workflow_version, trigger, trigger_payload, input,
                        priority, scheduled_at, timeout_ms, max_attempts, auto_retry,
                        retry_delay_ms)
SELECT w.org_id, w.id, v.version, :trigger::text, coalesce(:trigger_payload::jsonb, '{}'),
       coalesce(:input::jsonb, '{}'), :priority::int, coalesce(:scheduled_at::timestamptz, now()),
       :timeout_ms::int,
       coalesce(:max_attempts::int,
                CASE WHEN r.enabled THEN least(greatest(r.max_attempts, 1), 100) END, 3),
       coalesce(r.enabled, false), coalesce(least(greatest(r.base_delay_ms, 0), 86400000), 1000)
FROM workflows w
JOIN workflow_versions v ON v.org_id = w.org_id AND v.workflow_id = w.id
                        AND v.version = coalesce(:version::int, w.current_version)
CROSS JOIN LATERAL (
  SELECT (v.settings -> 'retry' ->> 'enabled')::boolean AS enabled,
         (v.settings -> 'retry' ->> 'max_attempts')::int AS max_attempts,
         (v.settings -> 'retry' ->> 'base_delay_ms')::int AS base_delay_ms) r
WHERE w.org_id = coalesce(:org_id::uuid, app.org_id()) AND w.id = :workflow_id
  AND w.deleted_at IS NULL
RETURNING org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
          error, status, status_reason, priority, attempt, max_attempts, auto_retry,
          retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
          timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
          duration_ms, created_by, created_at, updated_at;

-- name: enqueue_child :one
-- A sub-workflow execution started by node :node_id of a running (or waiting) parent; it
-- inherits the parent's organization and priority. No row when either is not there.
INSERT INTO executions (org_id, workflow_id, workflow_version, trigger, trigger_payload, input,
                        priority, timeout_ms, max_attempts, auto_retry, retry_delay_ms,
                        parent_execution_id)
SELECT p.org_id, w.id, v.version, 'sub_workflow',
       jsonb_build_object('parent_execution_id', p.id, 'node_id', :node_id::text),
       coalesce(:input::jsonb, '{}'), p.priority, :timeout_ms::int,
       CASE WHEN r.enabled THEN least(greatest(coalesce(r.max_attempts, 3), 1), 100) ELSE 3 END,
       coalesce(r.enabled, false), coalesce(least(greatest(r.base_delay_ms, 0), 86400000), 1000),
       p.id
FROM executions p
JOIN workflows w ON w.org_id = p.org_id AND w.id = :workflow_id AND w.deleted_at IS NULL
JOIN workflow_versions v ON v.org_id = w.org_id AND v.workflow_id = w.id
                        AND v.version = w.current_version
CROSS JOIN LATERAL (
  SELECT (v.settings -> 'retry' ->> 'enabled')::boolean AS enabled,
         (v.settings -> 'retry' ->> 'max_attempts')::int AS max_attempts,
         (v.settings -> 'retry' ->> 'base_delay_ms')::int AS base_delay_ms) r
WHERE p.org_id = coalesce(:org_id::uuid, app.org_id()) AND p.id = :parent_id
  AND p.status IN ('running', 'waiting')
RETURNING org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
          error, status, status_reason, priority, attempt, max_attempts, auto_retry,
          retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
          timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
          duration_ms, created_by, created_at, updated_at;

-- name: get :one
SELECT org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
       error, status, status_reason, priority, attempt, max_attempts, auto_retry,
       retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
       timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
       duration_ms, created_by, created_at, updated_at
FROM executions
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND id = :id;

-- name: list :many
-- The organization's executions with a status in :statuses, newest first, keyset-paginated.
SELECT org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
       error, status, status_reason, priority, attempt, max_attempts, auto_retry,
       retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
       timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
       duration_ms, created_by, created_at, updated_at
FROM executions
WHERE org_id = app.org_id() AND status = ANY (:statuses::text[])
  AND (created_at, id) < (:before_created_at, :before_id)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: list_by_workflow :many
-- One workflow's executions with a status in :statuses, newest first, keyset-paginated.
SELECT org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
       error, status, status_reason, priority, attempt, max_attempts, auto_retry,
       retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
       timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
       duration_ms, created_by, created_at, updated_at
FROM executions
WHERE org_id = app.org_id() AND workflow_id = :workflow_id AND status = ANY (:statuses::text[])
  AND (created_at, id) < (:before_created_at, :before_id)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: cancel :one
-- Cancel a queued, running or waiting execution. A finished one makes the state machine
-- raise (ValidationError naming both states); no row when it is not there.
UPDATE executions SET status = 'cancelled', status_reason = :reason
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND id = :id
RETURNING org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
          error, status, status_reason, priority, attempt, max_attempts, auto_retry,
          retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
          timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
          duration_ms, created_by, created_at, updated_at;

-- name: retry :one
-- A failed, timed-out or cancelled execution again, as a new queued execution (attempt + 1,
-- retry_of = it). No row past max_attempts or in another state; Conflict when that attempt
-- was retried already (executions_retry_of_key).
INSERT INTO executions (org_id, workflow_id, workflow_version, trigger, trigger_payload, input,
                        priority, timeout_ms, attempt, max_attempts, auto_retry, retry_delay_ms,
                        retry_of, parent_execution_id, status_reason)
SELECT e.org_id, e.workflow_id, e.workflow_version, e.trigger, e.trigger_payload, e.input,
       e.priority, e.timeout_ms, e.attempt + 1, e.max_attempts, e.auto_retry, e.retry_delay_ms,
       e.id, e.parent_execution_id, format('retry %s of %s', e.attempt + 1, e.max_attempts)
FROM executions e
WHERE e.org_id = coalesce(:org_id::uuid, app.org_id()) AND e.id = :id
  AND e.status IN ('failed', 'timed_out', 'cancelled') AND e.attempt < e.max_attempts
RETURNING org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
          error, status, status_reason, priority, attempt, max_attempts, auto_retry,
          retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
          timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
          duration_ms, created_by, created_at, updated_at;

-- name: resume :one
-- A waiting execution's external event arrived: back to the queue. No row unless waiting.
UPDATE executions SET status = 'queued', scheduled_at = now(), status_reason = :reason
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND id = :id AND status = 'waiting'
RETURNING org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
          error, status, status_reason, priority, attempt, max_attempts, auto_retry,
          retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
          timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
          duration_ms, created_by, created_at, updated_at;

-- name: claim :many
-- Hand up to :limit due queued executions to :worker_id for :lease_s seconds: highest
-- priority first, then earliest scheduled (executions_queue_idx); rows another claimer has
-- locked are skipped, so concurrent claimers never wait for or receive the same row.
UPDATE executions e
SET status = 'running', worker_id = :worker_id,
    lease_expires_at = now() + make_interval(secs => :lease_s)
FROM (SELECT q.org_id, q.id FROM executions q
      WHERE q.status = 'queued' AND q.scheduled_at <= now()
      ORDER BY q.priority DESC, q.scheduled_at
      LIMIT :limit
      FOR UPDATE SKIP LOCKED) picked
WHERE e.org_id = picked.org_id AND e.id = picked.id
RETURNING e.org_id, e.id, e.workflow_id, e.workflow_version, e.trigger, e.trigger_payload,
          e.input, e.output, e.error, e.status, e.status_reason, e.priority, e.attempt,
          e.max_attempts, e.auto_retry, e.retry_delay_ms, e.retry_of, e.parent_execution_id,
          e.root_execution_id, e.scheduled_at, e.timeout_ms, e.deadline_at, e.worker_id,
          e.lease_expires_at, e.started_at, e.finished_at, e.duration_ms, e.created_by,
          e.created_at, e.updated_at;

-- name: heartbeat :many
-- Extend the lease of every execution :worker_id still holds; the ones it lost (reaped,
-- cancelled, finished) are simply not returned.
UPDATE executions SET lease_expires_at = now() + make_interval(secs => :lease_s)
WHERE status = 'running' AND worker_id = :worker_id
RETURNING org_id, id, attempt, lease_expires_at;

-- name: finish :one
-- Finish an execution :worker_id holds (attempt :attempt) as :status (succeeded, failed,
-- cancelled, timed_out). No row when the worker no longer holds it.
UPDATE executions
SET status = :status, output = :output::jsonb, error = :error::jsonb, status_reason = :reason
WHERE org_id = :org_id AND id = :id AND status = 'running' AND worker_id = :worker_id
  AND attempt = :attempt
RETURNING org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
          error, status, status_reason, priority, attempt, max_attempts, auto_retry,
          retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
          timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
          duration_ms, created_by, created_at, updated_at;

-- name: complete_many :many
-- Complete a batch (same-length arrays) as succeeded in one statement; returns the ones
-- :worker_id still held, which are the ones completed.
UPDATE executions e SET status = 'succeeded', output = d.output
FROM unnest(:org_ids::uuid[], :ids::uuid[], :attempts::int[], :outputs::jsonb[])
       AS d (org_id, id, attempt, output)
WHERE e.org_id = d.org_id AND e.id = d.id AND e.attempt = d.attempt AND e.status = 'running'
  AND e.worker_id = :worker_id
RETURNING e.org_id, e.id, e.attempt, e.finished_at;

-- name: wait :one
-- Pause an execution :worker_id holds until an external event resumes it (releases the
-- lease). No row when the worker no longer holds it.
UPDATE executions SET status = 'waiting', status_reason = :reason
WHERE org_id = :org_id AND id = :id AND status = 'running' AND worker_id = :worker_id
  AND attempt = :attempt
RETURNING org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
          error, status, status_reason, priority, attempt, max_attempts, auto_retry,
          retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
          timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
          duration_ms, created_by, created_at, updated_at;

-- name: release :many
-- Give back every execution :worker_id holds (a clean shutdown): queued again at once,
-- same attempt.
UPDATE executions SET status = 'queued', scheduled_at = now(),
                      status_reason = 'released by worker ' || :worker_id::text
WHERE status = 'running' AND worker_id = :worker_id
RETURNING org_id, id, attempt, lease_expires_at;

-- name: reap :many
-- Up to :limit executions whose worker stopped renewing its lease go back to the queue as a
-- new attempt, or fail after their last one; running or waiting executions past their
-- deadline time out. Locked rows are skipped (another reaper has them).
UPDATE executions e
SET status = r.next,
    attempt = e.attempt + (r.next = 'queued')::int,
    scheduled_at = CASE WHEN r.next = 'queued' THEN now() ELSE e.scheduled_at END,
    error = CASE r.next
              WHEN 'failed' THEN jsonb_build_object(
                'message', 'the worker stopped renewing its lease on the last attempt')
              WHEN 'timed_out' THEN jsonb_build_object(
                'message', 'the execution ran past its timeout')
              ELSE e.error END,
    status_reason = CASE WHEN r.next = 'timed_out' THEN 'deadline passed'
                         ELSE 'lease expired (worker ' || e.worker_id || ')' END
FROM (SELECT q.org_id, q.id,
             CASE WHEN q.deadline_at <= now() THEN 'timed_out'
                  WHEN q.attempt < q.max_attempts THEN 'queued'
                  ELSE 'failed' END AS next
      FROM executions q
      WHERE (q.status = 'running' AND q.lease_expires_at < now())
         OR (q.deadline_at IS NOT NULL AND q.status IN ('running', 'waiting')
             AND q.deadline_at <= now())
      LIMIT :limit
      FOR UPDATE SKIP LOCKED) r
WHERE e.org_id = r.org_id AND e.id = r.id
RETURNING e.org_id, e.id, e.workflow_id, e.workflow_version, e.trigger, e.trigger_payload,
          e.input, e.output, e.error, e.status, e.status_reason, e.priority, e.attempt,
          e.max_attempts, e.auto_retry, e.retry_delay_ms, e.retry_of, e.parent_execution_id,
          e.root_execution_id, e.scheduled_at, e.timeout_ms, e.deadline_at, e.worker_id,
          e.lease_expires_at, e.started_at, e.finished_at, e.duration_ms, e.created_by,
          e.created_at, e.updated_at;

-- name: recover :one
-- A crashed execution (running, lease expired, attempts left) back to the queue now as a new
-- attempt, without waiting for the reaper. No row otherwise.
UPDATE executions
SET status = 'queued', attempt = attempt + 1, scheduled_at = now(),
    status_reason = 'recovered from its latest snapshot'
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND id = :id AND status = 'running'
  AND lease_expires_at < now() AND attempt < max_attempts
RETURNING org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output,
          error, status, status_reason, priority, attempt, max_attempts, auto_retry,
          retry_delay_ms, retry_of, parent_execution_id, root_execution_id, scheduled_at,
          timeout_ms, deadline_at, worker_id, lease_expires_at, started_at, finished_at,
          duration_ms, created_by, created_at, updated_at;

-- name: checkpoint :one
-- Snapshot the state of an execution :worker_id holds; :seq defaults to the next number.
INSERT INTO execution_snapshots (org_id, execution_id, seq, attempt, state, reason)
SELECT e.org_id, e.id,
       coalesce(:seq::int, (SELECT coalesce(max(s.seq), 0) + 1 FROM execution_snapshots s
                            WHERE s.org_id = e.org_id AND s.execution_id = e.id)),
       e.attempt, :state::jsonb, :reason::text
FROM executions e
WHERE e.org_id = :org_id AND e.id = :id AND e.status = 'running' AND e.worker_id = :worker_id
  AND e.attempt = :attempt
RETURNING org_id, execution_id, seq, attempt, state, reason, created_at;

-- name: latest_snapshot :one
SELECT org_id, execution_id, seq, attempt, state, reason, created_at
FROM execution_snapshots
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND execution_id = :execution_id
ORDER BY seq DESC
LIMIT 1;

-- name: start_node :one
-- A node of an execution :worker_id holds starts running (clock time: several nodes of one
-- transaction keep their order).
INSERT INTO node_executions (org_id, execution_id, node_id, node_name, node_type, status, input,
                             attempt, started_at)
SELECT e.org_id, e.id, :node_id::text, :node_name::text, :node_type::text, 'running', :input::jsonb,
       :node_attempt::int, clock_timestamp()
FROM executions e
WHERE e.org_id = :org_id AND e.id = :execution_id AND e.status = 'running'
  AND e.worker_id = :worker_id AND e.attempt = :attempt
RETURNING org_id, id, execution_id, node_id, node_name, node_type, status, input, output, error,
          attempt, started_at, finished_at, duration_ms, created_at;

-- name: finish_node :one
-- A running node of an execution :worker_id holds finishes as :status (succeeded, failed,
-- skipped, cancelled). :created_at (from start_node) picks the node's partition.
UPDATE node_executions n
SET status = :status, output = :output::jsonb, error = :error::jsonb,
    finished_at = clock_timestamp()
FROM executions e
WHERE n.org_id = :org_id AND n.id = :id AND n.created_at = :created_at AND n.status = 'running'
  AND e.org_id = n.org_id AND e.id = n.execution_id AND e.status = 'running'
  AND e.worker_id = :worker_id AND e.attempt = :attempt
RETURNING n.org_id, n.id, n.execution_id, n.node_id, n.node_name, n.node_type, n.status, n.input,
          n.output, n.error, n.attempt, n.started_at, n.finished_at, n.duration_ms,
          n.created_at;

-- name: nodes :many
-- An execution's node executions in the order they started.
SELECT n.org_id, n.id, n.execution_id, n.node_id, n.node_name, n.node_type, n.status, n.input,
       n.output, n.error, n.attempt, n.started_at, n.finished_at, n.duration_ms, n.created_at
FROM executions e
JOIN node_executions n ON n.org_id = e.org_id AND n.execution_id = e.id
                      AND n.created_at >= e.created_at
WHERE e.org_id = coalesce(:org_id::uuid, app.org_id()) AND e.id = :execution_id
ORDER BY n.started_at, n.created_at, n.id;

-- name: transitions :many
-- An execution's status history, oldest first.
SELECT t.org_id, t.execution_id, t.id, t.from_status, t.to_status, t.attempt, t.worker_id,
       t.actor_id, t.reason, t.created_at
FROM executions e
JOIN execution_transitions t ON t.org_id = e.org_id AND t.execution_id = e.id
                            AND t.created_at >= e.created_at
WHERE e.org_id = coalesce(:org_id::uuid, app.org_id()) AND e.id = :execution_id
ORDER BY t.created_at, t.id;

-- name: timeline :many
-- The execution, its transitions and its node executions in time order, in one statement:
-- kind 'execution' (first), 'transition' or 'node'. The partitions of months before the
-- execution was created are pruned at run time.
SELECT x.kind, x.at, x.status, x.from_status, x.attempt, x.node_execution_id, x.node_id,
       x.node_name, x.node_type, x.worker_id, x.actor_id, x.reason, x.finished_at,
       x.duration_ms, x.error
FROM (
  SELECT 'execution' AS kind, e.created_at AS at, 0 AS ord, 0::bigint AS seq, e.status,
         NULL::text AS from_status, e.attempt, NULL::uuid AS node_execution_id,
         NULL::text AS node_id, NULL::text AS node_name, NULL::text AS node_type, e.worker_id,
         e.created_by AS actor_id, e.status_reason AS reason, e.finished_at, e.duration_ms,
         e.error
  FROM executions e
  WHERE e.org_id = coalesce(:org_id::uuid, app.org_id()) AND e.id = :execution_id
  UNION ALL
  SELECT 'transition', t.created_at, 1, t.id, t.to_status, t.from_status, t.attempt, NULL, NULL,
         NULL, NULL, t.worker_id, t.actor_id, t.reason, NULL, NULL, NULL
  FROM executions e
  JOIN execution_transitions t ON t.org_id = e.org_id AND t.execution_id = e.id
                              AND t.created_at >= e.created_at
  WHERE e.org_id = coalesce(:org_id::uuid, app.org_id()) AND e.id = :execution_id
  UNION ALL
  SELECT 'node', n.started_at, 2, 0, n.status, NULL, n.attempt, n.id, n.node_id, n.node_name,
         n.node_type, NULL, NULL, NULL, n.finished_at, n.duration_ms, n.error
  FROM executions e
  JOIN node_executions n ON n.org_id = e.org_id AND n.execution_id = e.id
                        AND n.created_at >= e.created_at
  WHERE e.org_id = coalesce(:org_id::uuid, app.org_id()) AND e.id = :execution_id
) x
ORDER BY x.ord = 0 DESC, x.at, x.ord, x.seq, x.node_execution_id;

-- name: tree :many
-- The sub-workflow tree under :root_id (itself at depth 0), depth first, children in the
-- order they were created.
WITH RECURSIVE tree AS (
  SELECT e.org_id, e.id, e.parent_execution_id, e.workflow_id, e.trigger, e.status, e.attempt,
         e.started_at, e.finished_at, e.duration_ms, e.created_at, 0 AS depth,
         ARRAY[to_char(e.created_at AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || e.id::text]
           AS path
  FROM executions e
  WHERE e.org_id = coalesce(:org_id::uuid, app.org_id()) AND e.id = :root_id
  UNION ALL
  SELECT c.org_id, c.id, c.parent_execution_id, c.workflow_id, c.trigger, c.status, c.attempt,
         c.started_at, c.finished_at, c.duration_ms, c.created_at, t.depth + 1,
         t.path || (to_char(c.created_at AT TIME ZONE 'UTC', 'YYYYMMDDHH24MISSUS') || c.id::text)
  FROM tree t
  JOIN executions c ON c.org_id = t.org_id AND c.parent_execution_id = t.id
  WHERE t.depth < 64
)
SELECT org_id, id, parent_execution_id, workflow_id, trigger, status, attempt, depth,
       started_at, finished_at, duration_ms, created_at
FROM tree
ORDER BY path;

-- name: notify_status :execrows
-- Announce an execution's status on NOTIFY channel datalayer_execution_status (live status
-- without Redis), built from the row this session sees: 0 when it sees none. Ids, status,
-- progress, node id and time only.
SELECT pg_notify('datalayer_execution_status',
                 json_build_object('execution_id', e.id, 'workflow_id', e.workflow_id,
                                   'status', e.status, 'progress', :progress::float8,
                                   'node_id', :node_id::text, 'at', now())::text)
FROM executions e
WHERE e.org_id = coalesce(:org_id::uuid, app.org_id()) AND e.id = :id;

-- name: workflow_visible :scalar
-- Does the context see this workflow (live-status subscriptions check before subscribing)?
SELECT EXISTS (SELECT 1 FROM workflows
               WHERE org_id = app.org_id() AND id = :workflow_id AND deleted_at IS NULL);

-- name: seed_workflows :many
-- Live workflows of the given organizations with their current version (seeding, benchmarks).
SELECT org_id, id, current_version FROM workflows
WHERE org_id = ANY (:org_ids::uuid[]) AND deleted_at IS NULL
ORDER BY org_id, id;

-- name: copy_rows :copy
COPY executions (org_id, id, workflow_id, workflow_version, trigger, trigger_payload, input, output, error, status, priority, attempt, max_attempts, parent_execution_id, scheduled_at, worker_id, lease_expires_at, started_at, finished_at, created_at) FROM STDIN;

-- name: copy_nodes :copy
COPY node_executions (org_id, id, execution_id, node_id, node_name, node_type, status, input, output, error, attempt, started_at, finished_at, created_at) FROM STDIN;
