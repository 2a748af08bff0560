"""Web sessions: the login state of a browser, in Redis or, without Redis, in PostgreSQL.

Not database sessions (``dl.session``): a web session is what a cookie points at. The
token is 256 random bits (``secrets.token_urlsafe(32)``) that only the client holds;
both stores keep its sha256 and nothing else, so a dump of Redis or of the table does
not hold one usable token.

* Redis (when configured): a hash ``<prefix>session:<sha256 hex>`` (user, data, created,
  idle timeout, expiry, absolute limit) whose key expiry slides by the idle timeout on
  every touch (PEXPIRE), never past the absolute lifetime, and a set
  ``<prefix>session_user:<user id>`` per user for revoking them all. Each operation is one
  Lua script (atomic, on the server's clock). The scripts reach keys they derive from
  the set, so they assume one Redis (or Sentinel), not a Redis Cluster.
* PostgreSQL: ``web_sessions`` (``schema/0011_web_sessions.sql``), reached only through
  SECURITY DEFINER functions on the service pool, one round trip each. The expiry is
  written only when it would move by more than min(idle / 20, 1 minute).

Sessions belong to users, who are global, so neither store is per tenant; the
organization a request acts for is chosen per request (and may be kept in ``data``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from datalayer.core.errors import DataLayerError, Unavailable, ValidationError, translate

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = ["NewWebSession", "WebSession", "WebSessions", "hash_token"]

_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # token_urlsafe(32)
MAX_DATA_BYTES = 16 * 1024

_CREATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local idle = tonumber(ARGV[3])
local max_age = tonumber(ARGV[4])
local ttl = math.min(idle, max_age)
redis.call('HSET', KEYS[1], 'u', ARGV[1], 'd', ARGV[2], 'c', string.format('%.0f', now),
           'm', string.format('%.0f', now + max_age), 'i', ARGV[3],
           'e', string.format('%.0f', now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[6] .. m) == 0 then redis.call('SREM', KEYS[2], m) end
end
redis.call('SADD', KEYS[2], ARGV[5])
if redis.call('PTTL', KEYS[2]) < max_age then redis.call('PEXPIRE', KEYS[2], max_age) end
return {now, now + ttl, now + max_age}
"""

_GET = """
local v = redis.call('HMGET', KEYS[1], 'u', 'd', 'c', 'm', 'i', 'e')
if not v[1] then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_at = tonumber(v[4])
if now >= max_at then return false end
if ARGV[1] == '1' then
  local ttl = math.min(tonumber(v[5]), max_at - now)
  redis.call('PEXPIRE', KEYS[1], ttl)
  v[6] = string.format('%.0f', now + ttl)
  redis.call('HSET', KEYS[1], 'e', v[6])
end
return {v[1], v[2], v[3], v[4], v[6]}
"""

_REVOKE = """
local u = redis.call('HGET', KEYS[1], 'u')
if not u then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', ARGV[1] .. u, ARGV[2])
return 1
"""

