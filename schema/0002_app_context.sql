-- depends: 0001_roles
-- Schema `app`: the context helpers every policy calls. They read transaction- or
-- session-level settings written by the session machinery (datalayer/core/context.py).
-- '' means unset: no context, no rows. Policies call them wrapped in a sub-select,
-- `(SELECT app.org_id())`, so they run once per statement as an InitPlan.
CREATE SCHEMA app;
REVOKE ALL ON SCHEMA app FROM PUBLIC;
GRANT USAGE ON SCHEMA app TO datalayer_app, datalayer_maint;

CREATE FUNCTION app.org_id() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT nullif(current_setting('app.org_id', true), '')::uuid $$;

CREATE FUNCTION app.user_id() RETURNS uuid
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT nullif(current_setting('app.user_id', true), '')::uuid $$;

-- owner | admin | member | viewer | guest; NULL without context.
CREATE FUNCTION app.role() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT nullif(current_setting('app.role', true), '') $$;

-- Missing or unreadable means read-only: deny by default.
CREATE FUNCTION app.read_only() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT coalesce(nullif(current_setting('app.read_only', true), '')::boolean, true) $$;

-- May the context write at all? Viewers and guests never; a read-only context never.
CREATE FUNCTION app.can_write() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT app.org_id() IS NOT NULL AND NOT app.read_only()
             AND app.role() IN ('owner', 'admin', 'member') $$;

-- Is the context an organization administrator (owner or admin)?
CREATE FUNCTION app.is_admin() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT app.can_write() AND app.role() IN ('owner', 'admin') $$;

CREATE FUNCTION app.request_id() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT nullif(current_setting('app.request_id', true), '') $$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA app FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA app TO datalayer_app, datalayer_maint;
