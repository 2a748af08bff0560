-- Undo 0024_audit_search: the search view without the audit branch, and the column.
DROP VIEW app.search_documents;
CREATE VIEW app.search_documents WITH (security_invoker = true) AS
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
WHERE n.user_id = (SELECT app.user_id()) AND (n.expires_at IS NULL OR n.expires_at > now());
ALTER VIEW app.search_documents OWNER TO datalayer_maint;
REVOKE ALL ON app.search_documents FROM PUBLIC;
ALTER TABLE audit_events DROP COLUMN search;
