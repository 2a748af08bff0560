-- Web sessions, PostgreSQL store (schema/0011_web_sessions.sql): reached only through the
-- SECURITY DEFINER functions, outside any tenant session, by session-id hash (sha256).

-- name: create :one
SELECT created_at, expires_at, max_expires_at
FROM app.web_session_create(:id_hash, :user_id, :data, make_interval(secs => :idle_s),
                            make_interval(secs => :max_age_s));

-- name: get :one
-- The live session; with touch, its expiry slides (see app.web_session_get).
SELECT user_id, data, created_at, expires_at, max_expires_at
FROM app.web_session_get(:id_hash, :touch);

-- name: revoke :scalar
-- True when a live session was revoked.
SELECT app.web_session_revoke(:id_hash);

-- name: revoke_user :scalar
-- Revoke every session of a user; returns how many were live.
SELECT app.web_session_revoke_user(:user_id);

-- name: sweep :execrows
-- Delete expired sessions (maintenance, through dl.system()).
DELETE FROM web_sessions WHERE expires_at <= now();
