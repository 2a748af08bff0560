DROP FUNCTION app.search_fuzzy_available();
DROP FUNCTION app.search(text, text[], integer, boolean);
DROP VIEW app.search_documents;
DROP FUNCTION app.search_tsquery(text);
DROP INDEX IF EXISTS workflows_name_trgm_idx;
DROP INDEX notifications_search_idx;
DROP INDEX executions_error_search_idx;
DROP INDEX workflows_template_search_idx;
DROP INDEX workflows_search_idx;
CREATE INDEX workflows_search_idx ON workflows USING gin (search);
ALTER TABLE notifications DROP COLUMN search;
ALTER TABLE executions DROP COLUMN error_search;
-- The extensions stay: other objects may have come to depend on them.
