DROP TABLE organizations;
DROP FUNCTION app.touch_updated_at();
