-- Conversation sessions and their turns (schema/0022_digitwin.sql). RLS bounds every
-- statement to the context user's own sessions in the context organization. Session metrics
-- are kept by the turns' statement trigger.

-- name: start :one
-- A new active session of the context user, with the user's active voice and face models.
INSERT INTO conversation_sessions (org_id, user_id, channel, title, metadata, voice_model_id,
                                   face_model_id)
VALUES (app.org_id(), app.user_id(), :channel, :title, coalesce(:metadata::jsonb, '{}'),
        (SELECT m.id FROM twin_models m WHERE m.org_id = app.org_id()
           AND m.user_id = app.user_id() AND m.kind = 'voice' AND m.is_active),
        (SELECT m.id FROM twin_models m WHERE m.org_id = app.org_id()
           AND m.user_id = app.user_id() AND m.kind = 'face' AND m.is_active))
RETURNING org_id, id, user_id, channel, status, title, voice_model_id, face_model_id, metadata,
          started_at, ended_at, last_turn_at, turn_count, avg_latency_ms, p95_latency_ms,
          latency_max_ms, tokens_in, tokens_out;

-- name: get :one
SELECT org_id, id, user_id, channel, status, title, voice_model_id, face_model_id, metadata,
       started_at, ended_at, last_turn_at, turn_count, avg_latency_ms, p95_latency_ms,
       latency_max_ms, tokens_in, tokens_out
FROM conversation_sessions
WHERE org_id = app.org_id() AND id = :id;

-- name: with_turns :one
-- A session with its last :turns turns (oldest first) in one round trip: the turns come as
-- one array of conversation_turns rows from an ordered LATERAL-style sub-select on the
-- primary key (backward scan, partitions before the session's start pruned at run time).
SELECT s.org_id, s.id, s.user_id, s.channel, s.status, s.title, s.voice_model_id,
       s.face_model_id, s.metadata, s.started_at, s.ended_at, s.last_turn_at, s.turn_count,
       s.avg_latency_ms, s.p95_latency_ms, s.latency_max_ms, s.tokens_in, s.tokens_out,
       coalesce((SELECT array_agg(l.t ORDER BY (l.t).created_at, (l.t).id)
                 FROM (SELECT t FROM conversation_turns t
                       WHERE t.org_id = s.org_id AND t.session_id = s.id
                         AND t.created_at >= s.started_at
                       ORDER BY t.created_at DESC, t.id DESC
                       LIMIT :turns) l), '{}') AS turns
FROM conversation_sessions s
WHERE s.org_id = app.org_id() AND s.id = :id;

-- name: recent :many
-- The context user's sessions, newest first, keyset-paginated on (started_at, id).
SELECT org_id, id, user_id, channel, status, title, voice_model_id, face_model_id, metadata,
       started_at, ended_at, last_turn_at, turn_count, avg_latency_ms, p95_latency_ms,
       latency_max_ms, tokens_in, tokens_out
FROM conversation_sessions
WHERE org_id = app.org_id() AND user_id = app.user_id()
  AND (started_at, id) < (:before_started_at, :before_id)
ORDER BY started_at DESC, id DESC
LIMIT :limit;

-- name: end :one
-- End an active session ('ended', or 'abandoned').
UPDATE conversation_sessions SET status = :status, ended_at = now(), updated_at = now()
WHERE org_id = app.org_id() AND id = :id AND status = 'active'
RETURNING org_id, id, user_id, channel, status, title, voice_model_id, face_model_id, metadata,
          started_at, ended_at, last_turn_at, turn_count, avg_latency_ms, p95_latency_ms,
          latency_max_ms, tokens_in, tokens_out;

-- name: delete :execrows
-- Remove a session and its turns.
DELETE FROM conversation_sessions WHERE org_id = app.org_id() AND id = :id;

-- name: append_turn :one
-- One turn of an active session of the context user, in one round trip: the statement
-- trigger updates the session's metrics and the monthly turn meter (refusing past the tier's
-- limit). No row when the session is not the caller's.
INSERT INTO conversation_turns (org_id, session_id, user_id, input_text, response_text, asr_ms,
                                retrieval_ms, llm_ms, tts_ms, total_ms, tokens_in, tokens_out,
                                source_chunk_ids)
SELECT s.org_id, s.id, s.user_id, :input_text, :response_text, :asr_ms, :retrieval_ms, :llm_ms,
       :tts_ms, :total_ms, :tokens_in, :tokens_out, coalesce(:source_chunk_ids::bigint[], '{}')
