-- Notifications: per-user, inside one organization (schema/0014_notifications.sql).
--
-- Creation goes through a CTE that draws the ids first and inserts from it: RETURNING
-- would have to pass the SELECT policy, which a writer notifying someone else does not.
-- :org_id is for maintenance (dl.system()); tenant sessions pass NULL and the policy
-- refuses any organization but the context's. With :notify, each new row is announced on
-- NOTIFY channel datalayer_notifications (delivered by PostgreSQL at COMMIT, never after a
-- rollback): ids, type, priority and time only, no title, message or data. created_at is
-- clock_timestamp(), so notifications created in one transaction list in creation order.

-- name: create :many
WITH n AS MATERIALIZED (
  SELECT coalesce(:org_id::uuid, app.org_id()) AS org_id, gen_random_uuid() AS id,
         :user_id::uuid AS user_id, clock_timestamp() AS created_at
), ins AS (
  INSERT INTO notifications (org_id, id, user_id, type, title, message, data, priority,
                             created_at, expires_at)
  SELECT n.org_id, n.id, n.user_id, :type, :title, :message, :data, :priority, n.created_at,
         :expires_at
  FROM n
)
SELECT n.org_id, n.id, n.user_id, n.created_at,
       CASE WHEN :notify::boolean THEN pg_notify('datalayer_notifications', json_build_object(
         'org_id', n.org_id, 'id', n.id, 'user_id', n.user_id, 'type', :type::text,
         'priority', :priority::text, 'created_at', n.created_at)::text) END AS notified
FROM n;

-- name: fan_out_team :many
-- One notification per member of a team, in one statement.
WITH n AS MATERIALIZED (
  SELECT tm.org_id, gen_random_uuid() AS id, tm.user_id, clock_timestamp() AS created_at
  FROM team_members tm
  WHERE tm.org_id = coalesce(:org_id::uuid, (SELECT app.org_id())) AND tm.team_id = :team_id
), ins AS (
  INSERT INTO notifications (org_id, id, user_id, type, title, message, data, priority,
                             created_at, expires_at)
  SELECT n.org_id, n.id, n.user_id, :type, :title, :message, :data, :priority, n.created_at,
         :expires_at
  FROM n
)
SELECT n.org_id, n.id, n.user_id, n.created_at,
       CASE WHEN :notify::boolean THEN pg_notify('datalayer_notifications', json_build_object(
         'org_id', n.org_id, 'id', n.id, 'user_id', n.user_id, 'type', :type::text,
         'priority', :priority::text, 'created_at', n.created_at)::text) END AS notified
FROM n;

-- name: fan_out_org :many
-- One notification per member of the organization, in one statement.
WITH n AS MATERIALIZED (
  SELECT m.org_id, gen_random_uuid() AS id, m.user_id, clock_timestamp() AS created_at
  FROM memberships m
  WHERE m.org_id = coalesce(:org_id::uuid, (SELECT app.org_id()))
), ins AS (
  INSERT INTO notifications (org_id, id, user_id, type, title, message, data, priority,
                             created_at, expires_at)
  SELECT n.org_id, n.id, n.user_id, :type, :title, :message, :data, :priority, n.created_at,
         :expires_at
  FROM n
)
SELECT n.org_id, n.id, n.user_id, n.created_at,
       CASE WHEN :notify::boolean THEN pg_notify('datalayer_notifications', json_build_object(
         'org_id', n.org_id, 'id', n.id, 'user_id', n.user_id, 'type', :type::text,
         'priority', :priority::text, 'created_at', n.created_at)::text) END AS notified
FROM n;

-- name: list :many
-- The context user's live (unexpired) notifications, newest first, keyset-paginated
-- (before = the last row's (created_at, id)), and their unread count, in one round trip.
-- Always one row at least: with no notification on the page, the item columns are NULL.
-- The count is a scalar sub-select over the partial unread index (a window count would
-- count the page, not the user's rows).
SELECT c.unread, p.org_id, p.id, p.user_id, p.type, p.title, p.message, p.data, p.priority,
       p.created_at, p.read_at, p.expires_at
FROM (SELECT count(*)::int AS unread
      FROM notifications u
      WHERE u.org_id = (SELECT app.org_id()) AND u.user_id = (SELECT app.user_id())
        AND u.read_at IS NULL AND (u.expires_at IS NULL OR u.expires_at > now())) c
LEFT JOIN LATERAL (
  SELECT n.org_id, n.id, n.user_id, n.type, n.title, n.message, n.data, n.priority,
         n.created_at, n.read_at, n.expires_at
  FROM notifications n
  WHERE n.org_id = (SELECT app.org_id()) AND n.user_id = (SELECT app.user_id())
    AND (n.created_at, n.id) < (:before_created_at, :before_id)
    AND (n.expires_at IS NULL OR n.expires_at > now())
    AND (NOT :unread_only::boolean OR n.read_at IS NULL)
  ORDER BY n.created_at DESC, n.id DESC
  LIMIT :limit
) p ON true
ORDER BY p.created_at DESC, p.id DESC;

-- name: get :one
-- One of the context user's notifications.
SELECT org_id, id, user_id, type, title, message, data, priority, created_at, read_at,
       expires_at
FROM notifications
WHERE org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id()) AND id = :id;

-- name: unread_count :scalar
SELECT count(*)::int FROM notifications
WHERE org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id())
  AND read_at IS NULL AND (expires_at IS NULL OR expires_at > now());

-- name: mark_read :execrows
-- Mark some of the context user's notifications read; the number newly marked.
UPDATE notifications SET read_at = now()
WHERE org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id())
  AND id = ANY (:ids::uuid[]) AND read_at IS NULL;

-- name: mark_all_read :execrows
UPDATE notifications SET read_at = now()
WHERE org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id()) AND read_at IS NULL;

-- name: delete :execrows
-- The context user dismisses one of their notifications.
DELETE FROM notifications
WHERE org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id()) AND id = :id;

-- name: delete_expired :execrows
-- Maintenance (dl.system()): one batch of expired notifications, across organizations.
DELETE FROM notifications
WHERE (org_id, id) IN (SELECT org_id, id FROM notifications
                       WHERE expires_at <= now()
                       ORDER BY expires_at
                       LIMIT :batch
                       FOR UPDATE SKIP LOCKED);
