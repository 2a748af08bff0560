-- depends: 0005_auth
-- Role-based permissions: which organization role may do which action on which kind of
-- resource. The matrix is code (reviewed here), not data: an IMMUTABLE function the planner
-- can fold, used by permission checks and available to policies of later tables.
--
--   owner   everything
--   admin   everything but deleting the organization
--   member  read everything; create/update/delete/execute workflows, executions,
--           credentials and webhooks; create and delete their own API keys
--   viewer  read everything but credentials and the audit trail
--   guest   read workflows and executions
CREATE FUNCTION app.role_allows(p_role text, p_resource text, p_action text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT CASE p_role
    WHEN 'owner' THEN true
    WHEN 'admin' THEN NOT (p_resource = 'organization' AND p_action = 'delete')
    WHEN 'member' THEN p_action = 'read'
      OR (p_resource IN ('workflows', 'executions', 'credentials', 'webhooks')
          AND p_action IN ('create', 'update', 'delete', 'execute'))
      OR (p_resource = 'api_keys' AND p_action IN ('create', 'delete'))
    WHEN 'viewer' THEN p_action = 'read' AND p_resource NOT IN ('credentials', 'audit')
    WHEN 'guest' THEN p_action = 'read' AND p_resource IN ('workflows', 'executions')
    ELSE false
  END
$$;
REVOKE ALL ON FUNCTION app.role_allows(text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.role_allows(text, text, text) TO datalayer_app, datalayer_maint;
