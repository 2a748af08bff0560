-- Search (schema/0019_search.sql): tenant-scoped full-text search through app.search, a
-- SECURITY DEFINER function that filters by the context's organization and each kind's read
-- rule itself, so that the GIN indexes serve it (see the migration's header).

-- name: query :many
-- The best :limit matches of :text among :kinds, best first: prefix match of every word,
-- ranked with ts_rank_cd, with a highlighted snippet. With :fuzzy and no full-text match,
-- workflow and template names similar to the text (pg_trgm), fuzzy = true.
SELECT kind, id, title, snippet, rank, fuzzy, updated_at
FROM app.search(:text::text, :kinds::text[], :limit::integer, :fuzzy::boolean);

-- name: fuzzy_available :scalar
-- Whether pg_trgm and the trigram index are installed (asked once at start-up).
SELECT app.search_fuzzy_available();

-- name: tsquery :scalar
-- The tsquery app.search builds from :text (for tests and EXPLAIN), as text.
SELECT app.search_tsquery(:text::text)::text;
