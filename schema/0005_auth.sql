-- depends: 0004_identity
-- Account security: API keys, single-use auth tokens, and the login path.
--
-- Secrets are stored only as hashes (API keys, tokens: sha256; passwords: Argon2id). The
-- lookups that must work before a context exists (login by email, API-key verification,
-- token consumption) are SECURITY DEFINER functions owned by the maintenance role, with a
-- pinned search_path ending in pg_temp (else a caller's temp table named like ours would be
-- searched first), not executable by PUBLIC, each returning only what its caller needs.
-- The login-path functions refuse to run inside a tenant context: they belong to the step
-- before a context exists, so a tenant-scoped session (or a bug in one) cannot reach them.

CREATE FUNCTION app.require_no_tenant() RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF app.org_id() IS NOT NULL THEN
    RAISE EXCEPTION 'the login path runs without an organization context; open the session with Context(None)'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
END $$;
REVOKE ALL ON FUNCTION app.require_no_tenant() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.require_no_tenant() TO datalayer_app, datalayer_maint;

CREATE TABLE api_keys (
  org_id        uuid NOT NULL,
  id            uuid NOT NULL DEFAULT gen_random_uuid(),
  user_id       uuid NOT NULL,
  name          text NOT NULL CONSTRAINT api_keys_name_length CHECK (length(name) BETWEEN 1 AND 100),
  prefix        text NOT NULL CONSTRAINT api_keys_prefix_format CHECK (prefix ~ '^dl_[a-z]+_$'),
  key_hash      bytea NOT NULL CONSTRAINT api_keys_hash_length CHECK (length(key_hash) = 32),
  last4         text NOT NULL CONSTRAINT api_keys_last4_length CHECK (length(last4) = 4),
  scopes        text[] NOT NULL DEFAULT '{}',
  expires_at    timestamptz,
  last_used_at  timestamptz,
  revoked_at    timestamptz,
  created_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, user_id) REFERENCES memberships (org_id, user_id) ON DELETE CASCADE
);
-- Verification is one lookup by hash across organizations. Not UNIQUE on purpose: a unique
-- key not led by org_id would be a cross-tenant oracle; 256-bit random keys do not collide.
CREATE INDEX api_keys_hash_idx ON api_keys (key_hash);
CREATE INDEX api_keys_user_idx ON api_keys (org_id, user_id, created_at DESC);

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_keys FORCE ROW LEVEL SECURITY;
-- Members see and manage their own keys; admins see and revoke everyone's.
CREATE POLICY api_keys_select ON api_keys FOR SELECT
  USING (org_id = (SELECT app.org_id())
         AND (user_id = (SELECT app.user_id()) OR (SELECT app.is_admin())));
CREATE POLICY api_keys_insert ON api_keys FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id())
              AND (SELECT app.can_write()));
CREATE POLICY api_keys_update ON api_keys FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
         AND (user_id = (SELECT app.user_id()) OR (SELECT app.is_admin())))
  WITH CHECK (org_id = (SELECT app.org_id()));
CREATE POLICY api_keys_delete ON api_keys FOR DELETE
  USING (org_id = (SELECT app.org_id()) AND (SELECT app.can_write())
         AND (user_id = (SELECT app.user_id()) OR (SELECT app.is_admin())));
GRANT SELECT (org_id, id, user_id, name, prefix, last4, scopes, expires_at, last_used_at,
              revoked_at, created_at),
      INSERT (org_id, id, user_id, name, prefix, key_hash, last4, scopes, expires_at),
      UPDATE (name, revoked_at),
      DELETE
  ON api_keys TO datalayer_app;

