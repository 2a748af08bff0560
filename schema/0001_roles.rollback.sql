DO $$ BEGIN
  EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO PUBLIC', current_database());
END $$;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
  REVOKE SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON TABLES FROM datalayer_maint;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
  REVOKE USAGE, SELECT, UPDATE ON SEQUENCES FROM datalayer_maint;
REVOKE USAGE ON SCHEMA public FROM datalayer_app, datalayer_maint;

-- Drop the roles only when no other database still uses them.
DO $$
BEGIN
  DROP ROLE IF EXISTS datalayer_app;
  DROP ROLE IF EXISTS datalayer_maint;
EXCEPTION WHEN dependent_objects_still_exist THEN
  RAISE NOTICE 'datalayer roles are still used by another database; kept';
END
$$;
