"""Cache scenarios: get per backend, a Zipf hit rate, a stampede of cold misses.

* ``cache.get.{memory,redis,postgres}``: ``NamespaceCache.get`` of a warm ~200-byte value
  (decode included) against the same lookup done raw: a dict lookup, a ``redis.asyncio``
  GET of the same key, an asyncpg SELECT of the same row. ``p99_target_ms``: the issue's
  targets (memory 0.005, Redis 0.5).
* ``cache.zipf``: ``get_or_set`` over 100,000 keys drawn from Zipf(s=1.1), with an
  in-memory LRU sized (in bytes) for 10% of them. ``hit_rate`` is measured (steady state,
  after a warm-up of 300,000 draws); ``hit_rate_ideal`` is the best any cache of that size
  can do (it holds exactly the 10,000 most popular keys), ``cache_fraction_for_95`` the
  share of keys such a perfect cache would need for 95%. The baseline is the loader alone.
* ``cache.stampede``: 1,000 concurrent ``get_or_set`` of one cold key, whose loader takes
  5 ms; over two caches sharing the backend (two processes) when it is Redis or
  PostgreSQL. ``loader_calls`` is the average number of loader calls per stampede (1.0 is
  perfect); the baseline is what runs without the cache: 1,000 loader calls.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from datalayer.cache import Cache, MemoryBackend, Namespace, NamespaceCache
from datalayer.cache.postgres import PostgresBackend
from datalayer.cache.redis import RedisBackend

from .harness import POOL_SIZE, BenchContext, Scenario, Skip

__all__ = ["SCENARIOS"]

GET_KEYS = 1000
VALUE = {"id": "6d1f0c3e-8f5e-4a4e-9a57-3c1f4c1b2a10", "email": "ada@example.test",
         "display_name": "Ada Lovelace", "subscription_tier": "pro", "status": "active",
         "preferences": {"theme": "dark", "locale": "en-GB"}, "failed_logins": 0}
ZIPF_KEYS = 100_000
ZIPF_S = 1.1
ZIPF_CACHED = 10_000  # the cache holds 10% of the keys
ZIPF_DRAWS = 2_000_000
STAMPEDE = 1000
LOAD_S = 0.005


async def _started(bctx: BenchContext, cache: Cache) -> Cache:
    await cache.start()
    bctx.cleanup.push_async_callback(cache.close)
    return cache


def _redis_prefix(bctx: BenchContext, url: str) -> str:
    """A key prefix of this run, whose keys are deleted at the end."""
    prefix = f"dl:bench:{uuid.uuid4().hex[:8]}:"

    async def drop() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            found = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
            if found:
                await client.delete(*found)
        finally:
            await client.aclose()

    bctx.cleanup.push_async_callback(drop)
    return prefix


# -- get per backend ----------------------------------------------------------------------
@dataclass
class GetState:
    ns: NamespaceCache[Any]
    keys: list[str]
    raw_keys: list[str] = field(default_factory=list)
    table: dict[str, Any] = field(default_factory=dict)
    client: aioredis.Redis | None = None
    sql: str = ""
    misses: int = 0  # a warm key missed: the backend failed or was too slow (reported)


async def _fill(ns: NamespaceCache[Any]) -> list[str]:
    keys = [f"k{i}" for i in range(GET_KEYS)]
    await ns.set_many(dict.fromkeys(keys, VALUE))
    return keys


async def _setup_memory(bctx: BenchContext) -> GetState:
    cache = await _started(bctx, Cache(MemoryBackend(64 << 20)))
    ns = cache.namespace(Namespace("bench.get", ttl=3600))
    keys = await _fill(ns)
    return GetState(ns, keys, table=dict.fromkeys(keys, VALUE))


async def _setup_redis(bctx: BenchContext) -> GetState:
    url = bctx.settings.redis_url
    if url is None:
        raise Skip("REDIS_URL is not set")
    prefix = _redis_prefix(bctx, url)
    cache = await _started(bctx, Cache(RedisBackend(url, prefix=prefix)))
    ns = cache.namespace(Namespace("bench.get", ttl=3600))
    keys = await _fill(ns)
    client = aioredis.Redis.from_url(url)
    bctx.cleanup.push_async_callback(client.aclose)
    return GetState(ns, keys, raw_keys=[f"{prefix}e:bench.get:{k}" for k in keys], client=client)


async def _setup_postgres(bctx: BenchContext) -> GetState:
    cache = await _started(bctx, Cache(PostgresBackend(bctx.dl, pool_size=POOL_SIZE)))
    ns = cache.namespace(Namespace(f"bench.get.{uuid.uuid4().hex[:6]}", ttl=3600))
    keys = await _fill(ns)
    sql = ("SELECT value FROM cache_entries WHERE namespace = $1 AND key = $2 "
           "AND expires_at > clock_timestamp()")
    return GetState(ns, keys, sql=sql)


async def _get(b: BenchContext, s: GetState, i: int) -> None:
    if await s.ns.get(s.keys[i % GET_KEYS]) is None:
        s.misses += 1


async def _get_dict(b: BenchContext, s: GetState, i: int) -> None:
    if s.table[s.keys[i % GET_KEYS]] is None:
        raise RuntimeError("missing")


async def _get_redis_raw(b: BenchContext, s: GetState, i: int) -> None:
    assert s.client is not None
    await s.client.get(s.raw_keys[i % GET_KEYS])


async def _get_pg_raw(b: BenchContext, s: GetState, i: int) -> None:
    async with b.pool.acquire() as conn:
        await conn.fetchval(s.sql, s.ns.name, s.keys[i % GET_KEYS])


def _target(ms: float | None) -> Any:
    async def extra(b: BenchContext, s: GetState) -> Mapping[str, Any]:
        out: dict[str, Any] = {"misses": s.misses}
        if ms is not None:
            out["p99_target_ms"] = ms
        s.misses = 0
        return out
    return extra


# -- Zipf hit rate ------------------------------------------------------------------------
@dataclass
class ZipfState:
    ns: NamespaceCache[Any]
    keys: list[str]
    draws: list[int]
    ideal: float
    for_95: float
    value: str
    seen: tuple[int, int] = (0, 0)


def _zipf_cdf() -> list[float]:
    weights = [1 / (r ** ZIPF_S) for r in range(1, ZIPF_KEYS + 1)]
    return list(itertools.accumulate(weights))


async def _setup_zipf(bctx: BenchContext) -> ZipfState:
    cdf = _zipf_cdf()
    total = cdf[-1]
    ideal = cdf[ZIPF_CACHED - 1] / total
    for_95 = (bisect.bisect_left(cdf, 0.95 * total) + 1) / ZIPF_KEYS
    rng = random.Random(1729)
    draws = rng.choices(range(ZIPF_KEYS), cum_weights=cdf, k=ZIPF_DRAWS)
    keys = [f"item:{r}" for r in range(ZIPF_KEYS)]
    value = "v" * 100
    probe = MemoryBackend()
    probe_cache = Cache(probe)
    await probe_cache.namespace(Namespace("bench.zipf", ttl=3600)).set(keys[-1], value)
    per_entry = probe.bytes_used  # what one entry costs against the budget
    cache = await _started(bctx, Cache(MemoryBackend(per_entry * ZIPF_CACHED)))
    ns = cache.namespace(Namespace("bench.zipf", ttl=3600))
    state = ZipfState(ns, keys, draws, ideal, for_95, value)
    for i in range(300_000):  # warm up to steady state
        await _zipf(bctx, state, i)
    s = cache.stats()["bench.zipf"]
    state.seen = (s.hits, s.misses)
    return state


async def _zipf(b: BenchContext, s: ZipfState, i: int) -> None:
    value = s.value

    async def load() -> str:
        return value

    await s.ns.get_or_set(s.keys[s.draws[i % ZIPF_DRAWS]], load)


async def _zipf_raw(b: BenchContext, s: ZipfState, i: int) -> None:
    s.keys[s.draws[i % ZIPF_DRAWS]]  # the workload without a cache: pick the key, load


async def _zipf_extra(b: BenchContext, s: ZipfState) -> Mapping[str, Any]:
    st = s.ns.cache.stats()["bench.zipf"]
    hits, misses = st.hits - s.seen[0], st.misses - s.seen[1]
    s.seen = (st.hits, st.misses)
    return {"hit_rate": round(hits / max(1, hits + misses), 4),
            "hit_rate_ideal": round(s.ideal, 4), "hit_rate_target": 0.95,
            "cache_fraction_for_95": round(s.for_95, 3), "keys": ZIPF_KEYS,
            "cache_keys": ZIPF_CACHED, "zipf_s": ZIPF_S, "evictions": st.evictions}


# -- stampede -----------------------------------------------------------------------------
@dataclass
class StampedeState:
    caches: list[NamespaceCache[Any]]
    backend: str
    calls: int = 0
    stampedes: int = 0
    worst: int = 0


async def _setup_stampede(bctx: BenchContext) -> StampedeState:
    kind = bctx.settings.cache_backend_name
    spec = Namespace(f"bench.stampede.{uuid.uuid4().hex[:6]}", ttl=60)
    caches: list[Cache] = []
    url = bctx.settings.redis_url
    prefix = _redis_prefix(bctx, url) if kind == "redis" and url else ""
    for _ in range(1 if kind == "memory" else 2):
        if kind == "redis":
            assert url is not None
            c = Cache(RedisBackend(url, prefix=prefix))
        elif kind == "postgres":
            c = Cache(PostgresBackend(bctx.dl))
        else:
            c = Cache(MemoryBackend())
        caches.append(await _started(bctx, c))
    return StampedeState([c.namespace(spec) for c in caches], kind)


async def _stampede(b: BenchContext, s: StampedeState, i: int) -> None:
    key = f"cold:{uuid.uuid4().hex}"
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(LOAD_S)
        return "loaded"

    n = len(s.caches)
    await asyncio.gather(*(s.caches[j % n].get_or_set(key, load) for j in range(STAMPEDE)))
    s.calls += calls
    s.stampedes += 1
    s.worst = max(s.worst, calls)


async def _stampede_raw(b: BenchContext, s: StampedeState, i: int) -> None:
    async def load() -> str:
        await asyncio.sleep(LOAD_S)
        return "loaded"

    await asyncio.gather(*(load() for _ in range(STAMPEDE)))


async def _stampede_extra(b: BenchContext, s: StampedeState) -> Mapping[str, Any]:
    out = {"loader_calls": round(s.calls / max(1, s.stampedes), 3),
           "loader_calls_max": s.worst, "stampedes": s.stampedes, "callers": STAMPEDE,
           "processes": len(s.caches), "backend": s.backend}
    s.calls = s.stampedes = s.worst = 0
    return out


SCENARIOS: list[Scenario] = [
    Scenario("cache.get.memory", _setup_memory, _get, _get_dict, extra=_target(0.005),
             description="in-process LRU get (decode included) vs a dict lookup"),
    Scenario("cache.get.redis", _setup_redis, _get, _get_redis_raw, extra=_target(0.5),
             description="Redis get (decode included) vs redis.asyncio GET of the same key"),
    Scenario("cache.get.postgres", _setup_postgres, _get, _get_pg_raw, extra=_target(None),
             description="PostgreSQL get (own pool, decode) vs asyncpg SELECT of the row"),
    Scenario("cache.zipf", _setup_zipf, _zipf, _zipf_raw, extra=_zipf_extra,
             description="get_or_set hit rate, Zipf(1.1) over 100k keys, cache for 10%"),
    Scenario("cache.stampede", _setup_stampede, _stampede, _stampede_raw,
             extra=_stampede_extra,
             description="1,000 concurrent cold misses of one key: loader calls"),
]