FROM conversation_sessions s
WHERE s.org_id = app.org_id() AND s.id = :session_id
RETURNING org_id, session_id, created_at, id, user_id, input_text, response_text, asr_ms,
          retrieval_ms, llm_ms, tts_ms, total_ms, tokens_in, tokens_out, source_chunk_ids;

-- name: turns :many
-- A session's turns, oldest first, keyset-paginated on (created_at, id).
SELECT org_id, session_id, created_at, id, user_id, input_text, response_text, asr_ms,
       retrieval_ms, llm_ms, tts_ms, total_ms, tokens_in, tokens_out, source_chunk_ids
FROM conversation_turns
WHERE org_id = app.org_id() AND session_id = :session_id
  AND (created_at, id) > (:after_created_at, :after_id)
ORDER BY created_at, id
LIMIT :limit;

-- name: stats :one
-- The context user's statistics over sessions started in [:from_at, :to_at).
SELECT count(*) AS sessions, coalesce(sum(turn_count), 0)::bigint AS turns,
       sum(latency_total_ms)::double precision / nullif(sum(turn_count), 0) AS avg_latency_ms,
       app.hist_p95(app.hist_sum(latency_hist), max(latency_max_ms)) AS p95_latency_ms,
       coalesce(sum(tokens_in), 0)::bigint AS tokens_in,
       coalesce(sum(tokens_out), 0)::bigint AS tokens_out
FROM conversation_sessions
WHERE org_id = app.org_id() AND user_id = app.user_id()
  AND started_at >= :from_at AND started_at < :to_at;

-- name: org_stats :many
-- Organization admins: per-member aggregates over [:from_at, :to_at), never content
-- (app.twin_org_stats; others are refused).
SELECT user_id, models, documents, sessions, turns, avg_latency_ms, p95_latency_ms, tokens_in,
       tokens_out
FROM app.twin_org_stats(:from_at, :to_at);

-- name: seed_sessions :scalar
-- Seeding (dl.system()): :per_user active sessions per (organization, user), started over
-- the last :days days; seed_turns fills them, seed_close ends them. Returns the rows created.
WITH ins AS (
  INSERT INTO conversation_sessions (org_id, user_id, channel, status, title, started_at,
                                     ended_at)
  SELECT u.org_id, u.user_id, (ARRAY['text', 'voice', 'video'])[1 + (g % 3)], 'active',
         'Conversation ' || g, st, NULL
  FROM unnest(:org_ids::uuid[], :user_ids::uuid[]) AS u(org_id, user_id)
  CROSS JOIN generate_series(1, :per_user) AS g
  CROSS JOIN LATERAL (SELECT now() - random() * make_interval(days => :days)
                             - interval '1 hour' AS st) t
  RETURNING 1
)
SELECT count(*) FROM ins;

-- name: seed_turns :scalar
-- Seeding (dl.system()): :per_session turns for every active session without turns of the
-- given (organization, user) pairs, in one statement (the statement trigger sums the metrics
-- per session). Returns the turns created.
WITH s AS (
  SELECT x.org_id, x.id, x.user_id, x.started_at
  FROM conversation_sessions x
  JOIN unnest(:org_ids::uuid[], :user_ids::uuid[]) AS u(org_id, user_id)
    ON x.org_id = u.org_id AND x.user_id = u.user_id
  WHERE x.status = 'active' AND x.turn_count = 0
), ins AS (
  INSERT INTO conversation_turns (org_id, session_id, created_at, user_id, input_text,
                                  response_text, asr_ms, retrieval_ms, llm_ms, tts_ms, total_ms,
                                  tokens_in, tokens_out)
  SELECT s.org_id, s.id, s.started_at + g * interval '5 seconds', s.user_id,
         'Question ' || g || ' about the quarterly plan',
         'Answer ' || g || ': the plan covers hiring, budget and the product roadmap',
         a, r, l, t, a + r + l + t + 20, 20 + g % 40, 40 + g % 80
  FROM s CROSS JOIN generate_series(1, :per_session) AS g
  CROSS JOIN LATERAL (SELECT (80 + random() * 120)::int AS a, (10 + random() * 60)::int AS r,
                             (200 + random() * 600)::int AS l,
                             (60 + random() * 200)::int AS t) lat
  RETURNING 1
)
SELECT count(*) FROM ins;

-- name: seed_close :execrows
-- Seeding (dl.system()): end the seeded sessions of the given (organization, user) pairs.
UPDATE conversation_sessions x
SET status = 'ended', ended_at = coalesce(x.last_turn_at, x.started_at) + interval '1 minute'
FROM unnest(:org_ids::uuid[], :user_ids::uuid[]) AS u(org_id, user_id)
WHERE x.org_id = u.org_id AND x.user_id = u.user_id AND x.status = 'active';
