-- Audit trail (schema/0015_audit.sql): explicit events, captured row changes, chain
-- verification, retention and compliance reports. Methods that take :org_id use it from
-- dl.system() and pass NULL in a tenant session (the context's organization; RLS bounds
-- every statement there anyway).

-- name: record :one
-- An event of the context organization; who, from where and which request come from the
-- context (the trigger fills them), risk and frameworks from app.audit_rules.
INSERT INTO audit_events (org_id, action, result, subject_user_id, resource_type, resource_id,
                          user_agent, details, personal)
VALUES (app.org_id(), :action, :result, :subject_user_id, :resource_type, :resource_id,
        :user_agent, :details, :personal)
RETURNING org_id, seq, id, at, action, result, risk, frameworks, actor_user_id,
          subject_user_id, resource_type, resource_id, ip, user_agent, request_id, details,
          personal, redacted_at, row_hash;

-- name: record_system :one
-- An event written by maintenance code (dl.system()) for any organization, or the global
-- chain (00000000-0000-0000-0000-000000000000).
INSERT INTO audit_events (org_id, action, result, actor_user_id, subject_user_id,
                          resource_type, resource_id, ip, user_agent, request_id, details,
                          personal)
VALUES (:org_id, :action, :result, :actor_user_id, :subject_user_id, :resource_type,
        :resource_id, :ip, :user_agent, :request_id, :details, :personal)
RETURNING org_id, seq, id, at, action, result, risk, frameworks, actor_user_id,
          subject_user_id, resource_type, resource_id, ip, user_agent, request_id, details,
          personal, redacted_at, row_hash;

-- name: auth_event :scalar
-- Login, lockout and API-key use (no tenant context): one event per organization of the user
-- (the global chain for an unknown account). Returns the number of events written.
SELECT app.audit_auth_event(:user_id, :action, :result, :ip, :user_agent, :details);

-- name: by_resource :many
-- Events about one resource, newest first, keyset-paginated on (at, seq).
SELECT org_id, seq, id, at, action, result, risk, frameworks, actor_user_id,
       subject_user_id, resource_type, resource_id, ip, user_agent, request_id, details,
       personal, redacted_at, row_hash
FROM audit_events
WHERE org_id = coalesce(:org_id::uuid, app.org_id())
  AND resource_type = :resource_type AND resource_id = :resource_id
  AND (at, seq) < (:before_at, :before_seq)
ORDER BY at DESC, seq DESC
LIMIT :limit;

-- name: events_about :many
-- Events whose subject is a user, newest first, keyset-paginated on (at, seq).
SELECT org_id, seq, id, at, action, result, risk, frameworks, actor_user_id,
       subject_user_id, resource_type, resource_id, ip, user_agent, request_id, details,
       personal, redacted_at, row_hash
FROM audit_events
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND subject_user_id = :user_id
  AND (at, seq) < (:before_at, :before_seq)
ORDER BY at DESC, seq DESC
LIMIT :limit;

-- name: changes_for :many
-- Captured changes of one row (by primary key as jsonb), newest first.
SELECT org_id, seq, id, at, table_name, row_pk, op, actor_user_id, request_id,
       changed_columns, frameworks, before, after, personal, redacted_at
FROM data_changes
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND table_name = :table_name
  AND row_pk = :row_pk::jsonb
  AND (at, seq) < (:before_at, :before_seq)
ORDER BY at DESC, seq DESC
LIMIT :limit;

-- name: chain_state :many
-- The chain heads of an organization (maintenance: verification and anchors).
SELECT chain, seq, head, floor_seq, floor_prev
FROM app.audit_heads
WHERE org_id = :org_id
ORDER BY chain;

-- name: verify_events :many
-- One verification batch of the events chain, seq in [:from_seq, :to_seq): each row's link and
-- whether its hash (and, unless redacted, its personal-data commitment) recomputes. A range
-- rather than ORDER BY .. LIMIT: every partition contributes only its rows of the range.
SELECT e.seq, e.prev_hash, e.row_hash,
       e.row_hash = app.audit_event_hash(e.prev_hash, e.org_id, e.seq, e.id, e.at, e.action,
                                         e.result, e.risk, e.frameworks, e.actor_user_id,
                                         e.subject_user_id, e.resource_type, e.resource_id,
                                         e.request_id, e.details, e.pii_commit)
       AND CASE WHEN e.redacted_at IS NULL
                THEN e.pii_commit = app.audit_commit(e.pii_salt, e.ip, e.user_agent, e.personal)
                ELSE e.ip IS NULL AND e.user_agent IS NULL AND e.personal IS NULL
                     AND e.pii_salt IS NULL END AS ok
