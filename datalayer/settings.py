"""Settings, read once from the environment at start-up.

Every invalid value fails at start with one message naming the variable; production
refuses the defaults that are only safe on a developer's machine.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from datalayer.core.errors import ConfigError

__all__ = ["DEFAULT_DATABASE_URL", "Settings"]

Env = Literal["development", "testing", "production"]
ContextMode = Literal["session", "transaction"]
CacheBackend = Literal["redis", "memory", "postgres"]
RateLimitBackend = Literal["redis", "postgres", "memory"]

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a :class:`~datalayer.DataLayer` needs; build with :meth:`from_env` or directly."""

    database_url: str = DEFAULT_DATABASE_URL
    admin_url: str | None = None  # migrations; None → database_url
    redis_url: str | None = None
    env: Env = "development"
    pool_min_size: int = 2
    pool_max_size: int = 10
    statement_timeout_ms: int = 30_000
    acquire_timeout_s: float = 10.0
    connect_timeout_s: float = 15.0  # total budget for retries while the database comes up
    migrate_on_start: bool = True
    migration_lock_timeout_s: float = 60.0
    context_mode: ContextMode = "session"
    statement_cache_size: int = 512
    application_name: str = "datalayer"
    # Namespaces the Redis pub/sub channels the layer publishes to (notifications).
    channel_prefix: str = "datalayer:"
    cache_backend: CacheBackend | None = None  # None: redis when redis_url is set, else memory
    cache_max_bytes: int = 64 * 1024 * 1024  # memory backend budget (values, keys, overhead)
    cache_prefix: str = "dl:cache:"  # Redis key prefix
    cache_stats_interval_s: float = 60.0  # write cache_stats this often; 0 = never
    cache_lookups: bool = True  # read-through caching of hot repository lookups
    # Rate limiting (datalayer/ratelimit/limits.py documents the DATALAYER_RATE_LIMITS syntax).
    rate_limits: str = "default=100/1s burst 50"  # = ratelimit.DEFAULT_RATE_LIMITS
    ratelimit_backend: RateLimitBackend | None = None  # None: redis with REDIS_URL, else postgres
    ratelimit_timeout_ms: int = 200  # decide by the limit's fail mode after this long
    ratelimit_prefix: str = ""  # Redis key prefix (keys: <prefix>ratelimit:<key>)
    # Query metrics (datalayer/query_performance.py): in-process tracking, slow queries, exports.
    query_metrics: bool = True
    slow_query_ms: float = 200.0  # log (and sample) executions this slow; 0 = never
    query_sample_rate: float = 1.0  # share of slow executions written to query_performance
    query_buffer_max: int = 10_000  # slow samples waiting to be written; more are dropped
    otel_spans: bool = False  # an OpenTelemetry span per query (needs datalayer[otel])
    execution_retention_days: int = 0  # maintenance drops older execution partitions; 0 = keep
    # Search: the pg_trgm typo-tolerant fallback when the extension is installed.
    search_fuzzy: bool = True
    # "kid:base64key,…", the first one active. Secret: never in repr.
    keys: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name, url in (("DATABASE_URL", self.database_url), ("DATALAYER_ADMIN_URL",
                                                                  self.admin_url)):
            if url is not None:
                _check_url(name, url)
        if self.redis_url is not None and urlsplit(self.redis_url).scheme not in (
            "redis", "rediss", "unix"
        ):
            raise ConfigError("REDIS_URL must start with redis://, rediss:// or unix://")
        if self.env not in ("development", "testing", "production"):
            raise ConfigError("DATALAYER_ENV must be one of development, testing, production")
        if self.context_mode not in ("session", "transaction"):
            raise ConfigError("DATALAYER_CONTEXT_MODE must be 'session' or 'transaction'")
        if not 0 <= self.pool_min_size <= self.pool_max_size or self.pool_max_size < 1:
            raise ConfigError(
                "DATALAYER_POOL_MIN/DATALAYER_POOL_MAX: need 0 <= min <= max and max >= 1"
            )
        if self.statement_timeout_ms < 0:
            raise ConfigError("DATALAYER_STATEMENT_TIMEOUT_MS must be >= 0 (0 disables it)")
        for name, value in (("DATALAYER_ACQUIRE_TIMEOUT_S", self.acquire_timeout_s),
                            ("DATALAYER_CONNECT_TIMEOUT_S", self.connect_timeout_s),
                            ("DATALAYER_MIGRATION_LOCK_TIMEOUT_S",
                             self.migration_lock_timeout_s)):
            if value <= 0:
                raise ConfigError(f"{name} must be > 0 seconds")
        if self.keys is not None:
            parse_keys(self.keys)
        if self.cache_backend not in (None, "redis", "memory", "postgres"):
            raise ConfigError("DATALAYER_CACHE_BACKEND must be redis, memory or postgres")
        if self.cache_backend == "redis" and not self.redis_url:
            raise ConfigError("DATALAYER_CACHE_BACKEND=redis needs REDIS_URL")
        if self.cache_max_bytes < 1024:
            raise ConfigError("DATALAYER_CACHE_MAX_BYTES must be at least 1024")
        if not self.cache_prefix or len(self.cache_prefix) > 100 or any(
                c.isspace() for c in self.cache_prefix):
            raise ConfigError("DATALAYER_CACHE_PREFIX must be 1-100 characters, no spaces")
        if self.cache_stats_interval_s < 0:
            raise ConfigError("DATALAYER_CACHE_STATS_INTERVAL_S must be >= 0 (0 disables it)")
        if self.ratelimit_backend not in (None, "redis", "postgres", "memory"):
            raise ConfigError("DATALAYER_RATELIMIT_BACKEND must be redis, postgres or memory")
        if self.ratelimit_backend == "redis" and not self.redis_url:
            raise ConfigError("DATALAYER_RATELIMIT_BACKEND=redis needs REDIS_URL")
        if self.ratelimit_timeout_ms < 1:
            raise ConfigError("DATALAYER_RATELIMIT_TIMEOUT_MS must be >= 1")
        if len(self.ratelimit_prefix) > 100 or any(c.isspace() for c in self.ratelimit_prefix):
            raise ConfigError("DATALAYER_RATELIMIT_PREFIX must be at most 100 characters, "
                              "no spaces")
        if self.slow_query_ms < 0:
            raise ConfigError("DATALAYER_SLOW_QUERY_MS must be >= 0 (0 disables it)")
        if not 0 <= self.query_sample_rate <= 1:
            raise ConfigError("DATALAYER_QUERY_SAMPLE_RATE must be between 0 and 1")
        if self.execution_retention_days < 0:
            raise ConfigError("DATALAYER_EXECUTION_RETENTION_DAYS must be >= 0 (0 keeps all)")
        if self.query_buffer_max < 1:
            raise ConfigError("DATALAYER_QUERY_BUFFER_MAX must be >= 1")
        # Imported here: the ratelimit package imports modules that import this one.
        from datalayer.ratelimit.limits import parse_limits

        parse_limits(self.rate_limits)
        if self.env == "production":
            if not self.keys:
                raise ConfigError(
                    "DATALAYER_KEYS is required when DATALAYER_ENV=production "
                    "(format: kid:base64-32-byte-key[,kid:key…])"
                )
            if self.database_url == DEFAULT_DATABASE_URL:
                raise ConfigError(
                    "DATABASE_URL must be set explicitly when DATALAYER_ENV=production"
                )

    @property
    def migration_url(self) -> str:
        return self.admin_url or self.database_url

    @property
    def cache_backend_name(self) -> CacheBackend:
        """The cache backend in use: the setting, or redis when REDIS_URL is set, else memory."""
        if self.cache_backend is not None:
            return self.cache_backend
        return "redis" if self.redis_url else "memory"

    @property
    def ratelimit_backend_name(self) -> RateLimitBackend:
        """The rate-limit backend in use: the setting, or redis with REDIS_URL, else postgres."""
        if self.ratelimit_backend is not None:
            return self.ratelimit_backend
        return "redis" if self.redis_url else "postgres"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``); see the README's table."""
        e = os.environ if environ is None else environ
        env = e.get("DATALAYER_ENV", "development")
        default_url = DEFAULT_DATABASE_URL
        kwargs: dict[str, object] = {
            "database_url": e.get("DATABASE_URL") or default_url,
            "admin_url": e.get("DATALAYER_ADMIN_URL") or None,
            "redis_url": e.get("REDIS_URL") or None,
            "env": env,
            "keys": e.get("DATALAYER_KEYS") or None,
        }
        ints = {
            "pool_min_size": "DATALAYER_POOL_MIN",
            "pool_max_size": "DATALAYER_POOL_MAX",
            "statement_timeout_ms": "DATALAYER_STATEMENT_TIMEOUT_MS",
            "statement_cache_size": "DATALAYER_STATEMENT_CACHE_SIZE",
            "ratelimit_timeout_ms": "DATALAYER_RATELIMIT_TIMEOUT_MS",
            "cache_max_bytes": "DATALAYER_CACHE_MAX_BYTES",
            "query_buffer_max": "DATALAYER_QUERY_BUFFER_MAX",
            "execution_retention_days": "DATALAYER_EXECUTION_RETENTION_DAYS",
        }
        for attr, var in ints.items():
            if e.get(var):
                kwargs[attr] = _int(var, e[var])
        floats = {
            "acquire_timeout_s": "DATALAYER_ACQUIRE_TIMEOUT_S",
            "connect_timeout_s": "DATALAYER_CONNECT_TIMEOUT_S",
            "migration_lock_timeout_s": "DATALAYER_MIGRATION_LOCK_TIMEOUT_S",
            "cache_stats_interval_s": "DATALAYER_CACHE_STATS_INTERVAL_S",
            "slow_query_ms": "DATALAYER_SLOW_QUERY_MS",
            "query_sample_rate": "DATALAYER_QUERY_SAMPLE_RATE",
        }
        for attr, var in floats.items():
            if e.get(var):
                kwargs[attr] = _float(var, e[var])
        bools = {
            "migrate_on_start": "DATALAYER_MIGRATE_ON_START",
            "query_metrics": "DATALAYER_QUERY_METRICS",
            "otel_spans": "DATALAYER_OTEL_SPANS",
            "search_fuzzy": "DATALAYER_SEARCH_FUZZY",
            "cache_lookups": "DATALAYER_CACHE_LOOKUPS",
        }
        for attr, var in bools.items():
            if e.get(var):
                kwargs[attr] = _bool(var, e[var])
        texts = {
            "context_mode": "DATALAYER_CONTEXT_MODE",
            "cache_backend": "DATALAYER_CACHE_BACKEND",
            "cache_prefix": "DATALAYER_CACHE_PREFIX",
            "rate_limits": "DATALAYER_RATE_LIMITS",
            "ratelimit_backend": "DATALAYER_RATELIMIT_BACKEND",
            "ratelimit_prefix": "DATALAYER_RATELIMIT_PREFIX",
            "channel_prefix": "DATALAYER_CHANNEL_PREFIX",
            "application_name": "DATALAYER_APPLICATION_NAME",
        }
        for attr, var in texts.items():
            if e.get(var):
                kwargs[attr] = e[var]
        return cls(**kwargs)  # type: ignore[arg-type]


