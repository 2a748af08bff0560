"""Redis backend: one EVALSHA per check; the script reads the server's clock (TIME).

The Lua script is ``memory.step`` line for line (integer microseconds; Lua numbers are
doubles, exact below 2**53, which ``Limit`` guarantees). A bucket is one string key
``<prefix>ratelimit:<key>`` holding ``level:at``, written only when a request passes
(a rejection changes nothing that cannot be recomputed), with a PX expiry at the moment
the bucket is full again, when a missing key means the same thing.

Scripts run atomically in Redis, so concurrent checks of one key are serialized there.
Keys beyond ``KEYS[1]`` are never touched: the script is Redis Cluster safe.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from datalayer.core.errors import DataLayerError, Timeout, Unavailable
from datalayer.ratelimit.limits import Limit, Outcome

__all__ = ["CHECK_SCRIPT", "RedisBackend"]

# Error replies about the server's state, not the script (a replica after a failover, out
# of memory, busy, …): decided by the fail mode. redis-py maps some to classes and passes
# the others on as ResponseError with the code first. (LOADING is a ConnectionError.)
_SERVER_STATE_ERRORS = (ReadOnlyError, OutOfMemoryError, TryAgainError, ClusterDownError)
_SERVER_STATES = ("READONLY", "OOM", "MASTERDOWN", "BUSY", "CLUSTERDOWN", "TRYAGAIN",
                  "MISCONF", "NOREPLICAS")

CHECK_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local full = tonumber(ARGV[2]) * interval
local need = tonumber(ARGV[3]) * interval
local level, at
local state = redis.call('GET', KEYS[1])
if state then
  local sep = string.find(state, ':', 1, true)
  level = tonumber(string.sub(state, 1, sep - 1))
  at = tonumber(string.sub(state, sep + 1))
  if at > now then now = at end
end
local ok, remaining, retry, reset
if ARGV[4] == '1' then
  local tat = level
  if tat == nil or tat < now then tat = now end
  ok = tat + need - now <= full
  if ok then tat = tat + need end
  level = tat
  remaining = math.floor((full - (tat - now)) / interval)
  if ok then retry = 0 else retry = tat + need - now - full end
  reset = tat - now
else
  if level == nil then level = full else level = math.min(full, level + now - at) end
  ok = level >= need
  if ok then level = level - need end
  remaining = math.floor(level / interval)
  if ok then retry = 0 else retry = need - level end
  reset = full - level
end
if ok then
  redis.call('SET', KEYS[1], string.format('%.0f:%.0f', level, now),
             'PX', math.floor(reset / 1000) + 1)
  return {1, remaining, retry, reset, now}
end
return {0, remaining, retry, reset, now}
"""


class RedisBackend:
    """Buckets in Redis, shared by every process that uses the same Redis and prefix."""

    name = "redis"

    def __init__(self, redis: str | aioredis.Redis, *, prefix: str = "",
                 timeout_s: float = 0.2) -> None:
        """``redis``: a URL (the backend opens its own client, with ``timeout_s`` for
        connecting and for each reply and no retries, so that an unreachable Redis is
        decided within ``timeout_s``) or a client you own (its timeouts apply)."""
        if isinstance(redis, str):
            self._client = aioredis.Redis.from_url(
                redis, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
            self._owned = True
        else:
            self._client = redis
            self._owned = False
        self._prefix = f"{prefix}ratelimit:"
        self._script = self._client.register_script(CHECK_SCRIPT)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def check(self, key: str, limit: Limit, cost: int) -> Outcome:
        try:
            r = await self._script(keys=[self._prefix + key],
                                   args=[limit.interval_us, limit.capacity, cost,
                                         1 if limit.algorithm == "gcra" else 0])
        except (RedisTimeoutError, TimeoutError) as exc:
            raise Timeout("Redis did not answer the rate-limit check in time") from exc
        except (RedisConnectionError, OSError) as exc:
            raise Unavailable("Redis is unreachable for the rate-limit check") from exc
        except RedisError as exc:
            if isinstance(exc, _SERVER_STATE_ERRORS) or str(exc).startswith(_SERVER_STATES):
                raise Unavailable("Redis cannot run the rate-limit check now "
                                  f"({type(exc).__name__})") from exc
            raise DataLayerError(f"the rate-limit script failed: {type(exc).__name__}") from exc
        return Outcome(r[0] == 1, r[1], r[2], r[3], r[4])

    async def close(self) -> None:
        if self._owned:
            await self._client.aclose()
