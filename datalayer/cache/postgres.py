"""PostgreSQL cache backend: UNLOGGED tables (``schema/0009_cache.sql``), the maintenance role.

The backend keeps its own small asyncpg pool whose connections run as ``datalayer_maint``
(``SET ROLE`` once per connection), separate from the request pool: a cache call made while
a request session holds a connection then never waits for a second one from the same
pool, and request connections never switch roles for it. Every operation is one statement
(one round trip, its own implicit transaction) running a named query of
``queries/cache.sql``; the SQL text and parameter order are resolved once at start.

Expired rows are never returned and are deleted by :meth:`maintain` in batches of
``CLEANUP_BATCH`` (one short transaction each, skipping rows another cleaner holds).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson

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
from datalayer.core.context import MAINT_ROLE

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = ["CLEANUP_BATCH", "PostgresBackend"]

CLEANUP_BATCH = 1000
_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# query name -> the parameter order this module passes
_QUERIES: dict[str, tuple[str, ...]] = {
    "get": ("namespace", "key"),
    "get_many": ("namespace", "keys"),
    "store": ("namespace", "key", "value", "ttl_ms", "tags", "guard", "since", "lease"),
    "store_many": ("namespaces", "keys", "values_", "ttls_ms", "tags_json"),
    "invalidate": ("tags", "namespace", "keys", "all_"),
    "lease": ("namespace", "key", "token", "ttl_ms", "if_absent"),
    "release": ("namespace", "key", "token"),
    "clock": (),
    "incr": ("namespace", "key", "ttl_ms"),
    "cleanup_expired": ("batch",),
    "cleanup_aux": ("version_ttl_s",),
}

_FULL_NAMES = {name: f"cache.{name}" for name in _QUERIES}  # registry names, for metrics


async def _as_maintenance(conn: asyncpg.Connection) -> None:
    await conn.execute(f"SET ROLE {MAINT_ROLE}")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Keep the role between uses: nothing else ever runs on these connections."""


def _split(key: str) -> tuple[str, str]:
    ns, _, rest = key.partition(":")
    return ns, rest


