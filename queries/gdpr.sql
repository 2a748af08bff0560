-- GDPR: consent records, subject export and erasure, masked member lists
-- (schema/0016_gdpr.sql). :user_id NULL means the context user; :org_id NULL the context's
-- organization (maintenance sessions, dl.system(), pass it).

-- name: record_consent :one
-- Append one consent record (granted or withdrawn) for a member of the organization: the
-- context user themself, or any member when the context is an admin.
INSERT INTO consents (org_id, user_id, purpose, notice_version, granted, source)
VALUES (coalesce(:org_id::uuid, app.org_id()), coalesce(:user_id::uuid, app.user_id()),
        :purpose, :notice_version, :granted, :source)
RETURNING org_id, id, user_id, purpose, notice_version, granted, source, recorded_by, at;

-- name: consent_state :many
-- The current state per purpose: the latest record of each (consents_state_idx, in order).
-- The coalesces are sub-selects (InitPlans): under RLS a qual calling a function that is
-- not LEAKPROOF runs after the policy, as a filter; `column = $initplan` is an index qual.
SELECT DISTINCT ON (c.purpose)
       c.org_id, c.id, c.user_id, c.purpose, c.notice_version, c.granted, c.source,
       c.recorded_by, c.at
FROM consents c
WHERE c.org_id = (SELECT coalesce(:org_id::uuid, app.org_id()))
  AND c.user_id = (SELECT coalesce(:user_id::uuid, app.user_id()))
ORDER BY c.purpose, c.at DESC, c.id DESC;

-- name: has_consent :scalar
-- Whether the latest record for one purpose grants it (NULL when there is none).
SELECT c.granted
FROM consents c
WHERE c.org_id = (SELECT coalesce(:org_id::uuid, app.org_id()))
  AND c.user_id = (SELECT coalesce(:user_id::uuid, app.user_id())) AND c.purpose = :purpose
ORDER BY c.at DESC, c.id DESC
LIMIT 1;

-- name: consent_history :many
-- Every record of a subject, newest first.
SELECT c.org_id, c.id, c.user_id, c.purpose, c.notice_version, c.granted, c.source,
       c.recorded_by, c.at
FROM consents c
WHERE c.org_id = (SELECT coalesce(:org_id::uuid, app.org_id()))
  AND c.user_id = (SELECT coalesce(:user_id::uuid, app.user_id()))
ORDER BY c.at DESC, c.id DESC
LIMIT :limit;

-- name: export :many
-- The registry's rows about a subject that the context may see (app.gdpr_export).
SELECT table_name, subject_column, org_id, data FROM app.gdpr_export(:user_id);

-- name: export_all :many
-- Maintenance: the registry's rows about a subject in every organization.
SELECT table_name, subject_column, org_id, data FROM app.gdpr_export_all(:user_id);

-- name: erase :many
-- An admin erases a subject's personal data in the context organization.
SELECT table_name, subject_column, action, affected FROM app.gdpr_erase(:user_id);

-- name: erase_all :many
-- Maintenance: erase a subject's personal data everywhere.
SELECT table_name, subject_column, action, affected FROM app.gdpr_erase_all(:user_id);

-- name: members_masked :many
-- The organization's members; emails masked for roles below admin (but their own).
-- (The view org_members_masked is the same for ad-hoc use; the tables are named here so
-- that column nullability is known to the row class.)
SELECT m.org_id, m.user_id, m.role, u.display_name,
       app.visible_email(u.email, m.user_id) AS email, u.status, m.created_at AS joined_at
FROM memberships m
JOIN users u ON u.id = m.user_id AND u.deleted_at IS NULL
WHERE m.org_id = app.org_id()
  AND (m.created_at, m.user_id) > (:after_joined_at, :after_user_id)
ORDER BY m.created_at, m.user_id
LIMIT :limit;

-- name: visible_ip :scalar
-- An IP address as the context may see it for user :user_id (masked below admin).
SELECT app.visible_ip(:ip::inet, :user_id::uuid);

-- name: audit_about :many
-- Export: the audit events about or by :user_id that the session may see (RLS: a tenant
-- session's organization, and only roles that may read the audit trail; :org_id narrows to
-- one organization), without the chain's hashes and salts.
SELECT to_jsonb(e) - '{prev_hash,row_hash,pii_salt,pii_commit}'::text[] AS data
FROM audit_events e
WHERE (:org_id::uuid IS NULL OR e.org_id = :org_id::uuid)
  AND (e.subject_user_id = :user_id::uuid OR e.actor_user_id = :user_id::uuid);
