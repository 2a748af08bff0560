"""Rate limiting: token bucket and GCRA on Redis, PostgreSQL or memory, exact under concurrency.

``dl.limiter`` is configured from settings (``DATALAYER_RATE_LIMITS``,
``DATALAYER_RATELIMIT_BACKEND``, ``DATALAYER_RATELIMIT_TIMEOUT_MS``)::

    decision = await dl.limiter.check("login", ip=request_ip, user_id=user.id)
    await dl.limiter.enforce("api", org_id=ctx.org_id)   # raises RateLimited(retry_after=…)

Each backend decides with one atomic operation on its own clock (Lua script with TIME,
one UPSERT with ``clock_timestamp()``, the event loop); client clocks never matter.
"""

from datalayer.ratelimit.backend import Backend
from datalayer.ratelimit.limiter import Limiter, build_key
from datalayer.ratelimit.limits import (
    ALGORITHMS,
    DEFAULT_RATE_LIMITS,
    DIMENSIONS,
    Algorithm,
    Decision,
    Dimension,
    Limit,
    Outcome,
    parse_limits,
)
from datalayer.ratelimit.memory import MemoryBackend
from datalayer.ratelimit.postgres import PostgresBackend, sweep_buckets
from datalayer.ratelimit.redis import RedisBackend
from datalayer.ratelimit.violations import (
    PostgresViolationStore,
    Violation,
    ViolationHook,
    Violations,
    ViolationStore,
)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_RATE_LIMITS",
    "DIMENSIONS",
    "Algorithm",
    "Backend",
    "Decision",
    "Dimension",
    "Limit",
    "Limiter",
    "MemoryBackend",
    "Outcome",
    "PostgresBackend",
    "PostgresViolationStore",
    "RedisBackend",
    "Violation",
    "ViolationHook",
    "ViolationStore",
    "Violations",
    "build_key",
    "parse_limits",
    "sweep_buckets",
]
