-- depends: 0003_organizations
-- Identity: global user accounts, memberships (org, user, role), teams and team members.
--
-- users is global (a person belongs to several organizations), so it has no org_id. A
-- context sees its own user row and the rows of members of its organization, nothing
-- else. Secret columns (password hash, TOTP secret, recovery code hashes) are not
-- readable by datalayer_app at all (column privileges): only the SECURITY DEFINER
-- functions of the login path read them.

CREATE FUNCTION app.is_owner() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT app.can_write() AND app.role() = 'owner' $$;
GRANT EXECUTE ON FUNCTION app.is_owner() TO datalayer_app, datalayer_maint;

CREATE TABLE users (
  id                 uuid PRIMARY KEY,
  email              text NOT NULL
                     CONSTRAINT users_email_format
                     CHECK (email ~ '^[^@[:space:]]+@[^@[:space:]]+$' AND length(email) <= 320),
  -- Lookups compare this column, not lower(email): under RLS a qual calling a function that
  -- is not LEAKPROOF (lower is not) runs after the policy and cannot use an index, while
  -- `email_normalized = lower($1)` computes lower() on the parameter and is an index qual.
  email_normalized   text GENERATED ALWAYS AS (lower(email)) STORED,
  display_name       text NOT NULL DEFAULT ''
                     CONSTRAINT users_display_name_length CHECK (length(display_name) <= 200),
  first_name         text CONSTRAINT users_first_name_length CHECK (length(first_name) <= 100),
  last_name          text CONSTRAINT users_last_name_length CHECK (length(last_name) <= 100),
  preferences        jsonb NOT NULL DEFAULT '{}'
                     CONSTRAINT users_preferences_object CHECK (jsonb_typeof(preferences) = 'object'),
  subscription_tier  text NOT NULL DEFAULT 'free'
                     CONSTRAINT users_tier_known CHECK (subscription_tier IN ('free', 'pro', 'enterprise')),
  status             text NOT NULL DEFAULT 'active'
                     CONSTRAINT users_status_known CHECK (status IN ('active', 'suspended')),
  email_verified_at  timestamptz,
  password_hash      text,            -- secret: Argon2id PHC string
  failed_logins      integer NOT NULL DEFAULT 0 CONSTRAINT users_failed_logins_positive
                     CHECK (failed_logins >= 0),
  locked_until       timestamptz,
  last_login_at      timestamptz,
  totp_secret        bytea,           -- secret: Keyring ciphertext
  totp_enabled_at    timestamptz,
  totp_last_step     bigint,          -- replay protection: last accepted time step
  recovery_codes     text[],          -- secret: sha256 hex of each unused code
  created_at         timestamptz NOT NULL DEFAULT now(),
  updated_at         timestamptz NOT NULL DEFAULT now(),
  deleted_at         timestamptz
);
-- Email unique among live users, case-insensitive; a deleted account frees its address.
CREATE UNIQUE INDEX users_email_live_key ON users (email_normalized) WHERE deleted_at IS NULL;
CREATE TRIGGER users_touch BEFORE UPDATE ON users
  FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

CREATE TABLE memberships (
  org_id      uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  role        text NOT NULL DEFAULT 'member'
              CONSTRAINT memberships_role_known
              CHECK (role IN ('owner', 'admin', 'member', 'viewer', 'guest')),
  invited_by  uuid,
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, user_id)
);
-- "My organizations": a user reads their own memberships across organizations.
CREATE INDEX memberships_user_idx ON memberships (user_id, org_id);
CREATE TRIGGER memberships_touch BEFORE UPDATE ON memberships
  FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

CREATE TABLE teams (
  org_id       uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  id           uuid NOT NULL DEFAULT gen_random_uuid(),
  name         text NOT NULL CONSTRAINT teams_name_length CHECK (length(name) BETWEEN 1 AND 100),
  description  text NOT NULL DEFAULT ''
               CONSTRAINT teams_description_length CHECK (length(description) <= 2000),
  created_at   timestamptz NOT NULL DEFAULT now(),
  updated_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id)
);
CREATE UNIQUE INDEX teams_name_key ON teams (org_id, lower(name));
CREATE TRIGGER teams_touch BEFORE UPDATE ON teams
  FOR EACH ROW EXECUTE FUNCTION app.touch_updated_at();

CREATE TABLE team_members (
  org_id      uuid NOT NULL,
  team_id     uuid NOT NULL,
  user_id     uuid NOT NULL,
  team_role   text NOT NULL DEFAULT 'member'
              CONSTRAINT team_members_role_known CHECK (team_role IN ('lead', 'member')),
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, team_id, user_id),
  FOREIGN KEY (org_id, team_id) REFERENCES teams (org_id, id) ON DELETE CASCADE,
  -- a team member must be a member of the organization; leaving it leaves its teams
  FOREIGN KEY (org_id, user_id) REFERENCES memberships (org_id, user_id) ON DELETE CASCADE
);
CREATE INDEX team_members_user_idx ON team_members (org_id, user_id);

