-- Knowledge documents, their processing queue and their searchable chunks
-- (schema/0022_digitwin.sql). RLS bounds tenant sessions to the context user's own
-- documents; queue workers run in dl.system() (cross-tenant, :org_id optional) or in the
-- user's session. Queue methods that address a document take :org_id: NULL in a tenant
-- session (the context's organization), the document's organization from dl.system().

-- name: create :one
-- A document of the context user; the same content (checksum) is stored once: a repeat
-- returns the existing document (restored if it was deleted), with created = false.
INSERT INTO knowledge_documents AS d (org_id, user_id, title, source, source_uri, mime_type,
                                      size_bytes, checksum, content)
VALUES (app.org_id(), app.user_id(), :title, :source, :source_uri, :mime_type, :size_bytes,
        :checksum, :content)
ON CONFLICT (org_id, user_id, checksum) DO UPDATE SET deleted_at = NULL
RETURNING org_id, id, user_id, title, source, source_uri, mime_type, size_bytes, checksum,
          status, error, attempts, chunk_count, token_count, processed_at, created_at,
          updated_at, deleted_at, (xmax = 0) AS created;

-- name: get :one
SELECT org_id, id, user_id, title, source, source_uri, mime_type, size_bytes, checksum, status,
       error, attempts, chunk_count, token_count, processed_at, created_at, updated_at,
       deleted_at
FROM knowledge_documents
WHERE org_id = app.org_id() AND id = :id;

-- name: list :many
-- The context user's live documents, newest first, keyset-paginated on (created_at, id).
SELECT org_id, id, user_id, title, source, source_uri, mime_type, size_bytes, checksum, status,
       error, attempts, chunk_count, token_count, processed_at, created_at, updated_at,
       deleted_at
FROM knowledge_documents
WHERE org_id = app.org_id() AND user_id = app.user_id() AND deleted_at IS NULL
  AND (created_at, id) < (:before_created_at, :before_id)
ORDER BY created_at DESC, id DESC
LIMIT :limit;

-- name: chunks :many
-- A document's chunks in order.
SELECT org_id, id, document_id, user_id, seq, heading, content, token_count, created_at
FROM knowledge_chunks
WHERE org_id = app.org_id() AND document_id = :document_id
ORDER BY seq
LIMIT :limit;

-- name: soft_delete :one
UPDATE knowledge_documents SET deleted_at = now(), updated_at = now()
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NULL
RETURNING org_id, id, user_id, title, source, source_uri, mime_type, size_bytes, checksum,
          status, error, attempts, chunk_count, token_count, processed_at, created_at,
          updated_at, deleted_at;

-- name: restore :one
-- Undelete a document (counts against the document limit again).
UPDATE knowledge_documents SET deleted_at = NULL, updated_at = now()
WHERE org_id = app.org_id() AND id = :id AND deleted_at IS NOT NULL
RETURNING org_id, id, user_id, title, source, source_uri, mime_type, size_bytes, checksum,
          status, error, attempts, chunk_count, token_count, processed_at, created_at,
          updated_at, deleted_at;

-- name: hard_delete :execrows
-- Remove a document and its chunks for good.
DELETE FROM knowledge_documents WHERE org_id = app.org_id() AND id = :id;

-- name: reprocess :one
-- Queue a ready or failed document again (its chunks are replaced when the worker stores
-- new ones).
UPDATE knowledge_documents SET status = 'pending', error = NULL, attempts = 0,
       updated_at = now()
WHERE org_id = app.org_id() AND id = :id AND status IN ('ready', 'failed')
  AND deleted_at IS NULL
RETURNING org_id, id, user_id, title, source, source_uri, mime_type, size_bytes, checksum,
          status, error, attempts, chunk_count, token_count, processed_at, created_at,
          updated_at, deleted_at;

-- name: claim :many
-- Workers: up to :limit live documents that are pending, or processing under an expired
-- lease (a crashed worker's), oldest first; FOR UPDATE SKIP LOCKED, so concurrent workers
-- never take the same one. Each gets a lease of :lease_s seconds and attempts + 1.
WITH c AS (
  SELECT org_id, id FROM knowledge_documents
  WHERE status IN ('pending', 'processing') AND deleted_at IS NULL
    AND (status = 'pending' OR lease_expires_at < now())
    AND (:org_id::uuid IS NULL OR org_id = :org_id::uuid)
  ORDER BY created_at, id
  LIMIT :limit
  FOR UPDATE SKIP LOCKED
)
UPDATE knowledge_documents d
SET status = 'processing', worker_id = :worker_id,
    lease_expires_at = now() + make_interval(secs => :lease_s), attempts = d.attempts + 1,
    error = NULL, updated_at = now()
FROM c
WHERE d.org_id = c.org_id AND d.id = c.id
RETURNING d.org_id, d.id, d.user_id, d.title, d.source, d.source_uri, d.mime_type,
          d.size_bytes, d.content, d.attempts, d.worker_id, d.lease_expires_at;

-- name: store_chunks :scalar
-- Workers: a claimed document's chunks in one bulk statement (parallel arrays, unnest WITH
-- ORDINALITY gives seq), replacing any earlier ones, and the document marked ready. Only
-- while :worker_id holds the lease; returns the chunks stored (NULL: the lease is gone).
WITH d AS (
  UPDATE knowledge_documents
  SET status = 'ready', worker_id = NULL, lease_expires_at = NULL, error = NULL,
      chunk_count = cardinality(:contents::text[]),
      token_count = (SELECT coalesce(sum(n), 0) FROM unnest(:token_counts::int[]) AS n),
      processed_at = now(), updated_at = now()
  WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND id = :document_id
    AND status = 'processing' AND worker_id = :worker_id
  RETURNING org_id, id, user_id, title
), old AS (
  DELETE FROM knowledge_chunks c USING d WHERE c.org_id = d.org_id AND c.document_id = d.id
  RETURNING 1
), gone AS (
  SELECT count(*) AS n FROM old
), ins AS (
  INSERT INTO knowledge_chunks (org_id, document_id, user_id, seq, heading, content, token_count)
  SELECT d.org_id, d.id, d.user_id, u.seq::int, coalesce(u.heading, d.title), u.content,
         u.tokens
  FROM d CROSS JOIN gone
  CROSS JOIN unnest(:contents::text[], :token_counts::int[], :headings::text[])
             WITH ORDINALITY AS u(content, tokens, heading, seq)
  WHERE gone.n >= 0
  RETURNING 1
)
SELECT CASE WHEN EXISTS (SELECT 1 FROM d) THEN (SELECT count(*) FROM ins) END;

-- name: mark_failed :one
-- Workers: processing failed for good (the error is shown to the user; no secrets in it).
UPDATE knowledge_documents
SET status = 'failed', error = :error, worker_id = NULL, lease_expires_at = NULL,
    updated_at = now()
WHERE org_id = coalesce(:org_id::uuid, app.org_id()) AND id = :document_id
  AND status = 'processing' AND worker_id = :worker_id
RETURNING org_id, id, user_id, title, source, source_uri, mime_type, size_bytes, checksum,
          status, error, attempts, chunk_count, token_count, processed_at, created_at,
          updated_at, deleted_at;

-- name: reap :many
-- Maintenance (dl.system()): documents whose lease expired go back to pending, or to failed
-- after :max_attempts attempts. Returns what was reset.
UPDATE knowledge_documents
SET status = CASE WHEN attempts >= :max_attempts THEN 'failed' ELSE 'pending' END,
    error = CASE WHEN attempts >= :max_attempts
                 THEN 'processing did not finish after ' || attempts || ' attempts' END,
    worker_id = NULL, lease_expires_at = NULL, updated_at = now()
WHERE status = 'processing' AND lease_expires_at < now() AND deleted_at IS NULL
RETURNING org_id, id, status;

-- name: search :many
-- Full-text search over the context user's chunks of live documents: the best :limit chunks
-- (weighted: heading A, text B; ranked), each with a highlighted snippet and its document
-- (app.knowledge_search: explicit user filter, so the GIN index is used under RLS).
SELECT chunk_id, document_id, seq, heading, content, token_count, rank, snippet, title, source,
       mime_type
FROM app.knowledge_search(:query, :limit);

-- name: seed_documents :scalar
-- Seeding (dl.system()): :per_user ready documents per (organization, user), each with
-- :chunks chunks of generated text (from :vocabulary), in one statement. Returns the chunks.
WITH docs AS (
  INSERT INTO knowledge_documents (org_id, user_id, title, source, mime_type, size_bytes,
                                   checksum, status, chunk_count, token_count, processed_at)
  SELECT u.org_id, u.user_id, 'Document ' || g || ' on ' || (:vocabulary::text[])[1 + g % cardinality(:vocabulary::text[])],
         (ARRAY['upload', 'url', 'note'])[1 + g % 3], 'text/plain', 4000 * :chunks,
         sha256(convert_to(u.org_id::text || u.user_id::text || g::text, 'UTF8')), 'ready',
         :chunks, 60 * :chunks, now()
  FROM unnest(:org_ids::uuid[], :user_ids::uuid[]) AS u(org_id, user_id)
  CROSS JOIN generate_series(1, :per_user) AS g
  RETURNING org_id, id, user_id, title
), ins AS (
  INSERT INTO knowledge_chunks (org_id, document_id, user_id, seq, heading, content, token_count)
  SELECT d.org_id, d.id, d.user_id, s, d.title,
         (SELECT string_agg((:vocabulary::text[])[1 + floor(random() * cardinality(:vocabulary::text[]))::int], ' ')
          FROM generate_series(1, 40 + s % 20 + (d.id IS NULL)::int)),
         60
  FROM docs d CROSS JOIN generate_series(1, :chunks) AS s
  RETURNING 1
)
SELECT count(*) FROM ins;
