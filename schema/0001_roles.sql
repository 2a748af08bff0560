-- Run-time and maintenance roles. Roles are cluster-wide, so creation is idempotent:
-- several databases (tests, tenants on one server) share them.
--
-- datalayer_app:   every request session runs as it. NOLOGIN, NOBYPASSRLS, owns nothing.
-- datalayer_maint: dl.system() only, for cross-tenant maintenance. BYPASSRLS.
-- The login role of DATABASE_URL is granted both by the migration runner and switches
-- per session (SET ROLE is checked against the session user, not the current role).
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'datalayer_app') THEN
    CREATE ROLE datalayer_app NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'datalayer_maint') THEN
    CREATE ROLE datalayer_maint NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE BYPASSRLS;
  END IF;
END
$$;

-- Make sure an existing role was not loosened by hand.
ALTER ROLE datalayer_app NOSUPERUSER NOBYPASSRLS NOLOGIN;

GRANT USAGE ON SCHEMA public TO datalayer_app, datalayer_maint;

-- The maintenance role may touch every table the migrations create from now on;
-- datalayer_app gets explicit grants table by table, in each migration.
ALTER DEFAULT PRIVILEGES IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON TABLES TO datalayer_maint;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
  GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO datalayer_maint;

-- Sessions never need temporary tables; without them a caller cannot shadow a table that a
-- function resolves through its search_path.
DO $$ BEGIN
  EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
END $$;