FROM audit_events e
WHERE e.org_id = :org_id AND e.seq >= :from_seq AND e.seq < :to_seq
ORDER BY e.seq;

-- name: verify_changes :many
-- One verification batch of the changes chain, seq in [:from_seq, :to_seq) (see verify_events).
SELECT d.seq, d.prev_hash, d.row_hash,
       d.row_hash = app.audit_change_hash(d.prev_hash, d.org_id, d.seq, d.id, d.at,
                                          d.table_name, d.row_pk, d.op, d.actor_user_id,
                                          d.request_id, d.changed_columns, d.frameworks,
                                          d.before, d.after, d.pii_commit)
       AND CASE WHEN d.redacted_at IS NULL
                THEN d.pii_commit = app.audit_commit(d.pii_salt, NULL, NULL, d.personal)
                ELSE d.personal IS NULL AND d.pii_salt IS NULL END AS ok
FROM data_changes d
WHERE d.org_id = :org_id AND d.seq >= :from_seq AND d.seq < :to_seq
ORDER BY d.seq;

-- name: redact_subject :scalar
-- Erasure path (dl.system()): remove a user's personal data from the audit rows of an
-- organization and of the global chain; the chains stay verifiable.
SELECT app.audit_redact_subject(:org_id, :user_id);

-- name: report :many
-- A compliance report for [:from_at, :to_at): :kind is one of sensitive_access,
-- failed_logins, permission_changes, high_risk; :framework (GDPR, SOX, HIPAA) or NULL.
SELECT org_id, seq, id, at, action, result, risk, frameworks, actor_user_id,
       subject_user_id, resource_type, resource_id, ip, user_agent, request_id, details,
       personal, redacted_at, row_hash
FROM audit_events
WHERE org_id = coalesce(:org_id::uuid, app.org_id())
  AND at >= :from_at AND at < :to_at
  AND (:framework::text IS NULL OR :framework::text = ANY (frameworks))
  AND CASE :kind::text
        WHEN 'sensitive_access' THEN action LIKE 'credential.%'
                                     OR action IN ('data.export', 'gdpr.export')
        WHEN 'failed_logins' THEN (action = 'auth.login' AND result <> 'success')
                                  OR action = 'auth.lockout'
        WHEN 'permission_changes' THEN action LIKE 'membership.%' OR action LIKE 'team.%'
                                       OR action IN ('api_key.created', 'api_key.revoked')
        WHEN 'high_risk' THEN risk IN ('high', 'critical')
        ELSE false
      END
ORDER BY at, seq
LIMIT :limit;

-- name: set_policy :one
-- The context organization's retention for a framework and event class (admins; SOX and
-- HIPAA only at or above their floors).
INSERT INTO audit_retention_policies AS p (org_id, framework, event_class, keep_days)
VALUES (app.org_id(), :framework, :event_class, :keep_days)
ON CONFLICT (org_id, framework, event_class)
DO UPDATE SET keep_days = EXCLUDED.keep_days, updated_at = now()
RETURNING org_id, framework, event_class, keep_days, updated_at;

-- name: set_legal_hold :execrows
INSERT INTO audit_legal_holds (org_id, reason) VALUES (app.org_id(), :reason)
ON CONFLICT (org_id) DO NOTHING;

-- name: clear_legal_hold :execrows
DELETE FROM audit_legal_holds WHERE org_id = app.org_id();

-- name: retention_orgs :many
-- Organizations with audit chains (maintenance).
SELECT DISTINCT org_id FROM app.audit_heads ORDER BY org_id;

-- name: retention_cut :scalar
SELECT app.audit_retention_cut(:org_id, :table_name);

-- name: retention_partitions :many
SELECT table_name, partition_name, upper_bound FROM app.audit_partitions();

-- name: retention_drop :scalar
SELECT app.audit_retention_drop(:partition_name, :cuts);

-- name: retention_delete :scalar
SELECT app.audit_retention_delete(:org_id, :table_name, :cut, :limit);

-- name: retention_log :many
SELECT org_id, id, table_name, removed, up_to_seq, method, at
FROM audit_retention_log
WHERE org_id = coalesce(:org_id::uuid, app.org_id())
ORDER BY id DESC
LIMIT :limit;
