-- depends: 0022_digitwin
-- The plugin, marketplace and DigiTwin tables (0020-0022) join the audit trail's change
-- capture (0015) and the GDPR personal-data registry (0016), which were built at the same
-- time and could not name them. Hot, append-only or derived tables (usage events and their
-- roll-ups, conversation turns, knowledge chunks, usage meters) are not captured: an auditor
-- needs who changed what configuration, not every event; they are in the registry so export
-- and erasure reach them.

-- Personal data: who the rows are about and what erasure does with them.
INSERT INTO app.personal_data (table_name, subject_column, org_column, columns, secret_columns,
                               erase_action, note) VALUES
  ('plugins', 'created_by', 'org_id', '{}', '{}', 'keep', 'plugins the user published'),
  ('plugin_versions', 'created_by', 'org_id', '{}', '{}', 'keep', 'versions the user published'),
  ('plugin_secrets', 'created_by', 'org_id', '{}', '{secret}', 'keep',
   'plugin secrets the user set (never exported)'),
  ('plugin_approvals', 'decided_by', 'org_id', '{}', '{}', 'keep',
   'approval decisions the user made (governance record)'),
  ('plugin_exemptions', 'approved_by', 'org_id', '{}', '{}', 'keep',
   'policy exemptions the user approved (governance record)'),
  ('plugin_installations', 'installed_by', 'org_id', '{}', '{}', 'keep',
   'installations the user made'),
  ('plugin_deployments', 'deployed_by', 'org_id', '{}', '{}', 'keep', 'deployments the user made'),
  ('marketplace_purchases', 'bought_by', 'org_id', '{}', '{}', 'keep',
   'purchases the user made (financial record, kept for accounting)'),
  ('marketplace_reviews', 'user_id', 'reviewer_org_id', '{body}', '{}', 'delete',
   'reviews the user wrote (the listing''s rating aggregate follows by trigger)'),
  ('twin_models', 'user_id', 'org_id', '{name, storage_uri, quality_metrics, training_params, error}',
   '{}', 'delete', 'voice and face models (biometric): the rows go; the artifacts behind '
   'storage_uri must be deleted from object storage by the caller'),
  ('conversation_sessions', 'user_id', 'org_id', '{title, metadata}', '{}', 'delete',
   'conversation sessions; their turns go with them'),
  ('conversation_turns', 'user_id', 'org_id', '{input_text, response_text}', '{}', 'delete',
   'what the user said and what the twin answered'),
  ('knowledge_documents', 'user_id', 'org_id', '{title, source_uri, content, error}', '{}',
   'delete', 'the user''s knowledge documents; chunks go with them'),
  ('knowledge_chunks', 'user_id', 'org_id', '{heading, content}', '{}', 'delete',
   'segments of the user''s documents'),
  ('twin_usage', 'user_id', 'org_id', '{}', '{}', 'delete', 'the user''s usage meters');

INSERT INTO app.personal_data_exempt (table_name, column_name, reason) VALUES
  ('plugin_approved_publishers', 'added_by',
   'who allow-listed a publisher: the row is about the publishing organization');

-- Users' DigiTwin profile columns are personal too (the users row is anonymized on erasure).
UPDATE app.personal_data
SET columns = columns || '{personality_traits, conversation_preferences}'::text[]
WHERE table_name = 'users' AND subject_column = 'id'
  AND NOT columns @> '{personality_traits}';

-- Keep personal columns out of before/after of change rows (see 0016).
INSERT INTO app.personal_columns (table_name, column_name)
SELECT DISTINCT p.table_name, c
FROM app.personal_data p CROSS JOIN LATERAL unnest(p.columns) AS c
WHERE c <> ALL (p.secret_columns)
  AND NOT EXISTS (SELECT 1 FROM app.secret_columns s
                  WHERE s.table_name = p.table_name AND s.column_name = c)
ON CONFLICT DO NOTHING;

-- Change capture: governance and configuration. Not plugins, plugin_versions and
-- marketplace_listings: the quality-score job and review aggregates rewrite them in bulk, and
-- capture costs one chained insert per row (a follow-up: skip rows whose only changes are in
-- app.audit_omit_columns). Not plugin_deployments: it is a history itself. Not the
-- conversation, knowledge and usage tables: hot paths.
CALL app.audit_capture('plugin_approval_stages');
CALL app.audit_capture('plugin_approvals');
CALL app.audit_capture('plugin_policies');
CALL app.audit_capture('plugin_approved_publishers');
CALL app.audit_capture('plugin_exemptions');
CALL app.audit_capture('plugin_advisories');
CALL app.audit_capture('plugin_secrets');
CALL app.audit_capture('plugin_installations');
CALL app.audit_capture('marketplace_purchases');
CALL app.audit_capture('marketplace_payouts');
CALL app.audit_capture('twin_models');
