DROP TABLE rate_limit_violations;
DROP FUNCTION app.rate_limit_check(text, boolean, bigint, bigint, bigint);
DROP TABLE rate_limit_buckets;
