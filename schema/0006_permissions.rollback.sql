DROP FUNCTION app.role_allows(text, text, text);