class PostgresBackend:
    """Cache entries in the DataLayer's database. ``pool_size``: connections of its own pool;
    ``timeout_s``: statement and acquire limit per operation."""

    name = "postgres"

    def __init__(self, dl: DataLayer, *, pool_size: int = 4, timeout_s: float = 2.0) -> None:
        self._dl = dl
        self._pool_size = pool_size
        self._timeout = timeout_s
        self._pool: asyncpg.Pool | None = None
        self._sql: dict[str, str] = {}
        self._reads = ReadBatcher(self._get_one, self.get_many)

    async def start(self) -> None:
        if self._pool is not None:
            return
        reg = self._dl.registry
        for name, order in _QUERIES.items():
            q = reg[f"cache.{name}"]
            if tuple(q.params) != order:
                raise RuntimeError(f"cache.{name} parameters changed: {q.params} != {order}")
            self._sql[name] = q.sql
        s = self._dl.settings
        try:
            self._pool = await asyncpg.create_pool(
                s.database_url, min_size=1, max_size=self._pool_size, init=_as_maintenance,
                reset=_no_reset, timeout=self._timeout * 5,
                server_settings={"application_name": f"{s.application_name}-cache",
                                 "statement_timeout": str(int(self._timeout * 1000))})
        except _FAILURES as exc:
            raise BackendUnavailable(f"PostgreSQL: {type(exc).__name__}") from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _call(self, method: str, name: str, *args: Any) -> Any:
        pool = self._pool
        if pool is None:
            raise BackendUnavailable("the PostgreSQL cache backend is not started")
        try:
            conn = await pool.acquire(timeout=self._timeout)
        except TimeoutError as exc:
            raise BackendBusy("PostgreSQL: no free cache connection") from exc
        except _FAILURES as exc:
            raise BackendUnavailable(f"PostgreSQL: {type(exc).__name__}") from exc
        metrics = self._dl.metrics
        full = _FULL_NAMES[name]
        t0 = time.perf_counter_ns()
        try:
            result = await getattr(conn, method)(self._sql[name], *args)
        except _FAILURES as exc:
            metrics.failed(full, t0, exc)
            raise BackendUnavailable(f"PostgreSQL: {type(exc).__name__}") from exc
        finally:
            await pool.release(conn)
        metrics.record(full, t0, 0 if result is None else 1)
        return result

    async def ping(self) -> None:
        await self._call("fetchval", "clock")

    async def get(self, key: str) -> bytes | None:
        """One SELECT; concurrent gets share one (:class:`ReadBatcher`)."""
        return await self._reads.get(key)

    async def _get_one(self, key: str) -> bytes | None:
        ns, k = _split(key)
        value: bytes | None = await self._call("fetchval", "get", ns, k)
        return value

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        by_ns: dict[str, list[str]] = {}
        for key in keys:
            ns, k = _split(key)
            by_ns.setdefault(ns, []).append(k)
        found: dict[str, bytes] = {}
        for ns, ks in by_ns.items():
            for row in await self._call("fetch", "get_many", ns, ks):
                found[f"{ns}:{row['key']}"] = row["value"]
        return [found.get(k) for k in keys]

    async def store(self, key: str, value: bytes, ttl_ms: int, tags: Sequence[str], *,
                    since: int | None = None, lease_token: str | None = None) -> bool:
        ns, k = _split(key)
        guard = guard_tags(key, tags) if since is not None else []
        return bool(await self._call("fetchval", "store", ns, k, value, max(1, ttl_ms),
                                     list(tags), guard, since, lease_token))

    async def store_many(self, items: Sequence[Item]) -> None:
        if not items:
            return
        split = [_split(it.key) for it in items]
        await self._call("execute", "store_many", [s[0] for s in split], [s[1] for s in split],
                         [it.value for it in items], [max(1, it.ttl_ms) for it in items],
                         [orjson.dumps(list(it.tags)).decode() for it in items])

    async def delete(self, keys: Sequence[str]) -> int:
        total = 0
        by_ns: dict[str, list[str]] = {}
        for key in keys:
            ns, k = _split(key)
            by_ns.setdefault(ns, []).append(k)
        for ns, ks in by_ns.items():
            tags = [key_tag(f"{ns}:{k}") for k in ks]
            total += int(await self._call("fetchval", "invalidate", tags, ns, ks, False))
        return total

    async def invalidate(self, tags: Sequence[str]) -> int:
        if not tags:
            return 0
        return int(await self._call("fetchval", "invalidate", list(tags), "", [], False))

    async def clear(self, namespace: str) -> int:
        return int(await self._call("fetchval", "invalidate", [ns_tag(namespace)], namespace,
                                    [], True))

    async def lease(self, key: str, token: str, ttl_ms: int, *, if_absent: bool) -> Lease:
        ns, k = _split(key)
        row = await self._call("fetchrow", "lease", ns, k, token, max(1, ttl_ms), if_absent)
        return Lease(row["value"], bool(row["leased"]), int(row["clock"]))

    async def release(self, key: str, token: str) -> None:
        ns, k = _split(key)
        await self._call("execute", "release", ns, k, token)

    async def clock(self) -> int:
        return int(await self._call("fetchval", "clock"))

    async def incr(self, key: str, ttl_ms: int) -> int:
        ns, k = _split(key)
        return int(await self._call("fetchval", "incr", ns, k, max(1, ttl_ms)))

    def evictions(self) -> Mapping[str, int]:
        return {}  # nothing is evicted for space; expired rows are cleaned up

    async def maintain(self) -> None:
        """Delete expired entries batch by batch (each its own transaction), then expired
        leases, counters and old versions."""
        while True:
            status = await self._call("execute", "cleanup_expired", CLEANUP_BATCH)
            if int(status.rpartition(" ")[2] or 0) < CLEANUP_BATCH:
                break
            await asyncio.sleep(0)  # let other work in between batches
        await self._call("fetchval", "cleanup_aux", VERSION_TTL_S)