-- Row-level security -------------------------------------------------------------------------
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
ALTER TABLE memberships ENABLE ROW LEVEL SECURITY;
ALTER TABLE memberships FORCE ROW LEVEL SECURITY;
ALTER TABLE teams ENABLE ROW LEVEL SECURITY;
ALTER TABLE teams FORCE ROW LEVEL SECURITY;
ALTER TABLE team_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE team_members FORCE ROW LEVEL SECURITY;

-- users: yourself, and the members of the context's organization.
-- EXISTS probes one membership per candidate row (an IN list would hash every member of
-- the organization on each statement).
CREATE POLICY users_select ON users FOR SELECT
  USING (id = (SELECT app.user_id())
         OR EXISTS (SELECT 1 FROM memberships m
                    WHERE m.org_id = (SELECT app.org_id()) AND m.user_id = users.id));
-- An account is created by a context that carries its new id (registration), and
-- changed or deleted only by itself.
CREATE POLICY users_insert ON users FOR INSERT
  WITH CHECK (id = (SELECT app.user_id()) AND NOT (SELECT app.read_only()));
CREATE POLICY users_update ON users FOR UPDATE
  USING (id = (SELECT app.user_id()) AND NOT (SELECT app.read_only()))
  WITH CHECK (id = (SELECT app.user_id()));
CREATE POLICY users_delete ON users FOR DELETE
  USING (id = (SELECT app.user_id()) AND NOT (SELECT app.read_only()));

-- memberships: the organization's list, plus your own memberships elsewhere (to choose an
-- organization). Only admins change them; only owners grant or hold ownership changes.
CREATE POLICY memberships_select ON memberships FOR SELECT
  USING (org_id = (SELECT app.org_id()) OR user_id = (SELECT app.user_id()));
-- Nobody is added to an organization without consent: a context inserts only its own
-- membership (the founder of a new organization); everyone else joins by accepting an
-- invitation (app.consume_token). This also keeps the global users table from being an
-- oracle or a directory for other organizations' admins.
CREATE POLICY memberships_insert ON memberships FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id())
              AND (SELECT app.is_admin())
              AND (role <> 'owner' OR (SELECT app.is_owner())));
CREATE POLICY memberships_update ON memberships FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin())
         AND (role <> 'owner' OR (SELECT app.is_owner())))
  WITH CHECK (org_id = (SELECT app.org_id())
              AND (role <> 'owner' OR (SELECT app.is_owner())));
-- Admins remove others; anyone may leave (the last-owner guard still applies).
CREATE POLICY memberships_delete ON memberships FOR DELETE
  USING (org_id = (SELECT app.org_id())
         AND (((SELECT app.is_admin()) AND (role <> 'owner' OR (SELECT app.is_owner())))
              OR (user_id = (SELECT app.user_id()) AND NOT (SELECT app.read_only()))));

CREATE POLICY teams_select ON teams FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY teams_write ON teams FOR ALL
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()))
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()));

CREATE POLICY team_members_select ON team_members FOR SELECT
  USING (org_id = (SELECT app.org_id()));
CREATE POLICY team_members_write ON team_members FOR ALL
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()))
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.is_admin()));

-- An organization always keeps an owner (unless it is being deleted as a whole).
CREATE FUNCTION app.memberships_keep_an_owner() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF OLD.role = 'owner'
     AND EXISTS (SELECT 1 FROM organizations o WHERE o.id = OLD.org_id)
     AND NOT EXISTS (SELECT 1 FROM memberships m
                     WHERE m.org_id = OLD.org_id AND m.role = 'owner'
                       AND m.user_id <> OLD.user_id) THEN
    RAISE EXCEPTION 'an organization must keep at least one owner; make another member owner first'
      USING ERRCODE = 'check_violation', CONSTRAINT = 'memberships_last_owner';
  END IF;
  RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION app.memberships_keep_an_owner() FROM PUBLIC;
CREATE TRIGGER memberships_keep_an_owner
  AFTER UPDATE OF role OR DELETE ON memberships
  FOR EACH ROW WHEN (OLD.role = 'owner')
  EXECUTE FUNCTION app.memberships_keep_an_owner();

-- Privileges: secrets are not selectable by the run-time role -------------------------------
GRANT SELECT (id, email, email_normalized, display_name, first_name, last_name, preferences, subscription_tier,
              status, email_verified_at, failed_logins, locked_until, last_login_at,
              totp_enabled_at, created_at, updated_at, deleted_at),
      INSERT (id, email, display_name, first_name, last_name, preferences, subscription_tier,
              password_hash),
      UPDATE (email, display_name, first_name, last_name, preferences, subscription_tier,
              deleted_at),
      DELETE
  ON users TO datalayer_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON memberships, teams, team_members TO datalayer_app;
