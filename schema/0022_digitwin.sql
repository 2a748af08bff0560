-- depends: 0021_marketplace
-- DigiTwin: a user's personal AI models (voice, face), conversations with the twin, and the
-- knowledge documents it answers from.
--
-- Privacy: every row belongs to one user inside one organization and is private to that user
-- (policies: the context's organization AND the context's user). Organization admins read
-- aggregates only, through app.twin_org_stats(), never content.
--
-- Subscription limits (models, documents, turns per month) come from twin_tier_limits by the
-- user's users.subscription_tier and are enforced by triggers for every caller: the trigger
-- locks the user's twin_usage row first, so concurrent creations queue there and the second
-- one counts the first (READ COMMITTED: each statement of the trigger takes a new snapshot).
-- Tenant sessions are limited; dl.system() (seeding, imports) is counted but not limited.
-- A refusal raises SQLSTATE DLQ01 (LimitExceeded) naming the limit (CONSTRAINT
-- twin_limit_models | twin_limit_documents | twin_limit_turns).
--
-- Counting is per (organization, user): the twin lives in an organization, and a count
-- across organizations would have to read other tenants' rows.

-- Profile additions (users is global; schema/0004_identity.sql already has preferences and
-- subscription_tier).
ALTER TABLE users
  ADD COLUMN personality_traits text[] NOT NULL DEFAULT '{}'
    CONSTRAINT users_personality_traits_size
    CHECK (cardinality(personality_traits) <= 50 AND array_position(personality_traits, NULL) IS NULL),
  ADD COLUMN conversation_preferences jsonb NOT NULL DEFAULT '{}'
    CONSTRAINT users_conversation_preferences_object
    CHECK (jsonb_typeof(conversation_preferences) = 'object');
GRANT SELECT (personality_traits, conversation_preferences),
      UPDATE (personality_traits, conversation_preferences)
  ON users TO datalayer_app;

-- Limits per tier; NULL = unlimited. Not reachable by datalayer_app (read through
-- app.twin_usage() and the limit triggers).
CREATE TABLE twin_tier_limits (
  tier                text PRIMARY KEY,
  max_models          integer CONSTRAINT twin_tier_limits_models CHECK (max_models >= 0),
  max_documents       integer CONSTRAINT twin_tier_limits_documents CHECK (max_documents >= 0),
  max_monthly_turns   integer CONSTRAINT twin_tier_limits_turns CHECK (max_monthly_turns >= 0)
);
INSERT INTO twin_tier_limits (tier, max_models, max_documents, max_monthly_turns) VALUES
  ('free', 2, 10, 500),
  ('pro', 10, 1000, 50000),
  ('enterprise', NULL, NULL, NULL);

-- Per user: the row every limit check locks, and the monthly turn meter. Written only by
-- the SECURITY DEFINER triggers below; datalayer_app holds no privilege on it.
-- The tier is billing's to set (dl.system()), not the user's: without this a user could
-- raise their own limits, since the run-time role may update their profile.
CREATE FUNCTION app.users_tier_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF current_user = 'datalayer_app'
     AND ((TG_OP = 'INSERT' AND NEW.subscription_tier <> 'free')
          OR (TG_OP = 'UPDATE' AND NEW.subscription_tier IS DISTINCT FROM OLD.subscription_tier))
  THEN
    RAISE EXCEPTION 'the subscription tier is set by billing (dl.system()), not by the user'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER users_tier_guard BEFORE INSERT OR UPDATE OF subscription_tier ON users
  FOR EACH ROW EXECUTE FUNCTION app.users_tier_guard();

CREATE TABLE twin_usage (
  org_id       uuid NOT NULL,
  user_id      uuid NOT NULL,
  month        date NOT NULL DEFAULT date_trunc('month', now() AT TIME ZONE 'UTC')::date,
  month_turns  bigint NOT NULL DEFAULT 0,
  total_turns  bigint NOT NULL DEFAULT 0,
  updated_at   timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, user_id),
  FOREIGN KEY (org_id, user_id) REFERENCES memberships (org_id, user_id) ON DELETE CASCADE
);
-- Updated by every turn, model and document (no index covers the counters): half of each
-- page free so the updates stay HOT (a full page turns each into a new index entry).
ALTER TABLE twin_usage SET (fillfactor = 50);

