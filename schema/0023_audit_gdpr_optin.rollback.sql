-- Undo 0023_audit_gdpr_optin: the plugin, marketplace and DigiTwin tables leave change
-- capture and the personal-data registry.
CALL app.audit_uncapture('twin_models');
CALL app.audit_uncapture('marketplace_payouts');
CALL app.audit_uncapture('marketplace_purchases');
CALL app.audit_uncapture('plugin_installations');
CALL app.audit_uncapture('plugin_secrets');
CALL app.audit_uncapture('plugin_advisories');
CALL app.audit_uncapture('plugin_exemptions');
CALL app.audit_uncapture('plugin_approved_publishers');
CALL app.audit_uncapture('plugin_policies');
CALL app.audit_uncapture('plugin_approvals');
CALL app.audit_uncapture('plugin_approval_stages');
DELETE FROM app.personal_columns WHERE table_name IN (
  'marketplace_reviews', 'twin_models', 'conversation_sessions', 'conversation_turns',
  'knowledge_documents', 'knowledge_chunks')
  OR (table_name = 'users' AND column_name IN ('personality_traits', 'conversation_preferences'));
UPDATE app.personal_data
SET columns = array_remove(array_remove(columns, 'personality_traits'), 'conversation_preferences')
WHERE table_name = 'users' AND subject_column = 'id';
DELETE FROM app.personal_data_exempt WHERE table_name = 'plugin_approved_publishers';
DELETE FROM app.personal_data WHERE table_name IN (
  'plugins', 'plugin_versions', 'plugin_secrets', 'plugin_approvals', 'plugin_exemptions',
  'plugin_installations', 'plugin_deployments', 'marketplace_purchases', 'marketplace_reviews',
  'twin_models', 'conversation_sessions', 'conversation_turns', 'knowledge_documents',
  'knowledge_chunks', 'twin_usage');
