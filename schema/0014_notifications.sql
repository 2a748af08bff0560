-- depends: 0004_identity
-- Notifications: per-user messages inside one organization, with read state and expiry.
--
-- Who sees what (RLS): a user reads, marks read and deletes only their own notifications
-- in the context's organization (user_id = app.user_id(), org_id = app.org_id()); viewers
-- and guests included (marking read is self-service), a read-only context excluded.
-- Who may notify whom: any writer of the organization (owner, admin, member) may create a
-- notification for any member of that organization, one at a time or fanned out to a team
-- or the whole organization; the foreign key to memberships keeps recipients inside the
-- organization (and removes a member's notifications when they leave). Writers cannot read
-- back what they sent to others. Maintenance (dl.system()) creates for any organization
-- and deletes expired rows in batches.

CREATE TABLE notifications (
  org_id      uuid NOT NULL,
  id          uuid NOT NULL DEFAULT gen_random_uuid(),
  user_id     uuid NOT NULL,
  type        text NOT NULL
              CONSTRAINT notifications_type_format CHECK (type ~ '^[a-z0-9][a-z0-9_.:-]{0,99}$'),
  title       text NOT NULL
              CONSTRAINT notifications_title_length CHECK (length(title) BETWEEN 1 AND 200),
  message     text NOT NULL DEFAULT ''
              CONSTRAINT notifications_message_length CHECK (length(message) <= 4000),
  data        jsonb NOT NULL DEFAULT '{}'
              CONSTRAINT notifications_data_object
              CHECK (jsonb_typeof(data) = 'object' AND pg_column_size(data) <= 16384),
  priority    text NOT NULL DEFAULT 'normal'
              CONSTRAINT notifications_priority_known
              CHECK (priority IN ('low', 'normal', 'high', 'urgent')),
  created_at  timestamptz NOT NULL DEFAULT now(),
  read_at     timestamptz,
  expires_at  timestamptz,
  PRIMARY KEY (org_id, id),
  FOREIGN KEY (org_id, user_id) REFERENCES memberships (org_id, user_id) ON DELETE CASCADE
);
-- A user's list, newest first (keyset on created_at, id): the policy's (org_id, user_id)
-- equalities are index quals, the order comes from the index.
CREATE INDEX notifications_user_list_idx
  ON notifications (org_id, user_id, created_at DESC, id DESC);
-- The unread count: index-only over the unread rows of one user (expiry checked in the index).
CREATE INDEX notifications_user_unread_idx
  ON notifications (org_id, user_id, expires_at) WHERE read_at IS NULL;
-- Expired-row deletion (maintenance, across organizations).
CREATE INDEX notifications_expires_idx
  ON notifications (expires_at) WHERE expires_at IS NOT NULL;

ALTER TABLE notifications ENABLE ROW LEVEL SECURITY;
ALTER TABLE notifications FORCE ROW LEVEL SECURITY;

CREATE POLICY notifications_select ON notifications FOR SELECT
  USING (org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id()));
CREATE POLICY notifications_insert ON notifications FOR INSERT
  WITH CHECK (org_id = (SELECT app.org_id()) AND (SELECT app.can_write()));
CREATE POLICY notifications_update ON notifications FOR UPDATE
  USING (org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id())
         AND NOT (SELECT app.read_only()))
  WITH CHECK (org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id()));
CREATE POLICY notifications_delete ON notifications FOR DELETE
  USING (org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id())
         AND NOT (SELECT app.read_only()));

-- Only the read state changes after creation.
GRANT SELECT, INSERT, DELETE ON notifications TO datalayer_app;
GRANT UPDATE (read_at) ON notifications TO datalayer_app;