-- Models -------------------------------------------------------------------------------------
-- Voice and face models. The artifact lives in object storage: storage_uri is a URI, never
-- the blob. Status: uploading -> training -> ready | failed; failed -> training (retry);
-- ready -> training (retrain; an active model must be deactivated first: only a ready, live
-- model can be active). Exactly one active model per user and kind: twin_models_active_key.
CREATE TABLE twin_models (
  org_id            uuid NOT NULL,
  id                uuid NOT NULL DEFAULT gen_random_uuid(),
  user_id           uuid NOT NULL,
  kind              text NOT NULL CONSTRAINT twin_models_kind_known CHECK (kind IN ('voice', 'face')),
  name              text NOT NULL DEFAULT '' CONSTRAINT twin_models_name_length
                    CHECK (length(name) <= 200),
  provider          text NOT NULL CONSTRAINT twin_models_provider_length
                    CHECK (length(provider) BETWEEN 1 AND 100),
  storage_uri       text NOT NULL CONSTRAINT twin_models_storage_uri_format
                    CHECK (storage_uri ~ '^[a-z][a-z0-9+.-]*://[^[:space:]]+$'
                           AND length(storage_uri) <= 2000),
  status            text NOT NULL DEFAULT 'uploading' CONSTRAINT twin_models_status_known
                    CHECK (status IN ('uploading', 'training', 'ready', 'failed')),
  quality_metrics   jsonb NOT NULL DEFAULT '{}' CONSTRAINT twin_models_metrics_object
                    CHECK (jsonb_typeof(quality_metrics) = 'object'),
  training_params   jsonb NOT NULL DEFAULT '{}' CONSTRAINT twin_models_params_object
                    CHECK (jsonb_typeof(training_params) = 'object'),
  error             text CONSTRAINT twin_models_error_length CHECK (length(error) <= 2000),
  is_active         boolean NOT NULL DEFAULT false,
  training_started_at timestamptz,
  ready_at          timestamptz,
  activated_at      timestamptz,
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  deleted_at        timestamptz,
  PRIMARY KEY (org_id, id),
  CONSTRAINT twin_models_active_is_ready
    CHECK (NOT is_active OR (status = 'ready' AND deleted_at IS NULL)),
  FOREIGN KEY (org_id, user_id) REFERENCES memberships (org_id, user_id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX twin_models_active_key ON twin_models (org_id, user_id, kind)
  WHERE is_active;
CREATE INDEX twin_models_user_idx ON twin_models (org_id, user_id, kind, created_at DESC)
  WHERE deleted_at IS NULL;

CREATE FUNCTION app.twin_model_transition_allowed(p_from text, p_to text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT p_from = p_to OR CASE p_from
    WHEN 'uploading' THEN p_to IN ('training', 'failed')
    WHEN 'training' THEN p_to IN ('ready', 'failed')
    WHEN 'ready' THEN p_to = 'training'
    WHEN 'failed' THEN p_to = 'training'
    ELSE false
  END
$$;

CREATE FUNCTION app.twin_models_guard() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF NEW.status IS DISTINCT FROM OLD.status THEN
    IF NOT app.twin_model_transition_allowed(OLD.status, NEW.status) THEN
      RAISE EXCEPTION 'illegal model status transition from % to %', OLD.status, NEW.status
        USING ERRCODE = 'check_violation', CONSTRAINT = 'twin_models_status_transition',
              TABLE = 'twin_models';
    END IF;
    IF NEW.status = 'training' THEN
      NEW.training_started_at := now();
      NEW.error := NULL;
    ELSIF NEW.status = 'ready' THEN
      NEW.ready_at := now();
    END IF;
  END IF;
  IF NEW.is_active AND NOT OLD.is_active THEN
    NEW.activated_at := now();
  END IF;
  NEW.updated_at := now();
  RETURN NEW;
END $$;
CREATE TRIGGER twin_models_guard BEFORE UPDATE ON twin_models
  FOR EACH ROW EXECUTE FUNCTION app.twin_models_guard();

-- Conversations ------------------------------------------------------------------------------
-- Session metrics are kept by the turns' statement trigger (datalayer_app cannot write them):
-- turn_count, latency_total_ms (average = total / count), a latency histogram over
-- app.latency_bounds() (p95 is the upper bound of the bucket holding the 95th percentile,
-- capped by the maximum seen), tokens in and out.
CREATE FUNCTION app.latency_bounds() RETURNS integer[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT '{0,25,50,75,100,150,200,250,300,400,500,600,700,800,900,1000,1250,1500,1750,2000,2500,3000,4000,5000,7500,10000,15000,20000,30000,60000}'::integer[] $$;

-- Histogram helpers, in plpgsql loops over 30 buckets: a few microseconds each (the set-based
-- SQL versions cost far more per turn).
-- The histogram (one count per bucket of app.latency_bounds()) of a set of latencies.
CREATE FUNCTION app.latency_hist(p_ms integer[]) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  v_bounds constant integer[] := app.latency_bounds();
  v_hist integer[] := array_fill(0, ARRAY[30]);
  v_ms integer;
  v_b integer;
BEGIN
  FOREACH v_ms IN ARRAY coalesce(p_ms, '{}') LOOP
    CONTINUE WHEN v_ms IS NULL;
    v_b := width_bucket(greatest(v_ms, 0), v_bounds);
    v_hist[v_b] := v_hist[v_b] + 1;
  END LOOP;
  RETURN v_hist;
END $$;

CREATE FUNCTION app.hist_add(a integer[], b integer[]) RETURNS integer[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  v_out integer[] := array_fill(0, ARRAY[30]);
BEGIN
  FOR i IN 1 .. 30 LOOP
    v_out[i] := coalesce(a[i], 0) + coalesce(b[i], 0);
  END LOOP;
  RETURN v_out;
END $$;

CREATE AGGREGATE app.hist_sum(integer[]) (SFUNC = app.hist_add, STYPE = integer[]);

-- The 95th percentile estimate of a histogram: the upper bound of the bucket holding it,
-- capped by the largest value seen; NULL for an empty histogram.
CREATE FUNCTION app.hist_p95(p_hist integer[], p_max integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  v_bounds constant integer[] := app.latency_bounds();
  v_total bigint := 0;
  v_cum bigint := 0;
  v_rank bigint;
BEGIN
  FOR i IN 1 .. coalesce(cardinality(p_hist), 0) LOOP
    v_total := v_total + coalesce(p_hist[i], 0);
  END LOOP;
  IF v_total = 0 THEN
    RETURN NULL;
  END IF;
  v_rank := ceil(0.95 * v_total);
  FOR i IN 1 .. cardinality(p_hist) LOOP
    v_cum := v_cum + coalesce(p_hist[i], 0);
    IF v_cum >= v_rank THEN
      RETURN least(coalesce(v_bounds[i + 1], p_max), p_max);
    END IF;
  END LOOP;
  RETURN p_max;
END $$;

CREATE TABLE conversation_sessions (
  org_id            uuid NOT NULL,
  id                uuid NOT NULL DEFAULT gen_random_uuid(),
  user_id           uuid NOT NULL,
  channel           text NOT NULL DEFAULT 'text' CONSTRAINT conversation_sessions_channel_known
                    CHECK (channel IN ('text', 'voice', 'video')),
  status            text NOT NULL DEFAULT 'active' CONSTRAINT conversation_sessions_status_known
                    CHECK (status IN ('active', 'ended', 'abandoned')),
  title             text NOT NULL DEFAULT '' CONSTRAINT conversation_sessions_title_length
                    CHECK (length(title) <= 200),
  voice_model_id    uuid,   -- the active models when it started (history: no foreign key)
  face_model_id     uuid,
  metadata          jsonb NOT NULL DEFAULT '{}' CONSTRAINT conversation_sessions_metadata_object
                    CHECK (jsonb_typeof(metadata) = 'object'),
  started_at        timestamptz NOT NULL DEFAULT now(),
  ended_at          timestamptz,
  last_turn_at      timestamptz,
  turn_count        integer NOT NULL DEFAULT 0,
  latency_total_ms  bigint NOT NULL DEFAULT 0,
  latency_max_ms    integer,
  latency_hist      integer[] NOT NULL DEFAULT array_fill(0, ARRAY[30]),
  p95_latency_ms    integer,
  avg_latency_ms    double precision GENERATED ALWAYS AS
                    (CASE WHEN turn_count > 0 THEN latency_total_ms::double precision / turn_count END) STORED,
  tokens_in         bigint NOT NULL DEFAULT 0,
  tokens_out        bigint NOT NULL DEFAULT 0,
  updated_at        timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT conversation_sessions_ended
    CHECK ((status = 'active') = (ended_at IS NULL)),
  CONSTRAINT conversation_sessions_hist_size CHECK (cardinality(latency_hist) = 30),
  FOREIGN KEY (org_id, user_id) REFERENCES memberships (org_id, user_id) ON DELETE CASCADE
);
-- Metrics change on every turn: room for HOT updates (no index covers them).
ALTER TABLE conversation_sessions SET (fillfactor = 80);
-- A user's recent sessions (keyset) and statistics over a period.
CREATE INDEX conversation_sessions_user_idx
  ON conversation_sessions (org_id, user_id, started_at DESC, id DESC);

-- Turns: append-only, partitioned by month on created_at (app.ensure_partitions, RLS copied
-- onto every partition). The primary key serves "the last N turns of a session".
CREATE TABLE conversation_turns (
  org_id            uuid NOT NULL,
  session_id        uuid NOT NULL,
  created_at        timestamptz NOT NULL DEFAULT clock_timestamp(),
  id                uuid NOT NULL DEFAULT gen_random_uuid(),
  user_id           uuid NOT NULL,
  input_text        text NOT NULL CONSTRAINT conversation_turns_input_length
                    CHECK (length(input_text) <= 100000),
  response_text     text NOT NULL CONSTRAINT conversation_turns_response_length
                    CHECK (length(response_text) <= 100000),
  asr_ms            integer CONSTRAINT conversation_turns_asr_ms CHECK (asr_ms >= 0),
  retrieval_ms      integer CONSTRAINT conversation_turns_retrieval_ms CHECK (retrieval_ms >= 0),
  llm_ms            integer CONSTRAINT conversation_turns_llm_ms CHECK (llm_ms >= 0),
  tts_ms            integer CONSTRAINT conversation_turns_tts_ms CHECK (tts_ms >= 0),
  total_ms          integer NOT NULL CONSTRAINT conversation_turns_total_ms CHECK (total_ms >= 0),
  tokens_in         integer NOT NULL DEFAULT 0 CONSTRAINT conversation_turns_tokens_in
                    CHECK (tokens_in >= 0),
  tokens_out        integer NOT NULL DEFAULT 0 CONSTRAINT conversation_turns_tokens_out
                    CHECK (tokens_out >= 0),
  source_chunk_ids  bigint[] NOT NULL DEFAULT '{}' CONSTRAINT conversation_turns_sources_size
                    CHECK (cardinality(source_chunk_ids) <= 100),
  PRIMARY KEY (org_id, session_id, created_at, id),
  FOREIGN KEY (org_id, session_id) REFERENCES conversation_sessions (org_id, id) ON DELETE CASCADE
) PARTITION BY RANGE (created_at);

-- Knowledge ----------------------------------------------------------------------------------
-- Documents: status pending -> processing (claimed with a lease) -> ready | failed; a lease
-- that expires returns the document to the queue (claimed again directly, or reset by the
-- reaper). The same content (sha256 checksum) is stored once per user.
CREATE TABLE knowledge_documents (
  org_id            uuid NOT NULL,
  id                uuid NOT NULL DEFAULT gen_random_uuid(),
  user_id           uuid NOT NULL,
  title             text NOT NULL CONSTRAINT knowledge_documents_title_length
                    CHECK (length(title) BETWEEN 1 AND 500),
  source            text NOT NULL CONSTRAINT knowledge_documents_source_known
                    CHECK (source IN ('upload', 'url', 'note')),
  source_uri        text CONSTRAINT knowledge_documents_source_uri_length
                    CHECK (length(source_uri) <= 2000),
  mime_type         text NOT NULL DEFAULT 'text/plain' CONSTRAINT knowledge_documents_mime_format
                    CHECK (mime_type ~ '^[a-z0-9.+-]+/[a-zA-Z0-9.+-]+$' AND length(mime_type) <= 200),
  size_bytes        bigint NOT NULL DEFAULT 0 CONSTRAINT knowledge_documents_size
                    CHECK (size_bytes >= 0),
  checksum          bytea NOT NULL CONSTRAINT knowledge_documents_checksum_length
                    CHECK (length(checksum) = 32),
  content           text CONSTRAINT knowledge_documents_content_length
                    CHECK (length(content) <= 10000000),
  status            text NOT NULL DEFAULT 'pending' CONSTRAINT knowledge_documents_status_known
                    CHECK (status IN ('pending', 'processing', 'ready', 'failed')),
  error             text CONSTRAINT knowledge_documents_error_length CHECK (length(error) <= 2000),
  attempts          integer NOT NULL DEFAULT 0 CONSTRAINT knowledge_documents_attempts
                    CHECK (attempts >= 0),
  worker_id         text CONSTRAINT knowledge_documents_worker_id_length
                    CHECK (length(worker_id) BETWEEN 1 AND 200),
  lease_expires_at  timestamptz,
  chunk_count       integer NOT NULL DEFAULT 0,
  token_count       bigint NOT NULL DEFAULT 0,
  processed_at      timestamptz,
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  deleted_at        timestamptz,
  PRIMARY KEY (org_id, id),
  CONSTRAINT knowledge_documents_checksum_key UNIQUE (org_id, user_id, checksum),
  CONSTRAINT knowledge_documents_processing_has_lease
    CHECK ((status = 'processing') = (worker_id IS NOT NULL AND lease_expires_at IS NOT NULL)),
  CONSTRAINT knowledge_documents_failed_has_error CHECK (status <> 'failed' OR error IS NOT NULL),
  FOREIGN KEY (org_id, user_id) REFERENCES memberships (org_id, user_id) ON DELETE CASCADE
);
ALTER TABLE knowledge_documents SET (fillfactor = 90);
CREATE INDEX knowledge_documents_user_idx
  ON knowledge_documents (org_id, user_id, created_at DESC, id DESC);
-- The queue: pending and processing (leases to take over) live documents only.
CREATE INDEX knowledge_documents_queue_idx ON knowledge_documents (created_at, id)
  WHERE status IN ('pending', 'processing') AND deleted_at IS NULL;

-- Chunks: ordered text segments of a document, searchable. The heading (the document title
-- unless the worker gives a section heading) weighs A, the text B.
--
-- The search index is on tsv alone. Measured at 100,000 chunks of one user: a GIN index on
-- (org_id, user_id, tsv) (btree_gin) reads the user's whole posting lists on every search
-- (2.0 ms for a rare term), the tsv-only index reads the term's (0.09 ms), and the owner
-- filter is then a cheap recheck of the matching rows. Under RLS `@@` is not leakproof and
-- never an index qual, so searches go through app.knowledge_search, which filters on the
-- user explicitly.
CREATE TABLE knowledge_chunks (
  org_id        uuid NOT NULL,
  id            bigint GENERATED ALWAYS AS IDENTITY,
  document_id   uuid NOT NULL,
  user_id       uuid NOT NULL,
  seq           integer NOT NULL CONSTRAINT knowledge_chunks_seq_positive CHECK (seq >= 1),
  heading       text NOT NULL DEFAULT '' CONSTRAINT knowledge_chunks_heading_length
                CHECK (length(heading) <= 500),
  content       text NOT NULL CONSTRAINT knowledge_chunks_content_length
                CHECK (length(content) BETWEEN 1 AND 100000),
  token_count   integer NOT NULL CONSTRAINT knowledge_chunks_tokens CHECK (token_count >= 0),
  tsv           tsvector GENERATED ALWAYS AS
                (setweight(to_tsvector('english'::regconfig, heading), 'A')
                 || setweight(to_tsvector('english'::regconfig, content), 'B')) STORED,
  created_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, id),
  CONSTRAINT knowledge_chunks_seq_key UNIQUE (org_id, document_id, seq),
  FOREIGN KEY (org_id, document_id) REFERENCES knowledge_documents (org_id, id) ON DELETE CASCADE
);
-- fastupdate off: a search never scans a pending list of recent inserts (which costs
-- milliseconds until a vacuum merges it); chunk writes are batched by workers anyway.
CREATE INDEX knowledge_chunks_search_idx ON knowledge_chunks USING gin (tsv)
  WITH (fastupdate = off);

-- Limits -------------------------------------------------------------------------------------
-- Lock the user's usage row (creating it) and check one limit. p_kind: models | documents |
-- turns (p_add turns just added). Only from the trigger functions below.
CREATE FUNCTION app.twin_check_limit(p_org uuid, p_user uuid, p_kind text, p_add bigint)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_tier text;
  v_limit integer;
  v_used bigint;
  v_month date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
BEGIN
  -- The lock every concurrent creation of this user queues on (held until commit). A plain
  -- UPDATE when the row exists (every call but the user's first): one WAL record, where
  -- INSERT .. ON CONFLICT DO UPDATE probes the index and logs a row lock before the update.
  UPDATE twin_usage u
  SET month_turns = CASE WHEN p_kind <> 'turns' THEN
                           CASE WHEN u.month = v_month THEN u.month_turns ELSE 0 END
                         WHEN u.month = v_month THEN u.month_turns + p_add
                         ELSE p_add END,
      total_turns = u.total_turns + CASE WHEN p_kind = 'turns' THEN p_add ELSE 0 END,
      month = v_month,
      updated_at = now()
  WHERE u.org_id = p_org AND u.user_id = p_user
  RETURNING CASE WHEN p_kind = 'turns' THEN u.month_turns END INTO v_used;
  IF NOT FOUND THEN  -- the first one (concurrent first ones meet in ON CONFLICT)
    INSERT INTO twin_usage AS u (org_id, user_id, month, month_turns, total_turns)
    VALUES (p_org, p_user, v_month,
            CASE WHEN p_kind = 'turns' THEN p_add ELSE 0 END,
            CASE WHEN p_kind = 'turns' THEN p_add ELSE 0 END)
    ON CONFLICT (org_id, user_id) DO UPDATE
    SET month_turns = CASE WHEN p_kind <> 'turns' THEN
                             CASE WHEN u.month = v_month THEN u.month_turns ELSE 0 END
                           WHEN u.month = v_month THEN u.month_turns + p_add
                           ELSE p_add END,
        total_turns = u.total_turns + CASE WHEN p_kind = 'turns' THEN p_add ELSE 0 END,
        month = v_month,
        updated_at = now()
    RETURNING CASE WHEN p_kind = 'turns' THEN u.month_turns END INTO v_used;
  END IF;
  IF app.org_id() IS NULL THEN
    RETURN;  -- maintenance (dl.system(): seeding, imports) is counted, not limited
  END IF;
  SELECT s.subscription_tier,
         CASE p_kind WHEN 'models' THEN l.max_models WHEN 'documents' THEN l.max_documents
                     ELSE l.max_monthly_turns END
    INTO v_tier, v_limit
  FROM users s LEFT JOIN twin_tier_limits l ON l.tier = s.subscription_tier
  WHERE s.id = p_user;
  IF v_limit IS NULL THEN
    RETURN;
  END IF;
  IF p_kind = 'models' THEN
    SELECT count(*) INTO v_used FROM twin_models m
    WHERE m.org_id = p_org AND m.user_id = p_user AND m.deleted_at IS NULL;
  ELSIF p_kind = 'documents' THEN
    SELECT count(*) INTO v_used FROM knowledge_documents d
    WHERE d.org_id = p_org AND d.user_id = p_user AND d.deleted_at IS NULL;
  END IF;
  IF v_used > v_limit THEN
    RAISE EXCEPTION '% limit reached: the % tier allows % % (%); delete some or upgrade the subscription',
      p_kind, v_tier, v_limit,
      CASE p_kind WHEN 'turns' THEN 'conversation turns per month' ELSE p_kind END,
      CASE p_kind WHEN 'turns' THEN 'max_monthly_turns' ELSE 'max_' || p_kind END
      USING ERRCODE = 'DLQ01', CONSTRAINT = 'twin_limit_' || p_kind;
  END IF;
END $$;

CREATE FUNCTION app.twin_models_limit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  PERFORM app.twin_check_limit(NEW.org_id, NEW.user_id, 'models', 1);
  RETURN NULL;
END $$;
CREATE TRIGGER twin_models_limit_insert AFTER INSERT ON twin_models
  FOR EACH ROW EXECUTE FUNCTION app.twin_models_limit();
CREATE TRIGGER twin_models_limit_restore AFTER UPDATE OF deleted_at ON twin_models
  FOR EACH ROW WHEN (OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS NULL)
  EXECUTE FUNCTION app.twin_models_limit();

CREATE FUNCTION app.knowledge_documents_limit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  PERFORM app.twin_check_limit(NEW.org_id, NEW.user_id, 'documents', 1);
  RETURN NULL;
END $$;
CREATE TRIGGER knowledge_documents_limit_insert AFTER INSERT ON knowledge_documents
  FOR EACH ROW EXECUTE FUNCTION app.knowledge_documents_limit();
CREATE TRIGGER knowledge_documents_limit_restore AFTER UPDATE OF deleted_at ON knowledge_documents
  FOR EACH ROW WHEN (OLD.deleted_at IS NOT NULL AND NEW.deleted_at IS NULL)
  EXECUTE FUNCTION app.knowledge_documents_limit();

-- After a statement inserting turns (they have passed RLS): session metrics, then the
-- monthly turn limit per user. Turns go only into active sessions.
CREATE FUNCTION app.conversation_turns_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  r record;
  v_sessions integer;
  v_updated integer;
BEGIN
  SELECT count(DISTINCT (n.org_id, n.session_id)) INTO v_sessions FROM new_rows n;
  UPDATE conversation_sessions s
  SET turn_count = s.turn_count + a.n,
      latency_total_ms = s.latency_total_ms + a.total,
      latency_max_ms = greatest(s.latency_max_ms, a.max_ms),
      latency_hist = app.hist_add(s.latency_hist, a.hist),
      p95_latency_ms = app.hist_p95(app.hist_add(s.latency_hist, a.hist),
                                    greatest(s.latency_max_ms, a.max_ms)),
      tokens_in = s.tokens_in + a.tin,
      tokens_out = s.tokens_out + a.tout,
      last_turn_at = greatest(s.last_turn_at, a.last_at),
      updated_at = now()
  FROM (SELECT n.org_id, n.session_id, count(*)::integer AS n, sum(n.total_ms) AS total,
               max(n.total_ms) AS max_ms, app.latency_hist(array_agg(n.total_ms)) AS hist,
               sum(n.tokens_in) AS tin, sum(n.tokens_out) AS tout, max(n.created_at) AS last_at
        FROM new_rows n GROUP BY n.org_id, n.session_id) a
  WHERE s.org_id = a.org_id AND s.id = a.session_id AND s.status = 'active';
  GET DIAGNOSTICS v_updated = ROW_COUNT;
  IF v_updated < v_sessions THEN
    RAISE EXCEPTION 'a turn can only be added to an active conversation session'
      USING ERRCODE = 'check_violation', CONSTRAINT = 'conversation_turns_session_active',
            TABLE = 'conversation_turns';
  END IF;
  FOR r IN SELECT n.org_id, n.user_id, count(*) AS n FROM new_rows n
           GROUP BY n.org_id, n.user_id ORDER BY n.org_id, n.user_id LOOP
    PERFORM app.twin_check_limit(r.org_id, r.user_id, 'turns', r.n);
  END LOOP;
  RETURN NULL;
END $$;
CREATE TRIGGER conversation_turns_after_insert AFTER INSERT ON conversation_turns
  REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION app.conversation_turns_after_insert();

-- Activation ---------------------------------------------------------------------------------
-- Make p_id the user's active model of its kind, deactivating the previous one, in one call.
-- Runs as the caller (RLS: only your own models). Concurrent activations of one user queue
-- on an advisory lock of (org, user, kind) so neither meets the other's half-done state;
-- each statement after the lock sees the committed winner (READ COMMITTED). Returns the
-- model, or no row when it is not the caller's, not ready or deleted.
CREATE FUNCTION app.twin_activate_model(p_id uuid)
RETURNS SETOF twin_models
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_user uuid;
  v_kind text;
BEGIN
  SELECT m.user_id, m.kind INTO v_user, v_kind FROM twin_models m
  WHERE m.org_id = app.org_id() AND m.id = p_id;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  PERFORM pg_advisory_xact_lock(hashtextextended(
    'datalayer.twin_models/' || app.org_id()::text || '/' || v_user::text || '/' || v_kind, 0));
  IF NOT EXISTS (SELECT 1 FROM twin_models m
                 WHERE m.org_id = app.org_id() AND m.id = p_id AND m.status = 'ready'
                   AND m.deleted_at IS NULL) THEN
    RETURN;
  END IF;
  UPDATE twin_models m SET is_active = false
  WHERE m.org_id = app.org_id() AND m.user_id = v_user AND m.kind = v_kind AND m.is_active
    AND m.id <> p_id;
  RETURN QUERY
  UPDATE twin_models m SET is_active = true
  WHERE m.org_id = app.org_id() AND m.id = p_id
  RETURNING m.*;
END $$;

-- Reading: usage, search, admin aggregates -----------------------------------------------------

-- The context user's tier, limits and usage in the context organization.
CREATE FUNCTION app.twin_usage()
RETURNS TABLE (tier text, max_models integer, max_documents integer, max_monthly_turns integer,
               models bigint, documents bigint, month_turns bigint, total_turns bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
AS $$
  SELECT u.subscription_tier, l.max_models, l.max_documents, l.max_monthly_turns,
         (SELECT count(*) FROM twin_models m WHERE m.org_id = app.org_id()
            AND m.user_id = u.id AND m.deleted_at IS NULL),
         (SELECT count(*) FROM knowledge_documents d WHERE d.org_id = app.org_id()
            AND d.user_id = u.id AND d.deleted_at IS NULL),
         coalesce((SELECT CASE WHEN t.month = date_trunc('month', now() AT TIME ZONE 'UTC')::date
                               THEN t.month_turns ELSE 0 END
                   FROM twin_usage t WHERE t.org_id = app.org_id() AND t.user_id = u.id), 0),
         coalesce((SELECT t.total_turns FROM twin_usage t
                   WHERE t.org_id = app.org_id() AND t.user_id = u.id), 0)
  FROM users u
  JOIN memberships ms ON ms.org_id = app.org_id() AND ms.user_id = u.id
  LEFT JOIN twin_tier_limits l ON l.tier = u.subscription_tier
  WHERE u.id = app.user_id()
$$;

-- Full-text search over the context user's chunks of live documents: weighted (heading A,
-- text B), ranked by ts_rank_cd, with ts_headline snippets computed for the returned rows
-- only. SECURITY DEFINER (no RLS) with explicit filters on the context organization and user,
-- so that `@@` (not leakproof, hence never an index qual under RLS) is an index qual of
-- knowledge_chunks_search_idx. plpgsql: the plan is cached per connection.
CREATE FUNCTION app.knowledge_search(p_query text, p_limit integer)
RETURNS TABLE (chunk_id bigint, document_id uuid, seq integer, heading text, content text,
               token_count integer, rank real, snippet text, title text, source text,
               mime_type text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
  v_q tsquery := websearch_to_tsquery('english'::regconfig, p_query);
  v_org text := app.org_id()::text;
  v_user text := app.user_id()::text;
BEGIN
  IF p_limit NOT BETWEEN 1 AND 100 THEN
    RAISE EXCEPTION 'search limit must be between 1 and 100'
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  IF numnode(v_q) = 0 OR v_org IS NULL OR v_user IS NULL THEN
    RETURN;
  END IF;
  -- The term index drives the plan whatever the statistics say: the matches are found first
  -- (a MATERIALIZED CTE: no join order can start from the documents), and the owner filter
  -- compares text on purpose, since as uuid equalities with values unknown at plan time the
  -- planner may prefer the primary key's org_id prefix and read a whole library.
  RETURN QUERY
  WITH hits AS MATERIALIZED (
    SELECT c.org_id, c.id, c.document_id, ts_rank_cd(c.tsv, v_q) AS rank
    FROM knowledge_chunks c
    WHERE c.tsv @@ v_q AND c.org_id::text = v_org AND c.user_id::text = v_user
  ), top AS (
    SELECT h.org_id, h.id, h.document_id, h.rank, d.title, d.source, d.mime_type
    FROM hits h
    JOIN knowledge_documents d ON d.org_id = h.org_id AND d.id = h.document_id
    WHERE d.deleted_at IS NULL
    ORDER BY h.rank DESC, h.id
    LIMIT p_limit
  )
  -- Text and snippets for the returned rows only.
  SELECT c.id, c.document_id, c.seq, c.heading, c.content, c.token_count, top.rank,
         ts_headline('english'::regconfig, c.content, v_q,
                     'MaxFragments=2, MinWords=5, MaxWords=18, StartSel=[, StopSel=]'),
         top.title, top.source, top.mime_type
  FROM top
  JOIN knowledge_chunks c ON c.org_id = top.org_id AND c.id = top.id
  ORDER BY top.rank DESC, top.id;
END $$;

-- Aggregates per member of the context organization over [p_from, p_to) (sessions by start),
-- for organization admins only: counts, latency and tokens; never content.
CREATE FUNCTION app.twin_org_stats(p_from timestamptz, p_to timestamptz)
RETURNS TABLE (user_id uuid, models bigint, documents bigint, sessions bigint, turns bigint,
               avg_latency_ms double precision, p95_latency_ms integer, tokens_in bigint,
               tokens_out bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
BEGIN
  IF NOT coalesce(app.is_admin(), false) THEN
    RAISE EXCEPTION 'only organization owners and admins may read twin statistics'
      USING ERRCODE = 'insufficient_privilege';
  END IF;
  RETURN QUERY
  SELECT ms.user_id,
         (SELECT count(*) FROM twin_models m WHERE m.org_id = ms.org_id
            AND m.user_id = ms.user_id AND m.deleted_at IS NULL),
         (SELECT count(*) FROM knowledge_documents d WHERE d.org_id = ms.org_id
            AND d.user_id = ms.user_id AND d.deleted_at IS NULL),
         coalesce(s.sessions, 0), coalesce(s.turns, 0), s.avg_ms,
         app.hist_p95(s.hist, s.max_ms), coalesce(s.tin, 0), coalesce(s.tout, 0)
  FROM memberships ms
  LEFT JOIN LATERAL (
    SELECT count(*) AS sessions, sum(x.turn_count)::bigint AS turns,
           sum(x.latency_total_ms)::double precision / nullif(sum(x.turn_count), 0) AS avg_ms,
           app.hist_sum(x.latency_hist) AS hist, max(x.latency_max_ms) AS max_ms,
           sum(x.tokens_in)::bigint AS tin, sum(x.tokens_out)::bigint AS tout
    FROM conversation_sessions x
    WHERE x.org_id = ms.org_id AND x.user_id = ms.user_id
      AND x.started_at >= p_from AND x.started_at < p_to) s ON true
  WHERE ms.org_id = app.org_id()
  ORDER BY ms.user_id;
END $$;

-- Row-level security: private to the user within the organization --------------------------
DO $$
DECLARE
  t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['twin_models', 'conversation_sessions', 'conversation_turns',
                           'knowledge_documents', 'knowledge_chunks', 'twin_usage'] LOOP
    EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format('CREATE POLICY %I ON %I FOR SELECT USING (org_id = (SELECT app.org_id()) '
                   'AND user_id = (SELECT app.user_id()))', t || '_select', t);
    CONTINUE WHEN t = 'twin_usage';
    EXECUTE format('CREATE POLICY %I ON %I FOR INSERT WITH CHECK (org_id = (SELECT app.org_id()) '
                   'AND user_id = (SELECT app.user_id()) AND (SELECT app.can_write()))',
                   t || '_insert', t);
    CONTINUE WHEN t = 'conversation_turns';
    EXECUTE format('CREATE POLICY %I ON %I FOR UPDATE USING (org_id = (SELECT app.org_id()) '
                   'AND user_id = (SELECT app.user_id()) AND (SELECT app.can_write())) '
                   'WITH CHECK (org_id = (SELECT app.org_id()) AND user_id = (SELECT app.user_id()))',
                   t || '_update', t);
    EXECUTE format('CREATE POLICY %I ON %I FOR DELETE USING (org_id = (SELECT app.org_id()) '
                   'AND user_id = (SELECT app.user_id()) AND (SELECT app.can_write()))',
                   t || '_delete', t);
  END LOOP;
END $$;

-- Privileges: identity, ownership and the columns triggers own are not writable -------------
GRANT SELECT,
      INSERT (org_id, id, user_id, kind, name, provider, storage_uri, status, quality_metrics,
              training_params),
      UPDATE (name, storage_uri, status, quality_metrics, training_params, error, is_active,
              deleted_at),
      DELETE
  ON twin_models TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, id, user_id, channel, title, voice_model_id, face_model_id, metadata),
      UPDATE (status, ended_at, title, metadata, updated_at),
      DELETE
  ON conversation_sessions TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, session_id, id, user_id, input_text, response_text, asr_ms, retrieval_ms,
              llm_ms, tts_ms, total_ms, tokens_in, tokens_out, source_chunk_ids)
  ON conversation_turns TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, id, user_id, title, source, source_uri, mime_type, size_bytes, checksum,
              content),
      UPDATE (title, status, error, attempts, worker_id, lease_expires_at, chunk_count,
              token_count, processed_at, updated_at, deleted_at),
      DELETE
  ON knowledge_documents TO datalayer_app;
GRANT SELECT,
      INSERT (org_id, document_id, user_id, seq, heading, content, token_count),
      DELETE
  ON knowledge_chunks TO datalayer_app;

-- Turns are partitioned by month (schema/0008_executions.sql): the maintenance role owns the
-- parent and creates its partitions with RLS copied.
ALTER TABLE conversation_turns OWNER TO datalayer_maint;

DO $$
DECLARE
  f text;
BEGIN
  FOREACH f IN ARRAY ARRAY[
    'app.twin_check_limit(uuid, uuid, text, bigint)', 'app.twin_models_limit()',
    'app.knowledge_documents_limit()', 'app.conversation_turns_after_insert()',
    'app.twin_usage()', 'app.knowledge_search(text, integer)',
    'app.twin_org_stats(timestamptz, timestamptz)']
  LOOP
    EXECUTE format('ALTER FUNCTION %s OWNER TO datalayer_maint', f);
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END $$;
REVOKE ALL ON FUNCTION app.twin_models_guard(), app.twin_activate_model(uuid),
                       app.twin_model_transition_allowed(text, text), app.latency_bounds(),
                       app.latency_hist(integer[]), app.hist_add(integer[], integer[]),
                       app.hist_sum(integer[]), app.hist_p95(integer[], integer)
  FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.twin_activate_model(uuid), app.twin_usage(),
                          app.knowledge_search(text, integer),
                          app.twin_org_stats(timestamptz, timestamptz),
                          app.twin_model_transition_allowed(text, text), app.latency_bounds(),
                          app.latency_hist(integer[]), app.hist_add(integer[], integer[]),
                          app.hist_sum(integer[]), app.hist_p95(integer[], integer)
  TO datalayer_app, datalayer_maint;

DO $$ BEGIN PERFORM app.ensure_partitions(1); END $$;
