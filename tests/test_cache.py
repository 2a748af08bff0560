"""The cache: codec, the three backends, stampede protection, tags, degradation, statistics,
read-through repository lookups (fresh after every committed write, inside RLS), AI namespaces.

Redis tests use the run's Redis under ``redis_prefix``; the outage tests start their own
``redis-server`` on a free port and stop, kill or pause it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from datalayer import ConfigError, Context, DataLayer, Settings, ValidationError
from datalayer.cache import Cache, MemoryBackend, Namespace, NamespaceCache
from datalayer.cache._backend import Backend, BackendUnavailable, ReadBatcher
from datalayer.cache._codec import CodecError, decode, encode
from datalayer.cache.ai import LLMResponse, SearchHit
from datalayer.cache.postgres import PostgresBackend
from datalayer.cache.redis import RedisBackend
from datalayer.security import Keyring
from tests.conftest import MemberFactory, TenantFactory, make_layer, make_settings

KEYRING = Keyring([("c1", b"c" * 32)])
BACKENDS = ["memory", "redis", "postgres"]
CacheFactory = Callable[..., Awaitable[Cache]]


def ns(**kw: Any) -> Namespace:
    """A namespace of its own for each test (backends outlive tests)."""
    return Namespace(f"t{uuid.uuid4().hex[:10]}", **kw)


class Loader:
    """Counts calls; returns ``values`` in turn (the last one forever) after ``delay``."""

    def __init__(self, *values: Any, delay: float = 0.0) -> None:
        self.values = list(values) or ["loaded"]
        self.delay = delay
        self.calls = 0

    async def __call__(self) -> Any:
        i = self.calls
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.values[min(i, len(self.values) - 1)]


@pytest.fixture
async def make_cache(dl: DataLayer, redis_client: aioredis.Redis, redis_url: str,
                     redis_prefix: str) -> AsyncIterator[CacheFactory]:
    """Build started caches over a backend kind; all closed at the end. Redis caches of one
    test share ``redis_prefix`` (like processes sharing a Redis)."""
    made: list[Cache] = []

    async def make(kind: str, **kw: Any) -> Cache:
        backend: Backend
        if kind == "memory":
            backend = MemoryBackend(kw.pop("max_bytes", 1 << 20))
        elif kind == "redis":
            backend = RedisBackend(redis_url, prefix=redis_prefix)
        else:
            backend = PostgresBackend(dl)
        cache = Cache(backend, keyring=KEYRING, **kw)
        await cache.start()
        made.append(cache)
        return cache

    yield make
    for c in made:
        await c.close()


# -- codec ------------------------------------------------------------------------------------

def test_codec_round_trips_raw_compressed_and_encrypted() -> None:
    value = {"id": str(uuid.uuid4()), "text": "x" * 5000, "n": [1, 2.5, None]}
    exp = int(time.time() * 1000) + 60_000
    raw = encode({"a": 1}, key="n:k", expires_at_ms=exp, compress_above=1024, keyring=None)
    packed = encode(value, key="n:k", expires_at_ms=exp, compress_above=1024, keyring=None)
    sealed = encode(value, key="n:k", expires_at_ms=exp, compress_above=1024, keyring=KEYRING)
    assert (raw[0], packed[0], sealed[0]) == (0x10, 0x11, 0x13)
    assert len(packed) < 1000 < len(value["text"])
    assert decode(raw, key="n:k", keyring=None) == ({"a": 1}, exp)
    assert decode(packed, key="n:k", keyring=None) == (value, exp)
    assert decode(sealed, key="n:k", keyring=KEYRING) == (value, exp)
    assert b"xxxx" not in sealed


def test_codec_refuses_tampered_moved_downgraded_and_stretched_entries() -> None:
    exp = int(time.time() * 1000) + 60_000
    sealed = encode({"role": "viewer"}, key="n:k", expires_at_ms=exp, compress_above=None,
                    keyring=KEYRING)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    stretched = sealed[:1] + (exp + 10**9).to_bytes(8, "big") + sealed[9:]
    plain = encode({"role": "owner"}, key="n:k", expires_at_ms=exp, compress_above=None,
                   keyring=None)
    for blob, key, ring in [(flipped, "n:k", KEYRING), (sealed, "n:other", KEYRING),
                            (stretched, "n:k", KEYRING), (plain, "n:k", KEYRING),
                            (sealed, "n:k", None), (b"garbage", "n:k", None),
                            (b"\x11" + bytes(8) + b"not zlib", "n:k", None)]:
        with pytest.raises(CodecError):
            decode(blob, key=key, keyring=ring)


# -- backends ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    id: uuid.UUID
    at: datetime
    blob: bytes
    note: str | None


@pytest.mark.parametrize("kind", BACKENDS)
async def test_backend_basic_operations(kind: str, make_cache: CacheFactory) -> None:
    c = await make_cache(kind)
    n = c.namespace(ns(ttl=60))
    assert await n.get("a") is None
    await n.set("a", {"x": 1})
    await n.set_many({"b": [1, 2], "c": "three"})
    assert await n.get("a") == {"x": 1}
    assert await n.get_many(["a", "b", "c", "zz"]) == {"a": {"x": 1}, "b": [1, 2], "c": "three"}
    await n.delete("a", "b")
    assert await n.get_many(["a", "b", "c"]) == {"c": "three"}
    assert [await n.incr("hits") for _ in range(3)] == [1, 2, 3]
    other = c.namespace(ns(ttl=60))
    await other.set("c", "kept")
    await n.clear()
    assert (await n.get("c"), await other.get("c")) == (None, "kept")
    typed = c.namespace(ns(ttl=60, sensitive=True), row=Row)
    row = Row(id=uuid.uuid4(), at=datetime.now(UTC), blob=b"\x00\xff", note=None)
    await typed.set("r", row)
    assert await typed.get("r") == row
    with pytest.raises(ValidationError):
        await n.set("none", None)
    s = c.stats()[n.name]
    assert (s.hits, s.sets, s.deletes) == (5, 3, 2)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_backend_entries_expire_after_their_ttl(kind: str, make_cache: CacheFactory) -> None:
    c = await make_cache(kind)
    n = c.namespace(ns(ttl=60))
    await n.set("short", 1, ttl=0.15)
    await n.set("long", 2)
    assert await n.get("short") == 1
    await asyncio.sleep(0.3)
    assert (await n.get("short"), await n.get("long")) == (None, 2)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_tag_invalidation_removes_every_carrier_and_only_them(
    kind: str, make_cache: CacheFactory,
) -> None:
    c = await make_cache(kind)
    n, m = c.namespace(ns()), c.namespace(ns())
    await n.set("a", 1, tags=["team:1", "org:1"])
    await n.set_many({"b": 2, "c": 3}, tags=["team:2"])
    await m.set("d", 4, tags=["org:1"])  # tags cross namespaces
    await c.invalidate_tags("org:1")
    assert await n.get_many(["a", "b", "c"]) == {"b": 2, "c": 3}
    assert await m.get("d") is None
    await c.invalidate_tags("team:2")
    assert await n.get_many(["b", "c"]) == {}
    # A value and its tag membership are one write: racing a set against an invalidation
    # never leaves an entry that a later invalidation of its tag would miss.
    for i in range(30):
        await asyncio.gather(n.set(f"r{i}", i, tags=["race"]), c.invalidate_tags("race"))
    await c.invalidate_tags("race")
    assert await n.get_many([f"r{i}" for i in range(30)]) == {}


async def test_memory_backend_is_an_lru_bounded_by_bytes(make_cache: CacheFactory) -> None:
    c = await make_cache("memory", max_bytes=20_000)
    backend = c.backend
    assert isinstance(backend, MemoryBackend)
    n = c.namespace(ns(compress_threshold=None))
    for i in range(10):
        await n.set(f"k{i}", "v" * 1500)
    assert await n.get("k0") == "v" * 1500  # k0 is now the most recently used
    for i in range(10, 20):
        await n.set(f"k{i}", "v" * 1500)
    assert backend.bytes_used <= 20_000
    found = await n.get_many([f"k{i}" for i in range(20)])
    assert "k0" in found and "k1" not in found and "k19" in found
    assert 8 <= len(found) <= 12
    assert c.stats()[n.name].evictions == 20 - len(backend)
    await n.set("huge", "v" * 30_000)  # bigger than the budget: not cached, nothing evicted
    assert await n.get("huge") is None and await n.get("k19") is not None


# -- stampede protection ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_thousand_concurrent_misses_call_the_loader_once(
    kind: str, make_cache: CacheFactory,
) -> None:
    c = await make_cache(kind)
    n = c.namespace(ns())
    load = Loader("value", delay=0.05)
    results = await asyncio.gather(*(n.get_or_set("hot", load) for _ in range(1000)))
    assert load.calls == 1
    assert set(results) == {"value"}
    assert await n.get("hot") == "value"
    assert c.stats()[n.name].loads == 1


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_concurrent_misses_in_two_processes_call_the_loader_once(
    kind: str, make_cache: CacheFactory,
) -> None:
    """Two caches sharing one backend (two processes): the lease lets one load."""
    a, b = await make_cache(kind), await make_cache(kind)
    spec = ns()
    na, nb = a.namespace(spec), b.namespace(spec)
    load = Loader("shared", delay=0.1)
    results = await asyncio.gather(*(x.get_or_set("hot", load)
                                     for _ in range(500) for x in (na, nb)))
    assert load.calls == 1
    assert set(results) == {"shared"}


async def test_callers_sharing_a_failed_load_retry_with_their_own_loader(
    make_cache: CacheFactory,
) -> None:
    c = await make_cache("memory")
    n = c.namespace(ns())
    calls = 0

    def loader(fail: bool) -> Callable[[], Awaitable[str]]:
        async def load() -> str:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.02)
            if fail:  # e.g. its session was closed under it by a cancelled request
                raise ConnectionError("the leader's connection went away")
            return "value"
        return load

    results = await asyncio.gather(n.get_or_set("k", loader(True)),
                                   *(n.get_or_set("k", loader(False)) for _ in range(50)),
                                   return_exceptions=True)
    assert isinstance(results[0], ConnectionError)
    assert results[1:] == ["value"] * 50
    assert calls == 2  # the failed load, then one shared retry


async def test_concurrent_reads_share_one_round_trip_but_never_an_earlier_one() -> None:
    sent: list[list[str]] = []
    gate = asyncio.Event()

    async def one(key: str) -> bytes | None:
        sent.append([key])
        await gate.wait()
        return key.encode()

    async def many(keys: list[str]) -> list[bytes | None]:
        sent.append(keys)
        await gate.wait()
        return [k.encode() for k in keys]

    reads = ReadBatcher(one, many)
    first = [asyncio.create_task(reads.get(k)) for k in ["a", "b", "a", "c"] * 250]
    await asyncio.sleep(0.01)
    # 1,000 reads, two round trips: the first at once, the other 999 batched behind it
    assert sent == [["a"], ["b", "a", "c"]]
    late = asyncio.create_task(reads.get("a"))  # both reads are on the wire already
    await asyncio.sleep(0.01)
    assert sent == [["a"], ["b", "a", "c"], ["a"]]  # so it joins neither
    gate.set()
    assert [await t for t in first] == [k.encode() for k in ["a", "b", "a", "c"] * 250]
    assert await late == b"a"

    async def down_one(key: str) -> bytes | None:
        await asyncio.sleep(0.01)
        raise BackendUnavailable("down")

    async def down(keys: list[str]) -> list[bytes | None]:
        raise BackendUnavailable("down")

    failing = ReadBatcher(down_one, down)
    results = await asyncio.gather(*(failing.get(k) for k in "xyz"), return_exceptions=True)
    assert all(isinstance(r, BackendUnavailable) for r in results)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_refresh_ahead_reloads_by_one_caller_while_others_get_the_current_value(
    kind: str, make_cache: CacheFactory,
) -> None:
    c = await make_cache(kind)
    n = c.namespace(ns(ttl=1.0, refresh_ahead=0.5))
    await n.set("k", "old")
    assert await n.get_or_set("k", Loader("unused")) == "old"  # fresh: no refresh
    await asyncio.sleep(0.6)  # now in the last half of its life
    load = Loader("new", delay=0.3)
    started = time.monotonic()
    done: list[tuple[str, float]] = []

    async def call() -> None:
        value = await n.get_or_set("k", load)
        assert value is not None
        done.append((value, time.monotonic() - started))

    await asyncio.gather(*(call() for _ in range(50)))
    assert load.calls == 1
    assert sorted(v for v, _ in done) == ["new"] + ["old"] * 49
    reloaded = next(t for v, t in done if v == "new")
    assert reloaded >= 0.3 and all(t < reloaded for v, t in done if v == "old")  # no waiting
    assert await n.get("k") == "new"
    assert c.stats()[n.name].refreshes == 1


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_load_that_straddles_an_invalidation_is_not_stored(
    kind: str, make_cache: CacheFactory,
) -> None:
    """The loader read before the write committed; the write's invalidation came before the
    store: the stale value must not land in the cache."""
    c = await make_cache(kind)
    n = c.namespace(ns())
    reading, release = asyncio.Event(), asyncio.Event()

    async def stale() -> str:
        reading.set()
        await release.wait()
        return "stale"

    leader = asyncio.create_task(n.get_or_set("k", stale, tags=["row:1"]))
    await reading.wait()
    await c.invalidate_tags("row:1")  # the writer's after-commit invalidation
    release.set()
    assert await leader == "stale"  # its own (linearizable: it began before the write)
    assert await n.get("k") is None
    # Same with a delete of the key itself.
    reading.clear()
    release.clear()
    leader = asyncio.create_task(n.get_or_set("k", stale))
    await reading.wait()
    await n.delete("k")
    release.set()
    await leader
    assert await n.get("k") is None


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_caller_arriving_after_an_invalidation_never_shares_an_older_load(
    kind: str, make_cache: CacheFactory,
) -> None:
    c = await make_cache(kind)
    n = c.namespace(ns())
    reading, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def load() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            reading.set()
            await release.wait()
            return "before the write"
        return "after the write"

    leader = asyncio.create_task(n.get_or_set("k", load, tags=["row:1"]))
    await reading.wait()
    await c.invalidate_tags("row:1")
    late = asyncio.create_task(n.get_or_set("k", load, tags=["row:1"]))
    await asyncio.sleep(0.05)
    release.set()
    assert (await leader, await late) == ("before the write", "after the write")
    if kind != "memory":  # the invalidation comes from another process this time
        peer = await make_cache(kind)
        calls = 0
        reading.clear()
        release.clear()
        leader = asyncio.create_task(n.get_or_set("k2", load, tags=["row:2"]))
        await reading.wait()
        await peer.invalidate_tags("row:2")
        late = asyncio.create_task(n.get_or_set("k2", load, tags=["row:2"]))
        await asyncio.sleep(0.05)
        release.set()
        assert (await leader, await late) == ("before the write", "after the write")
        assert await n.get("k2") == "after the write"


# -- unreadable entries, statistics -----------------------------------------------------------

async def test_unreadable_entries_are_misses_with_an_error_stat(
    make_cache: CacheFactory, redis_client: aioredis.Redis, redis_prefix: str,
) -> None:
    c = await make_cache("redis")
    n = c.namespace(ns(sensitive=True))
    await n.set("k", {"role": "viewer"})
    entry = f"{redis_prefix}e:{n.name}:k"
    blob = await redis_client.get(entry)
    assert isinstance(blob, bytes)
    await redis_client.set(entry, blob[:-1] + bytes([blob[-1] ^ 1]))  # tampered
    assert await n.get("k") is None
    await redis_client.set(entry, encode({"role": "owner"}, key=f"{n.name}:k",  # forged
                                         expires_at_ms=2**40, compress_above=None,
                                         keyring=None))
    assert await n.get("k") is None
    load = Loader({"role": "viewer"})
    assert await n.get_or_set("k", load) == {"role": "viewer"}  # reloaded, overwritten
    assert await n.get("k") == {"role": "viewer"}
    s = c.stats()[n.name]
    # errors: the tampered read, the forged read, and the forged entry read twice by
    # get_or_set (its read, and the lease's look before loading)
    assert (s.errors, s.misses, s.loads) == (4, 3, 1)


async def test_statistics_are_written_to_cache_stats(
    dl: DataLayer, admin_conn: asyncpg.Connection,
) -> None:
    c = Cache(MemoryBackend(), layer=dl, instance=f"test-{uuid.uuid4().hex[:8]}")
    await c.start()
    try:
        n = c.namespace(ns())
        await n.get("a")
        await n.get_or_set("a", Loader(1))
        await n.get("a")
        assert await c.flush_stats() == 1
        assert await c.flush_stats() == 0  # nothing new
        await n.get("a")
        assert await c.flush_stats() == 1
        rows = await admin_conn.fetch(
            "SELECT hits, misses, sets, loads, load_ms >= 0 AS timed, backend FROM cache_stats "
            "WHERE instance = $1 ORDER BY id", c.instance)
        assert [tuple(r) for r in rows] == [(1, 2, 1, 1, True, "memory"),
                                            (1, 0, 0, 0, True, "memory")]
    finally:
        await c.close()
    periodic = Cache(MemoryBackend(), layer=dl, stats_interval_s=0.05,
                     instance=f"test-{uuid.uuid4().hex[:8]}")
    await periodic.start()
    try:
        await periodic.namespace(ns()).get("x")
        await _until(lambda: periodic._flushed != {})  # written by the background task
    finally:
        await periodic.close()
    assert await admin_conn.fetchval("SELECT sum(misses) FROM cache_stats WHERE instance = $1",
                                     periodic.instance) == 1
    async with dl.system() as db:  # totals over every process
        totals = {r["namespace"]: r for r in await db.many(
            "cache.stats_totals", since=datetime.now(UTC) - timedelta(minutes=5))}
    assert totals[n.name]["hits"] == 2 and totals[n.name]["misses"] == 2


async def test_postgres_cleanup_deletes_expired_rows(
    make_cache: CacheFactory, admin_conn: asyncpg.Connection,
) -> None:
    c = await make_cache("postgres")
    n = c.namespace(ns())
    await n.set_many({f"k{i}": i for i in range(50)}, ttl=0.05)
    await n.set("live", 1)
    await asyncio.sleep(0.1)
    await c.maintain()
    left = await admin_conn.fetchval("SELECT count(*) FROM cache_entries WHERE namespace = $1",
                                     n.name)
    assert left == 1


# -- Redis outages ----------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A redis-server of the test's own, on a free port, without persistence."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.dir = workdir
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed")
        self.proc = await asyncio.create_subprocess_exec(
            exe, "--port", str(self.port), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self.dir), "--bind", "127.0.0.1",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        client = aioredis.Redis.from_url(self.url)
        try:
            for _ in range(200):
                try:
                    await client.ping()
                    return
                except OSError:
                    await asyncio.sleep(0.01)
                except aioredis.ConnectionError:
                    await asyncio.sleep(0.01)
            raise RuntimeError("redis-server did not start")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.returncode is None:
            server.resume()
        await server.stop()


async def _until(check: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_redis_down_degrades_to_misses_logs_once_and_recovers(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    c = Cache(RedisBackend(own_redis.url, prefix="t:", timeout_s=0.2), keyring=KEYRING,
              retry_interval_s=0.05, warn_interval_s=60)
    await c.start()
    try:
        n = c.namespace(ns())
        await n.set("k", "cached")
        assert await n.get("k") == "cached"
        await own_redis.stop()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="datalayer.cache"):
            for _ in range(20):  # nothing raises; reads go to the loader (the database)
                assert await n.get("k") is None
                assert await n.get_many(["k"]) == {}
                await n.set("k", "x")
                await n.delete("k")
                await c.invalidate_tags("t")
                assert await n.incr("n") is None
                assert await n.get_or_set("k", Loader("from the database")) == \
                    "from the database"
        assert not c.healthy
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()
        assert c.stats()[n.name].errors >= 20
        await own_redis.start()  # the same port again
        await _until(lambda: c.healthy)
        await n.set("k", "again")
        assert await n.get("k") == "again"
    finally:
        await c.close()


async def test_invalidations_missed_while_redis_is_unreachable_are_replayed(
    own_redis: RedisServer,
) -> None:
    """Redis keeps its data but does not answer (paused): an invalidation made meanwhile
    must not leave the old value readable once it answers again."""
    c = Cache(RedisBackend(own_redis.url, prefix="t:", timeout_s=0.2), keyring=KEYRING,
              retry_interval_s=0.05)
    peer = Cache(RedisBackend(own_redis.url, prefix="t:", timeout_s=0.2), keyring=KEYRING)
    await c.start()
    await peer.start()
    try:
        spec = ns()
        n, p = c.namespace(spec), peer.namespace(spec)
        await n.set("row", "old", tags=["row:1"])
        await n.set("other", "old")
        own_redis.pause()
        await c.invalidate_tags("row:1")  # times out: remembered
        await n.delete("other")
        assert not c.healthy
        assert await n.get_or_set("row", Loader("new")) == "new"  # served from the loader
        own_redis.resume()
        await _until(lambda: c.healthy)
        assert await n.get("row") is None and await n.get("other") is None
        assert await p.get("row") is None  # replayed in Redis: other processes see it too
    finally:
        await c.close()
        await peer.close()


# -- after-commit hooks -----------------------------------------------------------------------

async def test_after_commit_runs_after_commit_and_never_after_a_rollback(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    ran: list[str] = []

    def note(label: str) -> Callable[[], Awaitable[None]]:
        async def fn() -> None:
            ran.append(label)
        return fn

    async with dl.session(t.owner) as db:
        await db.after_commit(note("committed"))
        try:
            async with db.savepoint():
                await db.after_commit(note("savepoint rolled back"))
                raise RuntimeError
        except RuntimeError:
            pass
        assert ran == []
    assert ran == ["committed"]
    with pytest.raises(RuntimeError):
        async with dl.session(t.owner) as db:
            await db.after_commit(note("rolled back"))
            raise RuntimeError
    async with dl.session(t.owner, readonly=True) as db:
        await db.after_commit(note("no transaction: at once"))
        assert ran[-1] == "no transaction: at once"
    assert ran == ["committed", "no transaction: at once"]


# -- read-through lookups ---------------------------------------------------------------------

@pytest.fixture
async def redis_layers(settings: Settings, redis_url: str, redis_prefix: str,
                       redis_client: aioredis.Redis) -> AsyncIterator[tuple[DataLayer, DataLayer]]:
    """Two DataLayers (two processes) sharing the run's database and a Redis cache."""
    layers = [make_layer(make_settings(settings.database_url, redis_url=redis_url,
                                       cache_prefix=redis_prefix, migrate_on_start=False,
                                       cache_stats_interval_s=0)) for _ in range(2)]
    for layer in layers:
        await layer.start()
    yield layers[0], layers[1]
    for layer in layers:
        await layer.close()


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "redis-two-processes"])
async def test_a_read_after_a_committed_write_is_never_stale(
    shared: bool, dl: DataLayer, redis_layers: tuple[DataLayer, DataLayer],
    make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    writer, reader = redis_layers if shared else (dl, dl)
    assert reader.cache.backend.name == ("redis" if shared else "memory")
    t = await make_tenant()
    member = await add_member(t)
    assert member.user_id is not None
    uid = member.user_id
    stop = False

    async def hammer() -> None:  # keeps loads of the row in flight all the time
        while not stop:
            async with reader.session(t.owner, readonly=True) as db:
                await db.users.get(uid)

    noise = [asyncio.create_task(hammer()) for _ in range(6)]
    try:
        for i in range(25):
            async with writer.session(member) as db:
                await db.users.update_profile(uid, display_name=f"name {i}")
            async with reader.session(t.owner, readonly=True) as db:
                user = await db.users.get(uid)
            assert user is not None and user.display_name == f"name {i}"
    finally:
        stop = True
        await asyncio.gather(*noise)
    assert reader.cache.stats()["users"].hits > 0  # the cache was really in the way


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "redis-two-processes"])
async def test_a_read_racing_a_committed_write_cannot_serve_or_store_the_old_row(
    shared: bool, dl: DataLayer, redis_layers: tuple[DataLayer, DataLayer],
    make_tenant: TenantFactory, add_member: MemberFactory, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worst interleaving, forced: a reader has read the old row from the database and
    not yet stored it when the write commits and invalidates. A read that starts after the
    write gets the new row (it does not share the in-flight old one), and the old row never
    reaches the cache."""
    writer, reader = redis_layers if shared else (dl, dl)
    t = await make_tenant()
    member = await add_member(t)
    uid = member.user_id
    assert uid is not None
    read_done, go_on = asyncio.Event(), asyncio.Event()
    original = NamespaceCache._call_loader

    async def paused(self: NamespaceCache[Any], loader: Callable[[], Awaitable[Any]]) -> Any:
        result = await original(self, loader)
        if self.name == "users" and not read_done.is_set():
            read_done.set()
            await go_on.wait()  # the old row is read, not yet stored
        return result

    monkeypatch.setattr(NamespaceCache, "_call_loader", paused)

    async def name() -> str:
        async with reader.session(t.owner, readonly=True) as db:
            user = await db.users.get(uid)
        assert user is not None
        return user.display_name

    async with reader.session(t.owner) as db:  # a read-write session: no cache
        old = (await db.users.get(uid)).display_name  # type: ignore[union-attr]
    first = asyncio.create_task(name())
    await read_done.wait()
    async with writer.session(member) as db:
        await db.users.update_profile(uid, display_name="after the write")
    second = asyncio.create_task(name())  # starts after the write: joins nothing older
    await asyncio.sleep(0.05)
    go_on.set()
    assert (await first, await second) == (old, "after the write")
    assert await name() == "after the write"  # and the old row was not stored


async def test_cached_users_are_served_only_where_rls_would_show_them(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    a, b = await make_tenant("A"), await make_tenant("B")
    member = await add_member(a)
    uid = member.user_id
    assert uid is not None

    async def read(ctx: Context) -> Any:
        async with dl.session(ctx, readonly=True) as db:
            return await db.users.get(uid)

    hits = dl.cache.stats().get("users")
    before = hits.hits if hits else 0
    for _ in range(3):
        assert await read(a.owner) is not None  # cached under A
    assert dl.cache.stats()["users"].hits >= before + 2
    assert await read(b.owner) is None  # B's owner never gets A's cached row
    assert await read(Context(b.org_id, user_id=uuid.uuid4(), role="admin")) is None
    assert await read(Context(None, user_id=uuid.uuid4())) is None
    assert await read(Context(b.org_id, user_id=uid)) is not None  # oneself, anywhere
    async with dl.session(a.owner) as db:
        assert await db.memberships.remove(uid)
    assert await read(a.owner) is None  # left A: the cached row went with the commit
    async with dl.session(member) as db:  # read-write sessions never read the cache
        assert (await db.users.get(uid)) is not None  # its own account


async def test_cached_users_follow_writes_made_through_auth_and_profile_deletes(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    email = f"auth-{uuid.uuid4().hex[:10]}@example.test"
    member = await add_member(t, password="correct horse battery", email=email)
    uid = member.user_id
    assert uid is not None

    async def me() -> Any:
        async with dl.session(member, readonly=True) as db:
            return await db.users.get(uid)

    async def seen_by_owner() -> Any:
        async with dl.session(t.owner, readonly=True) as db:
            return await db.users.get(uid)

    assert (await me()).failed_logins == 0 and (await seen_by_owner()) is not None  # cached
    async with dl.session(Context(None)) as db:
        assert (await db.auth.login(email, "wrong")).outcome == "invalid"
    assert (await me()).failed_logins == 1
    async with dl.session(Context(None)) as db:
        assert (await db.auth.login(email, "correct horse battery")).outcome == "ok"
    user = await me()
    assert user.failed_logins == 0 and user.last_login_at is not None
    async with dl.session(member) as db:
        assert await db.users.soft_delete(uid)
    assert await me() is None and await seen_by_owner() is None


async def test_cached_api_key_verification_follows_revocation_role_and_expiry(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    member = await add_member(t, "admin")
    anon = Context(None)

    async def verify(secret: str) -> Any:
        async with dl.session(anon, readonly=True) as db:
            return await db.api_keys.verify(secret)

    expires = datetime.now(UTC) + timedelta(seconds=1.5)
    async with dl.session(member) as db:
        key = await db.api_keys.create("ci")
        soon = await db.api_keys.create("short", expires_at=expires)
    assert (await verify(key.secret)).role == "admin"
    assert (await verify(key.secret)).role == "admin"  # cached
    async with dl.session(t.owner) as db:
        await db.memberships.set_role(member.user_id, "member")  # type: ignore[arg-type]
    assert (await verify(key.secret)).role == "member"
    async with dl.session(member) as db:
        assert await db.api_keys.revoke(key.key.id)
    assert await verify(key.secret) is None
    assert await verify(soon.secret) is not None  # cached now: nothing invalidates it later
    await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
    assert await verify(soon.secret) is None  # never served past the key's expiry


async def test_lookups_use_the_configured_backend_and_can_be_switched_off(
    settings: Settings, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    layer = make_layer(make_settings(settings.database_url, migrate_on_start=False,
                                     cache_backend="postgres", cache_lookups=False,
                                     cache_stats_interval_s=0))
    async with layer:
        assert layer.cache.backend.name == "postgres"
        async with layer.session(t.owner, readonly=True) as db:
            assert await db.users.get(t.owner_id) is not None
            assert await db.users.get(t.owner_id) is not None
        assert "users" not in layer.cache.stats()


# -- settings ---------------------------------------------------------------------------------

def test_cache_settings_are_read_and_checked() -> None:
    assert Settings.from_env({}).cache_backend_name == "memory"
    assert Settings.from_env({"REDIS_URL": "redis://r:6379/0"}).cache_backend_name == "redis"
    s = Settings.from_env({"DATALAYER_CACHE_BACKEND": "postgres",
                           "DATALAYER_CACHE_MAX_BYTES": "2048",
                           "DATALAYER_CACHE_PREFIX": "app1:",
                           "DATALAYER_CACHE_STATS_INTERVAL_S": "0",
                           "DATALAYER_CACHE_LOOKUPS": "false"})
    assert (s.cache_backend_name, s.cache_max_bytes, s.cache_prefix,
            s.cache_stats_interval_s, s.cache_lookups) == ("postgres", 2048, "app1:", 0, False)
    for env, message in [
        ({"DATALAYER_CACHE_BACKEND": "memcached"}, "DATALAYER_CACHE_BACKEND must be"),
        ({"DATALAYER_CACHE_BACKEND": "redis"}, "DATALAYER_CACHE_BACKEND=redis needs REDIS_URL"),
        ({"DATALAYER_CACHE_MAX_BYTES": "10"}, "DATALAYER_CACHE_MAX_BYTES must be at least"),
        ({"DATALAYER_CACHE_PREFIX": "a b"}, "DATALAYER_CACHE_PREFIX must be"),
        ({"DATALAYER_CACHE_STATS_INTERVAL_S": "-1"}, "DATALAYER_CACHE_STATS_INTERVAL_S"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Settings.from_env(env)


async def test_namespace_configuration_and_tags_are_checked() -> None:
    c = Cache(MemoryBackend())
    with pytest.raises(ValidationError, match="keyring"):
        c.namespace(Namespace("secret", sensitive=True))
    c.namespace(Namespace("same", ttl=5))
    with pytest.raises(ValidationError, match="configured differently"):
        c.namespace(Namespace("same", ttl=6))
    bads: list[dict[str, Any]] = [{"name": "Bad Name"}, {"name": "x", "ttl": 0},
                                  {"name": "x", "refresh_ahead": 1.0}]
    for bad in bads:
        with pytest.raises(ValidationError):
            Namespace(**bad)
    with pytest.raises(ValidationError, match="tag"):  # pseudo-tags are the cache's own
        await c.namespace("n").set("k", 1, tags=["#k:n:other"])


# -- AI namespaces ----------------------------------------------------------------------------

async def test_ai_namespaces_round_trip_scope_and_count_hits(dl: DataLayer) -> None:
    ai = dl.cache.ai
    model, text = "emb-1", f"hello {uuid.uuid4()}"
    computed = Loader([0.5, -1.25, 3.0])
    assert await ai.embedding(model, text, computed) == [0.5, -1.25, 3.0]
    assert await ai.embedding(model, text, computed) == [0.5, -1.25, 3.0]
    assert computed.calls == 1
    assert await ai.get_embedding("emb-2", text) is None
    org, other = uuid.uuid4(), uuid.uuid4()
    hits = [SearchHit(id="doc-1", score=0.9, metadata={"page": 3})]
    await ai.set_search(org, "kb", "what is x", hits, k=5)
    assert await ai.get_search(org, "kb", "what is x", k=5) == hits
    assert await ai.get_search(other, "kb", "what is x", k=5) is None  # per organization
    assert await ai.get_search(org, "kb", "what is x", k=6) is None
    await ai.invalidate_index(org, "kb")
    assert await ai.get_search(org, "kb", "what is x", k=5) is None
    answer = LLMResponse(text="42", model="m", created_at=datetime.now(UTC), prompt_tokens=3)
    first = await ai.llm(org, "m", "the answer?", Loader(answer))
    assert (first.response, first.hits) == (answer, 0)
    assert [(await ai.llm(org, "m", "the answer?", Loader(answer))).hits
            for _ in range(2)] == [1, 2]
    assert await ai.get_llm(other, "m", "the answer?") is None
    backend = dl.cache.backend
    assert isinstance(backend, MemoryBackend)
    stored = [e.value for k, e in backend._entries.items() if k.startswith("ai.llm_responses:")]
    assert stored and all(v[0] & 0x02 and b"42" not in v[9:] for v in stored)  # encrypted


# -- benchmarks -------------------------------------------------------------------------------

async def test_cache_benchmarks_run_and_report_their_fields(settings: Settings,
                                                            redis_url: str) -> None:
    from benchmarks import harness

    out = io.StringIO()
    rows = await harness.run(settings, ["cache.get.memory", "cache.get.redis",
                                        "cache.stampede"],
                             json_path=None, duration_s=0.2, concurrency=(1,), rounds=1,
                             warmup_s=0.02, out=out, progress=io.StringIO())
    by = {r["scenario"]: r for r in rows}
    assert by["cache.get.memory"]["misses"] == 0
    assert "cache.get.redis" not in by  # the test settings have no REDIS_URL: skipped
    assert "cache.get.redis               skipped: REDIS_URL is not set" in out.getvalue()
    with_redis = dataclasses.replace(settings, redis_url=redis_url)
    rows = await harness.run(with_redis, ["cache.get.redis"], json_path=None, duration_s=0.2,
                             concurrency=(1,), rounds=1, warmup_s=0.02, out=io.StringIO(),
                             progress=io.StringIO())
    assert [(r["scenario"], r["misses"]) for r in rows] == [("cache.get.redis", 0)]
    stampede = by["cache.stampede"]
    assert stampede["loader_calls"] == 1.0 and stampede["stampedes"] >= 1
