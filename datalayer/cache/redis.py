"""Redis cache backend (``redis.asyncio``): entries, tag sets and versions under one prefix.

Keys, for prefix ``P`` and full key ``ns:key``:

* ``P e:ns:key``   the entry (PX = its TTL)
* ``P t:<tag>``    set of entry keys carrying the tag (TTL stretched to its longest member)
* ``P v:<tag>``    the clock value of the tag's last invalidation (PX = VERSION_TTL_S)
* ``P l:ns:key``   the load lease (a random token, PX = the lease time)
* ``P n:ns:key``   counters (``incr``)
* ``P clock``      the invalidation clock (INCR per invalidation)

Every multi-key step is one Lua script, so a value and its tag memberships, and an
invalidation's version bump and deletions, are atomic. Scripts touch keys they derive
(tag members), so this backend targets a single Redis (or a primary with replicas), not
Redis Cluster. Reads and writes are one round trip each; a failed or timed-out command
raises :class:`BackendUnavailable` at once (no client retries: the cache degrades instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from datalayer.cache._backend import (
    VERSION_TTL_S,
    BackendBusy,
    BackendUnavailable,
    Item,
    Lease,
    ReadBatcher,
    guard_tags,
    key_tag,
    ns_tag,
)

__all__ = ["RedisBackend"]

_FAILURES = (RedisError, OSError, TimeoutError)


class _PoolExhausted(Exception):
    pass


class _Pool(aioredis.BlockingConnectionPool):
    """Tells "no free connection in time" (local overload) apart from Redis failing."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisError as exc:
            if isinstance(exc.__cause__, TimeoutError):
                raise _PoolExhausted from exc
            raise


def _unavailable(exc: BaseException) -> BackendUnavailable:
    if isinstance(exc, _PoolExhausted):
        return BackendBusy("Redis: no free connection")
    return BackendUnavailable(f"Redis: {type(exc).__name__}")


_ERRORS = (*_FAILURES, _PoolExhausted)
_VERSION_TTL_MS = int(VERSION_TTL_S * 1000)

# KEYS: entry, lease, tag sets (nt), guard version keys (ng)
# ARGV: value, ttl_ms, nt, ng, lease token ('' none), since ('' unguarded)
_STORE = """
local nt, ng = tonumber(ARGV[3]), tonumber(ARGV[4])
local ok = 1
if ARGV[6] ~= '' then
  local since = tonumber(ARGV[6])
  for i = 1, ng do
    local v = redis.call('GET', KEYS[2 + nt + i])
    if v and tonumber(v) > since then ok = 0 break end
  end
end
if ok == 1 then
  local ttl = tonumber(ARGV[2])
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
  for i = 1, nt do
    local t = KEYS[2 + i]
    redis.call('SADD', t, KEYS[1])
    if redis.call('PTTL', t) < ttl then redis.call('PEXPIRE', t, ttl) end
  end
end
if ARGV[5] ~= '' and redis.call('GET', KEYS[2]) == ARGV[5] then redis.call('DEL', KEYS[2]) end
return ok
"""

# KEYS: clock, then n tag-set keys, then n version keys (tag sets of pseudo-tags are empty)
# ARGV: version ttl ms, then n entry keys to delete outright
_INVALIDATE = """
local n = (#KEYS - 1) / 2
local c = redis.call('INCR', KEYS[1])
local removed = 0
for i = 1, n do
  redis.call('SET', KEYS[1 + n + i], c, 'PX', ARGV[1])
  local members = redis.call('SMEMBERS', KEYS[1 + i])
  for _, k in ipairs(members) do removed = removed + redis.call('DEL', k) end
  redis.call('DEL', KEYS[1 + i])
end
for i = 2, #ARGV do removed = removed + redis.call('DEL', ARGV[i]) end
return removed
"""