-- Auth tokens: email verification, password reset, invitation. Reached only through the
-- functions below; the run-time role has no privileges on the table.
CREATE TABLE auth_tokens (
  id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  kind            text NOT NULL CONSTRAINT auth_tokens_kind_known
                  CHECK (kind IN ('email_verification', 'password_reset', 'invitation')),
  token_hash      bytea NOT NULL CONSTRAINT auth_tokens_hash_length CHECK (length(token_hash) = 32),
  user_id         uuid REFERENCES users (id) ON DELETE CASCADE,
  org_id          uuid REFERENCES organizations (id) ON DELETE CASCADE,
  email           text,
  role            text CONSTRAINT auth_tokens_role_known
                  CHECK (role IN ('admin', 'member', 'viewer', 'guest')),
  created_by      uuid,
  expires_at      timestamptz NOT NULL,
  consumed_at     timestamptz,
  invalidated_at  timestamptz,
  created_at      timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT auth_tokens_shape CHECK (
    (kind = 'invitation' AND org_id IS NOT NULL AND email IS NOT NULL AND role IS NOT NULL)
    OR (kind <> 'invitation' AND user_id IS NOT NULL))
);
CREATE INDEX auth_tokens_hash_idx ON auth_tokens (token_hash);
-- At most one live token per user and kind (per organization and address for invitations):
-- issuing a new one invalidates the previous one in the same transaction.
CREATE UNIQUE INDEX auth_tokens_live_user_key ON auth_tokens (user_id, kind)
  WHERE consumed_at IS NULL AND invalidated_at IS NULL AND kind <> 'invitation';
CREATE UNIQUE INDEX auth_tokens_live_invitation_key ON auth_tokens (org_id, lower(email))
  WHERE consumed_at IS NULL AND invalidated_at IS NULL AND kind = 'invitation';
ALTER TABLE auth_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE auth_tokens FORCE ROW LEVEL SECURITY;
CREATE POLICY auth_tokens_none ON auth_tokens USING (false);

-- The login path ----------------------------------------------------------------------------

