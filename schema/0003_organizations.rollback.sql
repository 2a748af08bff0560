DROP TABLE organizations;
DROP FUNCTION app.organizations_guard();
DROP FUNCTION app.touch_updated_at();