_REVOKE_USER = """
local n = 0
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  n = n + redis.call('DEL', ARGV[1] .. m)
end
redis.call('DEL', KEYS[1])
return n
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class WebSession:
    """A live web session. ``expires_at`` slides; ``max_expires_at`` does not."""

    user_id: uuid.UUID
    data: dict[str, Any]
    created_at: datetime
    expires_at: datetime
    max_expires_at: datetime


@dataclass(frozen=True, slots=True)
class NewWebSession:
    """A created session: ``token`` goes to the client (a cookie) once; it is not stored."""

    session: WebSession
    token: str = field(repr=False)


def hash_token(token: str) -> bytes:
    """What the stores keep and look up: sha256 of the token text."""
    return hashlib.sha256(token.encode()).digest()


def _ms(value: Any) -> datetime:
    return datetime.fromtimestamp(int(value) / 1000, UTC)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value  # decode_responses either way


class WebSessions:
    """Create, get (sliding the expiry), touch, revoke, and revoke all of a user's sessions.

    ``store="auto"`` uses Redis when ``redis`` is given or ``REDIS_URL`` is set (through
    ``dl.redis``), else PostgreSQL. Every call is one round trip.
    """

    def __init__(self, dl: DataLayer, *, store: Literal["auto", "redis", "postgres"] = "auto",
                 redis: aioredis.Redis | None = None, prefix: str = "",
                 idle_timeout_s: float = 30 * 60, max_age_s: float = 7 * 86400) -> None:
        if store not in ("auto", "redis", "postgres"):
            raise ValidationError("store must be auto, redis or postgres")
        if store == "auto":
            store = "redis" if redis is not None or dl.settings.redis_url else "postgres"
        if store == "redis" and redis is None and not dl.settings.redis_url:
            raise ValidationError("the redis web-session store needs REDIS_URL or a client")
        _check_timeouts(idle_timeout_s, max_age_s)
        self._dl = dl
        self.store: Literal["redis", "postgres"] = store
        self._client = redis
        self._prefix = f"{prefix}session:"
        self._user_prefix = f"{prefix}session_user:"
        self.idle_timeout_s = idle_timeout_s
        self.max_age_s = max_age_s
        self._scripts: dict[str, Any] = {}

    # -- API ------------------------------------------------------------------------------
    async def create(self, user_id: uuid.UUID, data: Mapping[str, Any] | None = None, *,
                     idle_timeout_s: float | None = None,
                     max_age_s: float | None = None) -> NewWebSession:
        """A new session for ``user_id`` (a JSON object of ``data``, at most 16 KiB)."""
        if not isinstance(user_id, uuid.UUID):
            raise ValidationError("user_id must be a UUID")
        idle = self.idle_timeout_s if idle_timeout_s is None else idle_timeout_s
        max_age = self.max_age_s if max_age_s is None else max_age_s
        _check_timeouts(idle, max_age)
        body = dict(data or {})
        try:
            raw = orjson.dumps(body)
        except TypeError as exc:
            raise ValidationError(f"session data must be JSON-serializable: {exc}") from None
        if len(raw) > MAX_DATA_BYTES:
            raise ValidationError(f"session data is over {MAX_DATA_BYTES} bytes")
        token = secrets.token_urlsafe(32)
        digest = hash_token(token)
        if self.store == "redis":
            member = digest.hex()
            r = await self._redis("create", _CREATE, [self._prefix + member,
                                                      f"{self._user_prefix}{user_id}"],
                                  [str(user_id), raw, int(idle * 1000), int(max_age * 1000),
                                   member, self._prefix])
            created, expires, max_at = _ms(r[0]), _ms(r[1]), _ms(r[2])
        else:
            row = await self._pg("web_sessions.create", id_hash=digest, user_id=user_id,
                                 data=body, idle_s=float(idle), max_age_s=float(max_age))
            created, expires, max_at = row["created_at"], row["expires_at"], \
                row["max_expires_at"]
        return NewWebSession(WebSession(user_id=user_id, data=body, created_at=created,
                                        expires_at=expires, max_expires_at=max_at), token)

    async def get(self, token: str, *, touch: bool = True) -> WebSession | None:
        """The live session of ``token``, or None (unknown, revoked, expired, malformed).
        With ``touch`` (the default) its expiry slides by the idle timeout."""
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            return None
        digest = hash_token(token)
        if self.store == "redis":
            r = await self._redis("get", _GET, [self._prefix + digest.hex()],
                                  ["1" if touch else "0"])
            if r is None:
                return None
            return WebSession(user_id=uuid.UUID(_text(r[0])), data=orjson.loads(r[1]),
                              created_at=_ms(r[2]), expires_at=_ms(r[4]),
                              max_expires_at=_ms(r[3]))
        row = await self._pg("web_sessions.get", id_hash=digest, touch=touch)
        if row is None:
            return None
        return WebSession(user_id=row["user_id"], data=row["data"],
                          created_at=row["created_at"], expires_at=row["expires_at"],
                          max_expires_at=row["max_expires_at"])

    async def touch(self, token: str) -> datetime | None:
        """Slide the expiry of a live session; its new expiry, or None if it is not live."""
        session = await self.get(token, touch=True)
        return None if session is None else session.expires_at

    async def revoke(self, token: str) -> bool:
        """End one session (sign out); True if it was live."""
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            return False
        digest = hash_token(token)
        if self.store == "redis":
            member = digest.hex()
            n = await self._redis("revoke", _REVOKE, [self._prefix + member],
                                  [self._user_prefix, member])
            return bool(n)
        return bool(await self._pg("web_sessions.revoke", id_hash=digest, scalar=True))

    async def revoke_all_for_user(self, user_id: uuid.UUID) -> int:
        """End every session of ``user_id`` (sign out everywhere, password change,
        suspension); how many were live."""
        if not isinstance(user_id, uuid.UUID):
            raise ValidationError("user_id must be a UUID")
        if self.store == "redis":
            n = await self._redis("revoke_user", _REVOKE_USER,
                                  [f"{self._user_prefix}{user_id}"], [self._prefix])
            return int(n)
        return int(await self._pg("web_sessions.revoke_user", user_id=user_id, scalar=True))

    async def sweep(self) -> int:
        """Delete expired sessions from the PostgreSQL store (as the maintenance role);
        Redis expires its keys itself. Returns how many were deleted."""
        if self.store == "redis":
            return 0
        async with self._dl.system() as db:
            return await db.execrows("web_sessions.sweep")

    # -- stores ---------------------------------------------------------------------------
    async def _redis(self, name: str, lua: str, keys: list[str], args: list[Any]) -> Any:
        client = self._client or self._dl.redis
        if client is None:
            raise Unavailable("Redis is not connected (start the DataLayer first)")
        script = self._scripts.get(name)
        if script is None or script.registered_client is not client:
            script = self._scripts[name] = client.register_script(lua)
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise Unavailable(f"web sessions: Redis failed ({type(exc).__name__})") from exc

    async def _pg(self, name: str, *, scalar: bool = False, **params: object) -> Any:
        q = self._dl.registry[name]
        args = q.bind(params)
        pool = self._dl.service_pool
        conn = await pool.acquire(self._dl.settings.acquire_timeout_s)
        metrics = self._dl.metrics
        t0 = time.perf_counter_ns()
        try:
            if scalar:
                result = await conn.fetchval(q.sql, *args)
            else:
                result = await conn.fetchrow(q.sql, *args)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            metrics.failed(name, t0, exc)
            raise (translate(exc, name) or DataLayerError(f"{name}: {exc}")) from exc
        finally:
            await pool.release(conn)
        metrics.record(name, t0, 0 if result is None else 1)
        return result


def _check_timeouts(idle_s: float, max_age_s: float) -> None:
    if not isinstance(idle_s, int | float) or not 0.001 <= idle_s <= max_age_s:
        raise ValidationError("idle_timeout_s must be at least 0.001 s and at most max_age_s")
    if not isinstance(max_age_s, int | float) or max_age_s > 400 * 86400:
        raise ValidationError("max_age_s must be at most 400 days")
