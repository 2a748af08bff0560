-- depends: 0023_audit_gdpr_optin
-- Audit events become a search kind (db.search.query(..., kinds=["audit"])): a stored,
-- weighted tsvector over what an event is (action A; resource B; result, risk and the
-- non-personal details C) with a GIN index on every partition, and one branch in
-- app.search_documents with the audit trail's read rule (the roles that may read 'audit').
-- The personal part (IP, user agent, `personal`) is never indexed, so erasure has nothing to
-- redact here, and the hash chain covers an explicit column list, so it is unaffected.

ALTER TABLE audit_events ADD COLUMN search tsvector GENERATED ALWAYS AS (
  setweight(to_tsvector('simple'::regconfig, replace(action, '.', ' ')), 'A')
  || setweight(to_tsvector('simple'::regconfig,
                           coalesce(resource_type, '') || ' ' || coalesce(resource_id, '')), 'B')
  || setweight(to_tsvector('simple'::regconfig, result || ' ' || risk), 'C')
  || setweight(jsonb_to_tsvector('simple'::regconfig, details, '["string", "numeric"]'), 'C')
) STORED;
CREATE INDEX audit_events_search_idx ON audit_events USING gin (search);

CREATE OR REPLACE VIEW app.search_documents WITH (security_invoker = true) AS
SELECT 'workflow'::text AS kind, w.org_id, w.id, w.search AS doc, w.name AS title,
       w.description AS body, w.updated_at
FROM workflows w
WHERE w.deleted_at IS NULL AND NOT w.is_template
  AND (w.visibility IN ('organization', 'public')
       OR w.owner_id = (SELECT app.user_id())
       OR (SELECT app.role()) IN ('owner', 'admin')
       OR (w.visibility = 'team' AND w.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))
       OR EXISTS (SELECT 1 FROM workflow_shares s
                  WHERE s.org_id = w.org_id AND s.workflow_id = w.id
                    AND (s.user_id = (SELECT app.user_id()) OR s.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))))
UNION ALL
SELECT 'template', w.org_id, w.id, w.search, w.name, w.description, w.updated_at
FROM workflows w
WHERE w.deleted_at IS NULL AND w.is_template
  AND (w.visibility IN ('organization', 'public')
       OR w.owner_id = (SELECT app.user_id())
       OR (SELECT app.role()) IN ('owner', 'admin')
       OR (w.visibility = 'team' AND w.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))
       OR EXISTS (SELECT 1 FROM workflow_shares s
                  WHERE s.org_id = w.org_id AND s.workflow_id = w.id
                    AND (s.user_id = (SELECT app.user_id()) OR s.team_id = ANY ((SELECT app.my_team_ids())::uuid[]))))
UNION ALL
SELECT 'execution', e.org_id, e.id, e.error_search, 'Execution ' || e.status,
       coalesce(e.error ->> 'message', '') || coalesce(' (' || e.status_reason || ')', ''),
       e.updated_at
FROM executions e
WHERE e.error_search IS NOT NULL
UNION ALL
SELECT 'notification', n.org_id, n.id, n.search, n.title, n.message, n.created_at
FROM notifications n
WHERE n.user_id = (SELECT app.user_id()) AND (n.expires_at IS NULL OR n.expires_at > now())
UNION ALL
SELECT 'audit', a.org_id, a.id, a.search, a.action,
       concat_ws(' ', a.resource_type || ':' || a.resource_id, a.result, a.risk,
                 array_to_string(a.frameworks, ' ')),
       a.at
FROM audit_events a
WHERE (SELECT app.role_allows((SELECT app.role()), 'audit', 'read'));