# KEYS: entry, lease, clock. ARGV: token, ttl_ms, if_absent ('1'/'0')
_LEASE = """
local c = tonumber(redis.call('GET', KEYS[3]) or '0')
if ARGV[3] == '1' then
  local v = redis.call('GET', KEYS[1])
  if v then return {1, c, v} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, c} end
return {0, c}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_INCR = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class RedisBackend:
    """Entries under ``prefix`` in the Redis at ``url``. The backend owns its client, with
    cache-sized timeouts (``timeout_s`` per command and connect) and no client retries."""

    name = "redis"

    def __init__(self, url: str, *, prefix: str = "dl:cache:", timeout_s: float = 0.5,
                 max_connections: int = 64) -> None:
        self.prefix = prefix
        # A blocking pool: a burst of concurrent calls waits for one of max_connections
        # (up to 4 x timeout_s, then BackendBusy) instead of failing at once.
        pool = _Pool.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), max_connections=max_connections,
            timeout=max(1.0, 4 * timeout_s))
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._e = prefix + "e:"
        self._clock_key = prefix + "clock"
        c = self.client
        self._store = c.register_script(_STORE)
        self._invalidate = c.register_script(_INVALIDATE)
        self._lease = c.register_script(_LEASE)
        self._release = c.register_script(_RELEASE)
        self._incr = c.register_script(_INCR)
        self._reads = ReadBatcher(self._get_one, self.get_many)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except _ERRORS as exc:
            raise _unavailable(exc) from exc

    async def _run(self, coro: Any) -> Any:
        try:
            return await coro
        except _ERRORS as exc:
            raise _unavailable(exc) from exc

    # -- reads ----------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        """One GET; concurrent gets share an MGET (:class:`ReadBatcher`)."""
        return await self._reads.get(key)

    async def _get_one(self, key: str) -> bytes | None:
        try:
            value: Any = await self.client.get(self._e + key)
        except _ERRORS as exc:
            raise _unavailable(exc) from exc
        return value  # type: ignore[no-any-return]

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        values: list[bytes | None] = await self._run(
            self.client.mget([self._e + k for k in keys]))
        return values

    # -- writes ---------------------------------------------------------------------------
    def _store_args(self, key: str, value: bytes, ttl_ms: int, tags: Sequence[str],
                    since: int | None, lease_token: str | None,
                    ) -> tuple[list[str], list[Any]]:
        p = self.prefix
        guards = guard_tags(key, tags) if since is not None else []
        keys = [self._e + key, p + "l:" + key, *(p + "t:" + t for t in tags),
                *(p + "v:" + t for t in guards)]
        args: list[Any] = [value, max(1, ttl_ms), len(tags), len(guards), lease_token or "",
                           "" if since is None else since]
        return keys, args

    async def store(self, key: str, value: bytes, ttl_ms: int, tags: Sequence[str], *,
                    since: int | None = None, lease_token: str | None = None) -> bool:
        keys, args = self._store_args(key, value, ttl_ms, tags, since, lease_token)
        return bool(await self._run(self._store(keys=keys, args=args)))

    async def store_many(self, items: Sequence[Item]) -> None:
        if not items:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for it in items:
                keys, args = self._store_args(it.key, it.value, it.ttl_ms, it.tags, None, None)
                await self._store(keys=keys, args=args, client=pipe)
            await self._run(pipe.execute())

    async def _bump(self, tags: Sequence[str], delete: Sequence[str] = ()) -> int:
        p = self.prefix
        keys = [self._clock_key, *(p + "t:" + t for t in tags), *(p + "v:" + t for t in tags)]
        args: list[Any] = [_VERSION_TTL_MS, *(self._e + k for k in delete)]
        return int(await self._run(self._invalidate(keys=keys, args=args)))

    async def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        return await self._bump([key_tag(k) for k in keys], keys)

    async def invalidate(self, tags: Sequence[str]) -> int:
        if not tags:
            return 0
        return await self._bump(tags)

    async def clear(self, namespace: str) -> int:
        """Bump the namespace's version (in-flight loads will not store), then unlink its
        entries and counters in batches (SCAN: does not block Redis)."""
        await self._bump([ns_tag(namespace)])
        removed = 0
        for kind in ("e:", "n:"):
            batch: list[bytes] = []
            pattern = f"{self.prefix}{kind}{_glob_escape(namespace)}:*"
            try:
                async for k in self.client.scan_iter(match=pattern, count=1000):
                    batch.append(k)
                    if len(batch) >= 1000:
                        removed += await self.client.unlink(*batch)
                        batch.clear()
                if batch:
                    removed += await self.client.unlink(*batch)
            except _FAILURES as exc:
                raise BackendUnavailable(f"Redis: {type(exc).__name__}") from exc
        return removed

    # -- leases, clock, counters ------------------------------------------------------------
    async def lease(self, key: str, token: str, ttl_ms: int, *, if_absent: bool) -> Lease:
        out = await self._run(self._lease(
            keys=[self._e + key, self.prefix + "l:" + key, self._clock_key],
            args=[token, max(1, ttl_ms), "1" if if_absent else "0"]))
        kind, clock = int(out[0]), int(out[1])
        if kind == 1:
            return Lease(out[2], False, clock)
        return Lease(None, kind == 2, clock)

    async def release(self, key: str, token: str) -> None:
        await self._run(self._release(keys=[self.prefix + "l:" + key], args=[token]))

    async def clock(self) -> int:
        value = await self._run(self.client.get(self._clock_key))
        return int(value or 0)

    async def incr(self, key: str, ttl_ms: int) -> int:
        return int(await self._run(self._incr(keys=[self.prefix + "n:" + key],
                                              args=[max(1, ttl_ms)])))

    def evictions(self) -> Mapping[str, int]:
        return {}  # Redis evicts by its own policy; see INFO stats evicted_keys

    async def maintain(self) -> None:
        pass  # Redis expires keys itself


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
