DROP POLICY users_select ON users;
DROP TABLE team_members;
DROP TABLE teams;
DROP TABLE memberships;
DROP FUNCTION app.memberships_keep_an_owner();
DROP TABLE users;
DROP FUNCTION app.is_owner();
