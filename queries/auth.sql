-- The login path and single-use tokens, through the SECURITY DEFINER functions of
-- schema/0005_auth.sql (they work before a context exists and return only what is needed).

-- name: login_lookup :one
SELECT user_id, password_hash, status, failed_logins, locked_until, totp_enabled
FROM app.login_lookup(:email);

-- name: record_login :scalar
-- Returns locked_until after a failure (NULL when not locked). On success, new_hash replaces
-- the stored hash only while it still equals old_hash.
SELECT app.record_login(:user_id, :success, :old_hash, :new_hash);

-- name: set_password :scalar
SELECT app.set_password(:password_hash);

-- name: issue_user_token :scalar
-- Email verification or password reset for a live user by email; NULL when there is none.
SELECT app.issue_user_token(:kind, :email, :token_hash, make_interval(secs => :ttl_s));

-- name: issue_invitation :scalar
SELECT app.issue_invitation(:email, :role, :token_hash, make_interval(secs => :ttl_s));

-- name: consume_token :one
SELECT user_id, org_id, role FROM app.consume_token(:kind, :token_hash, :new_hash);

-- name: totp_store :scalar
SELECT app.totp_store(:secret, :recovery_codes);

-- name: totp_state :one
SELECT secret, last_step, enabled, recovery_codes FROM app.totp_state(:user_id);

-- name: totp_accept :scalar
SELECT app.totp_accept(:user_id, :step);

-- name: recovery_code_use :scalar
SELECT app.recovery_code_use(:user_id, :code_hash);
