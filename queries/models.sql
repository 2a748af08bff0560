-- DigiTwin profile, subscription usage and personal AI models (schema/0022_digitwin.sql).
-- Every statement is bounded by RLS to the context user's own rows in the context
-- organization.

-- name: get_profile :one
-- The context user's twin profile.
SELECT id, display_name, subscription_tier, personality_traits, preferences,
       conversation_preferences
FROM users
WHERE id = app.user_id();

-- name: set_profile :one
-- Change the context user's personality traits and/or conversation preferences (NULL keeps).
UPDATE users
SET personality_traits = coalesce(:personality_traits::text[], personality_traits),
    conversation_preferences = coalesce(:conversation_preferences::jsonb,
                                        conversation_preferences)
WHERE id = app.user_id()
RETURNING id, display_name, subscription_tier, personality_traits, preferences,
          conversation_preferences;

-- name: usage :one
-- The context user's tier, its limits (NULL: unlimited) and what is used of them.
SELECT tier, max_models, max_documents, max_monthly_turns, models, documents, month_turns,
       total_turns
FROM app.twin_usage();

-- name: create :one
-- A new model of the context user (counts against the tier's model limit).
INSERT INTO twin_models (org_id, user_id, kind, name, provider, storage_uri, status,
                         quality_metrics, training_params)
VALUES (app.org_id(), app.user_id(), :kind, :name, :provider, :storage_uri, :status,
        coalesce(:quality_metrics::jsonb, '{}'), coalesce(:training_params::jsonb, '{}'))
RETURNING org_id, id, user_id, kind, name, provider, storage_uri, status, quality_metrics,
          training_params, error, is_active, training_started_at, ready_at, activated_at,
          created_at, updated_at, deleted_at;

-- name: get :one
SELECT org_id, id, user_id, kind, name, provider, storage_uri, status, quality_metrics,
       training_params, error, is_active, training_started_at, ready_at, activated_at,
       created_at, updated_at, deleted_at
FROM twin_models
WHERE org_id = app.org_id() AND id = :id;

-- name: list :many
-- The context user's live models (of one kind when :kind is given), newest first.
SELECT org_id, id, user_id, kind, name, provider, storage_uri, status, quality_metrics,
       training_params, error, is_active, training_started_at, ready_at, activated_at,
       created_at, updated_at, deleted_at
FROM twin_models
WHERE org_id = app.org_id() AND user_id = app.user_id() AND deleted_at IS NULL
  AND (:kind::text IS NULL OR kind = :kind::text)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: active :one
-- The context user's active model of a kind.
SELECT org_id, id, user_id, kind, name, provider, storage_uri, status, quality_metrics,
       training_params, error, is_active, training_started_at, ready_at, activated_at,
       created_at, updated_at, deleted_at
FROM twin_models
WHERE org_id = app.org_id() AND user_id = app.user_id() AND kind = :kind AND is_active;

-- name: set_status :one
-- Move a model along uploading -> training -> ready | failed (the trigger refuses other
-- moves and stamps the times); metrics and error are replaced when given.
UPDATE twin_models
SET status = :status,
    quality_metrics = coalesce(:quality_metrics::jsonb, quality_metrics),
    error = :error
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL
RETURNING org_id, id, user_id, kind, name, provider, storage_uri, status, quality_metrics,
          training_params, error, is_active, training_started_at, ready_at, activated_at,
          created_at, updated_at, deleted_at;

-- name: activate :one
-- Make a ready model the active one of its kind, deactivating the previous one, in one call
-- (app.twin_activate_model). No row when it is not the caller's, not ready or deleted.
SELECT org_id, id, user_id, kind, name, provider, storage_uri, status, quality_metrics,
       training_params, error, is_active, training_started_at, ready_at, activated_at,
       created_at, updated_at, deleted_at
FROM app.twin_activate_model(:id);

-- name: deactivate :one
UPDATE twin_models SET is_active = false
WHERE org_id = app.org_id() AND id = :id AND is_active
RETURNING org_id, id, user_id, kind, name, provider, storage_uri, status, quality_metrics,
          training_params, error, is_active, training_started_at, ready_at, activated_at,
          created_at, updated_at, deleted_at;

-- name: soft_delete :one
-- Delete a model softly (it stops being active); restore brings it back.
UPDATE twin_models SET deleted_at = now(), is_active = false
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL
RETURNING org_id, id, user_id, kind, name, provider, storage_uri, status, quality_metrics,
          training_params, error, is_active, training_started_at, ready_at, activated_at,
          created_at, updated_at, deleted_at;

-- name: restore :one
-- Undelete a model (counts against the model limit again).
UPDATE twin_models SET deleted_at = NULL
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NOT NULL
RETURNING org_id, id, user_id, kind, name, provider, storage_uri, status, quality_metrics,
          training_params, error, is_active, training_started_at, ready_at, activated_at,
          created_at, updated_at, deleted_at;

-- name: hard_delete :execrows
-- Remove a model row for good (the artifact at storage_uri is the caller's to remove).
DELETE FROM twin_models WHERE org_id = app.org_id() AND id = :id;

-- name: seed :scalar
-- Seeding (dl.system()): the given users on the free tier, or pro when listed in
-- :pro_user_ids, each with a ready, active voice and face model per (organization, user).
-- Returns the models created.
WITH tiers AS (
  UPDATE users SET subscription_tier = CASE WHEN id = ANY(:pro_user_ids::uuid[]) THEN 'pro'
                                            ELSE 'free' END
  WHERE id = ANY(:user_ids::uuid[])
  RETURNING 1
), ins AS (
  INSERT INTO twin_models (org_id, user_id, kind, name, provider, storage_uri, status,
                           quality_metrics, training_params, is_active, training_started_at,
                           ready_at, activated_at, created_at)
  SELECT u.org_id, u.user_id, k.kind, k.kind || ' model', k.provider,
         format('s3://twin-models/%s/%s/%s.bin', u.org_id, u.user_id, k.kind), 'ready',
         jsonb_build_object('similarity', round((0.8 + random() * 0.19)::numeric, 3)),
         jsonb_build_object('epochs', 20), true, now() - interval '2 days',
         now() - interval '1 day', now() - interval '1 day', now() - interval '3 days'
  FROM unnest(:org_ids::uuid[], :user_ids::uuid[]) AS u(org_id, user_id)
  CROSS JOIN (VALUES ('voice', 'elevenlabs'), ('face', 'heygen')) AS k(kind, provider)
  WHERE (SELECT count(*) FROM tiers) >= 0
  RETURNING 1
)
SELECT count(*) FROM ins;
