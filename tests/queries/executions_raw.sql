-- Test-only: raw writes to executions that bypass the repository (the state machine must
-- still hold, because it lives in the database).

-- name: set_status :execrows
UPDATE executions SET status = :status WHERE org_id = app.org_id() AND id = :id;
