"""``DataLayer``: the one object a service holds. Owns the pool and the registry.

Start-up order: connect (with retry while the database comes up), migrate or verify the
migration ledger, then serve sessions. Everything hangs off the instance; there is no
module-level state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import orjson
import redis.asyncio as aioredis

from datalayer.cache import Cache
from datalayer.core import migrations
from datalayer.core.context import Context
from datalayer.core.errors import (
    ConfigError,
    SerializationFailure,
    Unavailable,
    translate,
)
from datalayer.core.registry import QueryInfo, Registry
from datalayer.core.resources import resource_dir
from datalayer.core.session import (
    DLConnection,
    Isolation,
    Session,
    SessionScope,
    acquire_with_timeout,
    guarded,
)
from datalayer.query_performance import QueryMetrics
from datalayer.security import Keyring, PasswordHasher
from datalayer.settings import Settings

if TYPE_CHECKING:
    from datalayer.maintenance import Job, JobResult
    from datalayer.stats import Stats

__all__ = ["DataLayer"]

log = logging.getLogger("datalayer")
T = TypeVar("T")

# Errors worth waiting out while a database starts (refused, starting up, too many clients).
_RETRYABLE_CONNECT = (OSError, asyncio.TimeoutError, asyncpg.CannotConnectNowError,
                      asyncpg.TooManyConnectionsError, asyncpg.ConnectionDoesNotExistError)


def _jsonb_encode(value: Any) -> bytes:
    return b"\x01" + orjson.dumps(value)  # jsonb binary format: version byte, then text


def _jsonb_decode(data: bytes) -> Any:
    return orjson.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", schema="pg_catalog", format="binary",
                              encoder=_jsonb_encode, decoder=_jsonb_decode)
    await conn.set_type_codec("json", schema="pg_catalog", format="binary",
                              encoder=orjson.dumps, decoder=orjson.loads)


async def _keep_context(conn: asyncpg.Connection) -> None:
    """Pool reset: nothing to send. asyncpg has already rolled back any open transaction
    (``Connection._reset``); the context stays and is checked on the next acquire."""


class DataLayer:
    """Pools, registry and sessions for one process. ``async with DataLayer(settings) as dl``."""

    def __init__(self, settings: Settings | None = None, *,
                 extra_queries: Sequence[Path] = (), schema_dir: Path | None = None,
                 passwords: PasswordHasher | None = None) -> None:
        """Loads the registry and the keyring now (errors surface here); connects in
        :meth:`start`. ``extra_queries`` adds directories of query files (tests,
        extensions); ``passwords`` replaces the Argon2id policy (tests use a cheap one)."""
        self.settings = settings or Settings.from_env()
        self.schema_dir = schema_dir or resource_dir("schema")
        self.registry = Registry.load(resource_dir("queries"), *extra_queries)
        self.keyring = Keyring.from_settings(self.settings)
        self.passwords = passwords or PasswordHasher()
        # Per-query figures of every registry execution (datalayer/query_performance.py).
        self.metrics = QueryMetrics(self.settings)
        self._pool: asyncpg.Pool | None = None
        # Search's trigram fallback: pg_trgm installed and DATALAYER_SEARCH_FUZZY (start()).
        self.search_fuzzy = False
        self._redis: aioredis.Redis | None = None
        # The cache (DATALAYER_CACHE_BACKEND); its backend connects in start().
        self.cache = Cache.for_layer(self)
        # Imported here: these modules import this one (types, codecs).
        from datalayer.ratelimit import Limiter
        from datalayer.service_pool import ServicePool
        from datalayer.web_sessions import WebSessions

        # Connections outside tenant sessions, for the limiter and web sessions (lazy).
        self.service_pool = ServicePool(self.settings)
        self.limiter = Limiter.from_datalayer(self)
        self.web_sessions = WebSessions(self)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> DataLayer:
        """Connect (retrying with backoff up to ``connect_timeout_s``), then migrate or
        verify that the database is current. Raises ``Unavailable``, ``SchemaDrift``."""
        if self._pool is not None:
            return self
        s = self.settings
        await self._wait_for_database()
        if s.migrate_on_start:
            await asyncio.to_thread(migrations.apply, s, self.schema_dir)
        else:
            await asyncio.to_thread(migrations.verify, s, self.schema_dir)
        server_settings = {"application_name": s.application_name}
        if s.statement_timeout_ms:
            server_settings["statement_timeout"] = str(s.statement_timeout_ms)
        try:
            self._pool = await asyncpg.create_pool(
                s.database_url,
                min_size=s.pool_min_size,
                max_size=s.pool_max_size,
                init=_init_connection,
                reset=_keep_context,
                connection_class=DLConnection,
                statement_cache_size=max(s.statement_cache_size, 2 * len(self.registry)),
                server_settings=server_settings,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise (translate(exc) or Unavailable("cannot connect to the database")) from exc
        if s.search_fuzzy:  # pg_trgm and its index installed? (the search's typo fallback)
            # The registry's query on the bare connection, not through a session: start-up
            # work stays out of the query metrics.
            q = self.registry["search.fuzzy_available"]
            try:
                async with self._pool.acquire() as conn:
                    self.search_fuzzy = bool(await guarded(conn.fetchval(q.sql), q.name))
            except BaseException:
                await self._pool.close()  # start() failed: leave nothing open
                self._pool = None
                raise
        if s.redis_url:
            # Connects lazily on first command; an unreachable Redis fails that command
            # (callers decide whether to degrade), not start-up.
            self._redis = aioredis.Redis.from_url(s.redis_url, socket_connect_timeout=2,
                                                  socket_timeout=5)
        self.service_pool.open()
        self.metrics.start(self)
        await self.limiter.start()
        await self.cache.start()
        log.info("datalayer started", extra={"queries": len(self.registry),
                                              "context_mode": s.context_mode})
        return self

    async def _wait_for_database(self) -> None:
        s = self.settings
        deadline = time.monotonic() + s.connect_timeout_s
        delay = 0.1
        while True:
            try:
                conn = await asyncpg.connect(s.migration_url, timeout=5)
                await conn.close()
                return
            except _RETRYABLE_CONNECT as exc:
                if time.monotonic() + delay > deadline:
                    raise Unavailable(
                        f"PostgreSQL did not answer within {s.connect_timeout_s:g}s "
                        f"({type(exc).__name__}); is it running and is DATABASE_URL right?"
                    ) from exc
                log.info("waiting for database", extra={"retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except asyncpg.PostgresError as exc:
                raise (translate(exc) or Unavailable("the database refused the connection")) \
                    from exc

    async def close(self) -> None:
        await self.cache.close()  # writes its last statistics: before the pool goes
        await self.limiter.close()  # flushes violations: before the pool goes
        await self.metrics.close()  # writes the last slow-query samples: before the pool goes
        await self.service_pool.close()
        pool, self._pool = self._pool, None
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> DataLayer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def redis(self) -> aioredis.Redis | None:
        """The Redis client when ``REDIS_URL`` is set (``redis.asyncio``), else None."""
        return self._redis

    @property
    def pool(self) -> asyncpg.Pool:
        """The asyncpg pool. Connections from it may carry a tenant context: use sessions."""
        if self._pool is None:
            raise ConfigError("DataLayer is not started; use 'async with DataLayer(...)' "
                              "or await dl.start()")
        return self._pool

    async def _acquire(self) -> Any:
        return await acquire_with_timeout(self.pool, self.settings.acquire_timeout_s)

    async def _release(self, conn: Any, *, broken: bool) -> None:
        if broken:
            # Never hand out a connection in an unknown state. A connection that died
            # has already gone back to the pool; terminate() then refuses, harmlessly.
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
        await self.pool.release(conn)

    # -- sessions -----------------------------------------------------------------------
    def session(self, ctx: Context, *, readonly: bool = False,
                isolation: Isolation = "read_committed") -> SessionScope:
        """A session for ``ctx``: one connection, RLS enforced, context applied.

        Read-write: a transaction, committed on success and rolled back on any exception
        (cancellation included). ``readonly=True`` at READ COMMITTED runs statements
        directly, without BEGIN/COMMIT; with another isolation it opens a read-only
        transaction.
        """
        return SessionScope(self, ctx, readonly=readonly, isolation=isolation)

    def executor(self, conn: asyncpg.Connection) -> Session:
        """Run registry queries and repositories on a connection you manage yourself.

        No context is applied and no transaction is opened: what the connection's role
        may see is what it gets. For tools and benchmarks; request code uses sessions.
        """
        return Session(self, conn, None, readonly=False, in_transaction=False)

    async def connect_dedicated(self, name: str, purpose: str, *,
                                server_settings: dict[str, str] | None = None
                                ) -> asyncpg.Connection:
        """A connection outside the pool, for work that holds one of its own (LISTEN,
        advisory locks, plan inspection), named ``<application_name>-<name>``.
        ``Unavailable`` (saying ``purpose``) when it cannot connect; the caller closes it."""
        s = self.settings
        server = {"application_name": f"{s.application_name}-{name}", **(server_settings or {})}
        try:
            return await asyncpg.connect(s.database_url, timeout=s.connect_timeout_s,
                                         server_settings=server)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise Unavailable(f"cannot open a connection {purpose}") from exc

    def system(self) -> SessionScope:
        """A read-write session as the maintenance role (BYPASSRLS), for cross-tenant jobs
        (retention, roll-ups, refreshes). Never hand it to request code."""
        return SessionScope(self, None, readonly=False, isolation="read_committed", system=True)

    async def run_in_session(self, ctx: Context, fn: Callable[[Session], Awaitable[T]], *,
                             retries: int = 3, readonly: bool = False,
                             isolation: Isolation = "read_committed") -> T:
        """Run ``fn(db)`` in a session, re-running it (in a new transaction) on serialization
        failure or deadlock, up to ``retries`` times, with jittered exponential backoff.
        ``fn`` must be safe to re-run: everything it did in the database was rolled back."""
        attempt = 0
        while True:
            try:
                async with self.session(ctx, readonly=readonly, isolation=isolation) as db:
                    return await fn(db)
            except SerializationFailure:
                attempt += 1
                if attempt > retries:
                    raise
                await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))

    # -- introspection ------------------------------------------------------------------
    async def validate(self) -> list[QueryInfo]:
        """Prepare and describe every registry query (``datalayer check``)."""
        async with self.pool.acquire() as conn:
            return await self.registry.validate(conn, self.settings.database_url)

    async def health(self) -> dict[str, Any]:
        """Database latency, migrations current and unchanged, pool figures, Redis,
        replication lag, the oldest transaction and the last maintenance runs
        (``datalayer/health.py``). Raises nothing: failures are reported in the result
        (``ok`` false)."""
        from datalayer.health import check

        return await check(self)

    async def maintain(self, jobs: Iterable[str | Job] | None = None) -> list[JobResult]:
        """Run the maintenance jobs (all registered ones, or ``jobs`` by name), each under
        an advisory lock and recorded in ``maintenance_runs`` (``datalayer/maintenance.py``).
        A job running in another process is skipped; a failing one does not stop the rest."""
        from datalayer.maintenance import run_jobs

        return await run_jobs(self, jobs)

    async def stats(self, *, explain: bool = True) -> Stats:
        """In-process query figures next to ``pg_stat_statements`` (when available) and
        recommendations from the catalog (``datalayer/stats.py``)."""
        from datalayer.stats import collect

        return await collect(self, explain=explain)