def parse_keys(text: str) -> list[tuple[str, bytes]]:
    """Parse ``DATALAYER_KEYS``: ``kid:base64key`` pairs, comma-separated, first is active."""
    keys: list[tuple[str, bytes]] = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        kid, sep, b64 = part.partition(":")
        if not sep or not kid or not kid.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"DATALAYER_KEYS entry {i + 1} must look like 'kid:base64key'")
        try:
            raw = base64.b64decode(b64, validate=True)
        except ValueError:
            raise ConfigError(f"DATALAYER_KEYS entry {i + 1} ({kid}) is not valid base64") from None
        if len(raw) != 32:
            raise ConfigError(
                f"DATALAYER_KEYS entry {i + 1} ({kid}) must decode to 32 bytes, not {len(raw)}"
            )
        if any(k == kid for k, _ in keys):
            raise ConfigError(f"DATALAYER_KEYS has key id {kid!r} twice")
        keys.append((kid, raw))
    return keys


def _check_url(var: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"{var} must be a postgresql:// URL")
    if not parts.hostname and "host=" not in (parts.query or ""):
        raise ConfigError(f"{var} must name a host (postgresql://user@host:port/db)")


def _int(var: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{var} must be an integer, got {value!r}") from None


def _float(var: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{var} must be a number, got {value!r}") from None


def _bool(var: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{var} must be true or false, got {value!r}")
