"""Settings from the environment: defaults, parsing, and one clear error per bad value."""

from __future__ import annotations

import base64

import pytest

from datalayer import ConfigError, Settings
from datalayer.settings import DEFAULT_DATABASE_URL, parse_keys

KEY = base64.b64encode(bytes(range(32))).decode()


def test_defaults_for_development() -> None:
    s = Settings.from_env({})
    assert (s.database_url, s.env, s.context_mode, s.migrate_on_start) == (
        DEFAULT_DATABASE_URL, "development", "session", True)
    assert s.migration_url == s.database_url


def test_every_variable_is_read() -> None:
    s = Settings.from_env({
        "DATABASE_URL": "postgresql://app@db:5432/x",
        "DATALAYER_ADMIN_URL": "postgresql://admin@db:5432/x",
        "REDIS_URL": "redis://r:6379/1",
        "DATALAYER_ENV": "production",
        "DATALAYER_KEYS": f"k1:{KEY}",
        "DATALAYER_POOL_MIN": "1", "DATALAYER_POOL_MAX": "20",
        "DATALAYER_STATEMENT_TIMEOUT_MS": "5000",
        "DATALAYER_ACQUIRE_TIMEOUT_S": "2.5",
        "DATALAYER_CONNECT_TIMEOUT_S": "30",
        "DATALAYER_MIGRATE_ON_START": "false",
        "DATALAYER_MIGRATION_LOCK_TIMEOUT_S": "5",
        "DATALAYER_CONTEXT_MODE": "transaction",
        "DATALAYER_CHANNEL_PREFIX": "svc:",
    })
    assert s.channel_prefix == "svc:"
    assert s.migration_url == "postgresql://admin@db:5432/x"
    assert (s.pool_min_size, s.pool_max_size, s.statement_timeout_ms) == (1, 20, 5000)
    assert (s.acquire_timeout_s, s.connect_timeout_s, s.migration_lock_timeout_s) == (2.5, 30, 5)
    assert (s.migrate_on_start, s.context_mode, s.redis_url) == (
        False, "transaction", "redis://r:6379/1")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "mysql://x@y/z"}, "DATABASE_URL must be a postgresql:// URL"),
        ({"DATALAYER_ADMIN_URL": "postgresql:///x"}, "DATALAYER_ADMIN_URL must name a host"),
        ({"REDIS_URL": "http://r"}, "REDIS_URL must start with"),
        ({"DATALAYER_ENV": "staging"}, "DATALAYER_ENV must be one of"),
        ({"DATALAYER_POOL_MAX": "ten"}, "DATALAYER_POOL_MAX must be an integer, got 'ten'"),
        ({"DATALAYER_POOL_MIN": "5", "DATALAYER_POOL_MAX": "2"}, "need 0 <= min <= max"),
        ({"DATALAYER_STATEMENT_TIMEOUT_MS": "-1"}, "DATALAYER_STATEMENT_TIMEOUT_MS must be >= 0"),
        ({"DATALAYER_ACQUIRE_TIMEOUT_S": "0"}, "DATALAYER_ACQUIRE_TIMEOUT_S must be > 0"),
        ({"DATALAYER_MIGRATE_ON_START": "maybe"}, "DATALAYER_MIGRATE_ON_START must be true or"),
        ({"DATALAYER_CONTEXT_MODE": "pooled"}, "DATALAYER_CONTEXT_MODE must be"),
        ({"DATALAYER_KEYS": "nokey"}, "DATALAYER_KEYS entry 1 must look like"),
        ({"DATALAYER_KEYS": "k1:!!!"}, "DATALAYER_KEYS entry 1 (k1) is not valid base64"),
        ({"DATALAYER_KEYS": "k1:" + base64.b64encode(b"short").decode()}, "must decode to 32"),
        ({"DATALAYER_KEYS": f"k1:{KEY},k1:{KEY}"}, "key id 'k1' twice"),
        ({"DATALAYER_ENV": "production", "DATABASE_URL": "postgresql://a@b/c"},
         "DATALAYER_KEYS is required when DATALAYER_ENV=production"),
        ({"DATALAYER_ENV": "production", "DATALAYER_KEYS": f"k1:{KEY}"},
         "DATABASE_URL must be set explicitly"),
    ],
)
def test_invalid_values_fail_with_one_message_naming_the_variable(
    env: dict[str, str], message: str,
) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env(env)
    assert message in str(err.value)


def test_keys_never_appear_in_repr() -> None:
    s = Settings.from_env({"DATALAYER_KEYS": f"k1:{KEY}"})
    assert KEY not in repr(s)
    assert parse_keys(f"k1:{KEY}, k2:{KEY}") == [("k1", bytes(range(32))),
                                                 ("k2", bytes(range(32)))]


def test_query_metrics_settings_are_read_and_checked() -> None:
    s = Settings.from_env({"DATALAYER_SLOW_QUERY_MS": "50", "DATALAYER_QUERY_SAMPLE_RATE": "0.25",
                           "DATALAYER_QUERY_BUFFER_MAX": "7", "DATALAYER_QUERY_METRICS": "false",
                           "DATALAYER_OTEL_SPANS": "true"})
    assert (s.slow_query_ms, s.query_sample_rate, s.query_buffer_max, s.query_metrics,
            s.otel_spans) == (50.0, 0.25, 7, False, True)
    with pytest.raises(ConfigError, match="DATALAYER_QUERY_SAMPLE_RATE"):
        Settings.from_env({"DATALAYER_QUERY_SAMPLE_RATE": "1.5"})
    with pytest.raises(ConfigError, match="DATALAYER_SLOW_QUERY_MS"):
        Settings.from_env({"DATALAYER_SLOW_QUERY_MS": "-1"})
