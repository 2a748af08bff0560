-- Dropping a partitioned table drops its partitions (schema `partitions`) with it.
DROP TABLE execution_snapshots;
DROP TABLE node_executions;
DROP TABLE execution_transitions;
DROP TABLE executions;
DROP FUNCTION app.drop_partitions_before(date);
DROP FUNCTION app.ensure_partitions(integer, integer);
DROP FUNCTION app.secure_partition(regclass, regclass);
DROP FUNCTION app.executions_after_delete();
DROP FUNCTION app.executions_after_update();
DROP FUNCTION app.executions_after_insert();
DROP FUNCTION app.executions_guard();
DROP FUNCTION app.execution_retry_delay(integer, integer);
DROP FUNCTION app.execution_transition_allowed(text, text);
DROP SCHEMA partitions;
