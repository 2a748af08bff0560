-- depends: 0002_app_context
-- The tenant root. An organization's id *is* the org_id of every tenant row. A session
-- sees only its own organization; it creates one by opening a session whose context
-- carries the new id with role owner (there is no cross-tenant insert).
CREATE TABLE organizations (
  id          uuid PRIMARY KEY,
  slug        text NOT NULL
              CONSTRAINT organizations_slug_format
              CHECK (slug ~ '^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$'),
  name        text NOT NULL
              CONSTRAINT organizations_name_length CHECK (length(name) BETWEEN 1 AND 200),
  plan        text NOT NULL DEFAULT 'free'
              CONSTRAINT organizations_plan_known
              CHECK (plan IN ('free', 'starter', 'pro', 'enterprise')),
  settings    jsonb NOT NULL DEFAULT '{}'
              CONSTRAINT organizations_settings_object CHECK (jsonb_typeof(settings) = 'object'),
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  deleted_at  timestamptz
);
-- Slugs are a global namespace (they appear in URLs), unique among all organizations,
-- live or deleted, so a slug never changes hands.
CREATE UNIQUE INDEX organizations_slug_key ON organizations (slug);

ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
ALTER TABLE organizations FORCE ROW LEVEL SECURITY;

CREATE POLICY organizations_select ON organizations FOR SELECT
  USING (id = (SELECT app.org_id()));
CREATE POLICY organizations_insert ON organizations FOR INSERT
  WITH CHECK (id = (SELECT app.org_id()) AND (SELECT app.can_write())
              AND (SELECT app.role()) = 'owner');
CREATE POLICY organizations_update ON organizations FOR UPDATE
  USING (id = (SELECT app.org_id()) AND (SELECT app.is_admin()))
  WITH CHECK (id = (SELECT app.org_id()));
CREATE POLICY organizations_delete ON organizations FOR DELETE
  USING (id = (SELECT app.org_id()) AND (SELECT app.can_write())
         AND (SELECT app.role()) = 'owner');

GRANT SELECT, INSERT, UPDATE, DELETE ON organizations TO datalayer_app;

-- Shared by every table with an updated_at column.
CREATE FUNCTION app.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION app.touch_updated_at() FROM PUBLIC;

CREATE TRIGGER organizations_touch BEFORE UPDATE ON organizations
  FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

-- RLS cannot tell columns apart: admins may update the row, but only an owner may
-- delete or restore the organization (a change of deleted_at).
CREATE FUNCTION app.organizations_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF NEW.deleted_at IS DISTINCT FROM OLD.deleted_at
     AND app.org_id() IS NOT NULL AND app.role() IS DISTINCT FROM 'owner' THEN
    RAISE EXCEPTION 'only an owner may delete or restore an organization'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END $$;
REVOKE ALL ON FUNCTION app.organizations_guard() FROM PUBLIC;

CREATE TRIGGER organizations_guard BEFORE UPDATE OF deleted_at ON organizations
  FOR EACH ROW EXECUTE FUNCTION app.organizations_guard();