-- What login needs to decide, for one live account by email (case-insensitive).
CREATE FUNCTION app.login_lookup(p_email text)
RETURNS TABLE (user_id uuid, password_hash text, status text, failed_logins integer,
               locked_until timestamptz, totp_enabled boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
  PERFORM app.require_no_tenant();
  RETURN QUERY
  SELECT u.id, u.password_hash, u.status, u.failed_logins, u.locked_until,
         u.totp_enabled_at IS NOT NULL
  FROM users u
  WHERE u.email_normalized = lower(p_email) AND u.deleted_at IS NULL;
END $$;

-- Record a login attempt. Failures lock the account with exponential backoff (1 s after the
-- 5th failure, doubling, capped at 15 minutes); attempts while locked are refused by the
-- caller and not counted, so an attacker cannot extend a lock, and a lock always expires.
-- Success resets the counter and, when p_new_hash is given, replaces the hash only if it is
-- still p_old_hash (a password changed meanwhile is not overwritten by a stale upgrade).
-- Returns the new locked_until.
CREATE FUNCTION app.record_login(p_user_id uuid, p_success boolean, p_old_hash text,
                                 p_new_hash text)
RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_locked timestamptz;
BEGIN
  PERFORM app.require_no_tenant();
  IF p_success THEN
    UPDATE users SET failed_logins = 0, locked_until = NULL, last_login_at = now(),
                     password_hash = CASE WHEN p_new_hash IS NOT NULL
                                           AND password_hash = p_old_hash
                                          THEN p_new_hash ELSE password_hash END
    WHERE id = p_user_id AND deleted_at IS NULL;
    RETURN NULL;
  END IF;
  UPDATE users
  SET failed_logins = failed_logins + 1,
      locked_until = CASE WHEN failed_logins + 1 >= 5
                          THEN now() + least(interval '15 minutes',
                                             interval '1 second' * power(2, least(failed_logins + 1 - 5, 20)))
                          ELSE locked_until END
  WHERE id = p_user_id AND deleted_at IS NULL
    AND (locked_until IS NULL OR locked_until <= now())
  RETURNING locked_until INTO v_locked;
  RETURN v_locked;
END $$;

-- Set or replace the context user's password hash (self only).
CREATE FUNCTION app.set_password(p_hash text)
RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  UPDATE users SET password_hash = p_hash, failed_logins = 0, locked_until = NULL
  WHERE id = app.user_id() AND deleted_at IS NULL AND NOT app.read_only()
  RETURNING true
$$;

-- 2FA: store the encrypted secret and recovery code hashes for the context user (enabled
-- once a first code is verified), read them back for verification, and record the step.
CREATE FUNCTION app.totp_store(p_secret bytea, p_recovery text[])
RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  UPDATE users SET totp_secret = p_secret, recovery_codes = p_recovery,
                   totp_enabled_at = NULL, totp_last_step = NULL
  WHERE id = app.user_id() AND deleted_at IS NULL AND NOT app.read_only()
  RETURNING true
$$;

CREATE FUNCTION app.totp_state(p_user_id uuid)
RETURNS TABLE (secret bytea, last_step bigint, enabled boolean, recovery_codes text[])
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
  PERFORM app.require_no_tenant();
  RETURN QUERY
  SELECT u.totp_secret, u.totp_last_step, u.totp_enabled_at IS NOT NULL, u.recovery_codes
  FROM users u WHERE u.id = p_user_id AND u.deleted_at IS NULL;
END $$;

-- Accept a verified step only if it is newer than the last one (replay protection under
-- concurrency: the row lock serializes two requests with the same code) and within two
-- steps of now (a caller cannot burn future steps).
CREATE FUNCTION app.totp_accept(p_user_id uuid, p_step bigint)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
  PERFORM app.require_no_tenant();
  IF abs(p_step - floor(extract(epoch FROM clock_timestamp()) / 30)) > 2 THEN
    RETURN false;
  END IF;
  UPDATE users SET totp_last_step = p_step, totp_enabled_at = coalesce(totp_enabled_at, now())
  WHERE id = p_user_id AND (totp_last_step IS NULL OR totp_last_step < p_step);
  RETURN FOUND;
END $$;

-- Use a recovery code (by hash) once.
CREATE FUNCTION app.recovery_code_use(p_user_id uuid, p_code_hash text)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
BEGIN
  PERFORM app.require_no_tenant();
  UPDATE users SET recovery_codes = array_remove(recovery_codes, p_code_hash)
  WHERE id = p_user_id AND p_code_hash = ANY (recovery_codes);
  RETURN FOUND;
END $$;

-- API keys: one indexed lookup by hash that also records last use (at most once a minute,
-- so verification is not a write per request, and never inside a read-only transaction,
-- where it would fail). Returns the key's org, user, role, scopes.
CREATE FUNCTION app.verify_api_key(p_hash bytea)
RETURNS TABLE (org_id uuid, key_id uuid, user_id uuid, role text, scopes text[])
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  k record;
BEGIN
  SELECT a.org_id, a.id, a.user_id, a.scopes, a.last_used_at, m.role INTO k
  FROM api_keys a
  JOIN memberships m ON m.org_id = a.org_id AND m.user_id = a.user_id
  JOIN organizations o ON o.id = a.org_id AND o.deleted_at IS NULL
  JOIN users u ON u.id = a.user_id AND u.deleted_at IS NULL AND u.status = 'active'
  WHERE a.key_hash = p_hash AND a.revoked_at IS NULL
    AND (a.expires_at IS NULL OR a.expires_at > now());
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute')
     AND NOT current_setting('transaction_read_only')::boolean THEN
    UPDATE api_keys a SET last_used_at = now() WHERE a.org_id = k.org_id AND a.id = k.id;
  END IF;
  RETURN QUERY SELECT k.org_id, k.id, k.user_id, k.role, k.scopes;
END $$;

-- Tokens: issue (invalidating the previous live one of the same kind) and consume once.
-- Email verification / password reset: for a live user by email (returns NULL when there is
-- no such user, so callers answer the same either way).
CREATE FUNCTION app.issue_user_token(p_kind text, p_email text, p_hash bytea, p_ttl interval)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_user uuid;
BEGIN
  PERFORM app.require_no_tenant();
  IF p_kind NOT IN ('email_verification', 'password_reset') THEN
    RAISE EXCEPTION 'unknown token kind for a user token' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT id INTO v_user FROM users
  WHERE email_normalized = lower(p_email) AND deleted_at IS NULL AND status = 'active';
  IF v_user IS NULL THEN
    RETURN NULL;
  END IF;
  UPDATE auth_tokens SET invalidated_at = now()
  WHERE user_id = v_user AND kind = p_kind AND consumed_at IS NULL AND invalidated_at IS NULL;
  INSERT INTO auth_tokens (kind, token_hash, user_id, expires_at)
  VALUES (p_kind, p_hash, v_user, now() + p_ttl);
  RETURN v_user;
END $$;

-- Invitation: issued by an admin of the context organization.
CREATE FUNCTION app.issue_invitation(p_email text, p_role text, p_hash bytea, p_ttl interval)
RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  v_id uuid;
BEGIN
  IF app.org_id() IS NULL OR NOT app.is_admin() THEN
    RAISE EXCEPTION 'only an organization admin may invite' USING ERRCODE = 'insufficient_privilege';
  END IF;
  UPDATE auth_tokens SET invalidated_at = now()
  WHERE org_id = app.org_id() AND lower(email) = lower(p_email) AND kind = 'invitation'
    AND consumed_at IS NULL AND invalidated_at IS NULL;
  INSERT INTO auth_tokens (kind, token_hash, org_id, email, role, created_by, expires_at)
  VALUES ('invitation', p_hash, app.org_id(), p_email, p_role, app.user_id(), now() + p_ttl)
  RETURNING id INTO v_id;
  RETURN v_id;
END $$;

-- Consume a live, unexpired token of p_kind once and apply its effect:
--   email_verification: marks the user's email verified;
--   password_reset: sets p_new_hash as the password and clears any lock;
--   invitation: adds the context user (whose email must match) to the organization.
-- Returns the user and organization concerned; no row when the token is unknown, used,
-- superseded or expired.
CREATE FUNCTION app.consume_token(p_kind text, p_hash bytea, p_new_hash text DEFAULT NULL)
RETURNS TABLE (user_id uuid, org_id uuid, role text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
  t auth_tokens%ROWTYPE;
  v_user uuid;
BEGIN
  PERFORM app.require_no_tenant();
  UPDATE auth_tokens a SET consumed_at = now()
  WHERE a.token_hash = p_hash AND a.kind = p_kind AND a.consumed_at IS NULL
    AND a.invalidated_at IS NULL AND a.expires_at > now()
  RETURNING a.* INTO t;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF p_kind = 'email_verification' THEN
    UPDATE users SET email_verified_at = now() WHERE id = t.user_id;
    v_user := t.user_id;
  ELSIF p_kind = 'password_reset' THEN
    IF p_new_hash IS NULL THEN
      RAISE EXCEPTION 'a password reset needs the new password hash'
        USING ERRCODE = 'null_value_not_allowed';
    END IF;
    UPDATE users SET password_hash = p_new_hash, failed_logins = 0, locked_until = NULL
    WHERE id = t.user_id;
    v_user := t.user_id;
  ELSE
    SELECT u.id INTO v_user FROM users u
    WHERE u.id = app.user_id() AND u.email_normalized = lower(t.email) AND u.deleted_at IS NULL;
    IF v_user IS NULL THEN
      RAISE EXCEPTION 'this invitation is for another email address'
        USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO memberships (org_id, user_id, role, invited_by)
    VALUES (t.org_id, v_user, t.role, t.created_by)
    ON CONFLICT ON CONSTRAINT memberships_pkey DO NOTHING;
  END IF;
  RETURN QUERY SELECT v_user, t.org_id, t.role;
END $$;

DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY[
    'app.login_lookup(text)', 'app.record_login(uuid, boolean, text, text)', 'app.set_password(text)',
    'app.totp_store(bytea, text[])', 'app.totp_state(uuid)', 'app.totp_accept(uuid, bigint)',
    'app.recovery_code_use(uuid, text)', 'app.verify_api_key(bytea)',
    'app.issue_user_token(text, text, bytea, interval)',
    'app.issue_invitation(text, text, bytea, interval)', 'app.consume_token(text, bytea, text)']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO datalayer_app', f);
  END LOOP;
END $$;
