"""The cache front: namespaces, stampede protection, tags, statistics, and degradation.

``Cache`` wraps one backend (:mod:`.memory`, :mod:`.redis`, :mod:`.postgres`) and hands out
one :class:`NamespaceCache` per :class:`Namespace`. What it adds over the backend:

* **Stampede protection.** Concurrent ``get_or_set`` misses of one key in this process
  share one load (single-flight); across processes a lease in the backend lets one loader
  run while the others poll for its result. A hit in the last ``refresh_ahead`` part of an
  entry's life makes *that* caller reload it (holding the lease) while every other caller
  keeps getting the current value.
* **No stale value after an invalidation.** Loads are guarded (see ``_backend``): a value
  read from the database before a write committed is never stored after that write's
  invalidation, and a caller arriving after an invalidation never shares a load that began
  before it (its result is re-checked; on doubt, the caller loads again).
* **Degradation.** When the backend fails (Redis down, a timeout, PostgreSQL unreachable),
  every operation degrades to a miss (reads go to the loader, i.e. the database) or a
  no-op, never raises, counts an ``errors`` stat and logs one warning per interval. The
  backend is then left alone: a recovery task probes it every ``retry_interval_s``.
  Invalidations that could not be applied are remembered (deduplicated, bounded) and
  replayed before the cache serves reads again, so a value invalidated while the backend
  was unreachable is not served after it returns. Limits, stated plainly: another process
  that never saw the outage may read such a value from the backend until this process has
  replayed (at most about one retry interval after the backend returns); if this process
  dies first, until the entry's TTL. Past ``max_pending`` distinct invalidations, the
  replay clears every namespace this process uses instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar, overload

from datalayer.cache._backend import Backend, BackendBusy, BackendUnavailable
from datalayer.cache._spec import CacheStats, Counters, Flight, Loaded, Namespace, check_tags
from datalayer.cache.namespace import NamespaceCache
from datalayer.core.errors import ValidationError
from datalayer.security.keyring import Keyring

if TYPE_CHECKING:
    from datalayer.cache.ai import AICache
    from datalayer.core.database import DataLayer

__all__ = ["Cache", "CacheStats", "Loaded", "Namespace", "NamespaceCache"]

log = logging.getLogger("datalayer.cache")

T = TypeVar("T")
STATS_KEEP_DAYS = 30


class Cache:
    """One backend, its namespaces and their statistics. Use ``dl.cache``, or build one
    over any backend (tests, tools). Call :meth:`start` and :meth:`close`.

    ``keyring`` encrypts sensitive namespaces (required to use one); ``layer`` is where
    statistics are written (``cache_stats``, every ``stats_interval_s``; 0: never).
    """

    def __init__(self, backend: Backend, *, keyring: Keyring | None = None,
                 layer: DataLayer | None = None, stats_interval_s: float = 0.0,
                 retry_interval_s: float = 1.0, warn_interval_s: float = 30.0,
                 max_pending: int = 10_000, instance: str | None = None) -> None:
        self.backend = backend
        self.keyring = keyring
        self._layer = layer
        self._stats_interval = stats_interval_s
        self._retry = retry_interval_s
        self._warn_interval = warn_interval_s
        self._max_pending = max_pending
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._handles: dict[str, NamespaceCache[Any]] = {}
        self._counters: dict[str, Counters] = {}
        self._flushed: dict[str, CacheStats] = {}
        self._flights: dict[str, Flight] = {}
        self._refreshing: set[str] = set()
        self._gen = 0  # bumped by every invalidation made through this Cache
        self._healthy = True
        self._pending_keys: set[str] = set()
        self._pending_tags: set[str] = set()
        self._pending_clear: set[str] = set()
        self._overflow = False
        self._last_warn = {"backend": -1e18, "entry": -1e18, "busy": -1e18}
        self._suppressed = {"backend": 0, "entry": 0, "busy": 0}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recovery: asyncio.Task[None] | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._ai: AICache | None = None

    @classmethod
    def for_layer(cls, dl: DataLayer) -> Cache:
        """The cache ``DataLayer`` builds from its settings (``DATALAYER_CACHE_*``)."""
        s = dl.settings
        backend: Backend
        kind = s.cache_backend_name
        if kind == "redis":
            from datalayer.cache.redis import RedisBackend

            assert s.redis_url is not None  # Settings guarantees it
            backend = RedisBackend(s.redis_url, prefix=s.cache_prefix)
        elif kind == "postgres":
            from datalayer.cache.postgres import PostgresBackend

            backend = PostgresBackend(dl)
        else:
            from datalayer.cache.memory import MemoryBackend

            backend = MemoryBackend(s.cache_max_bytes)
        return cls(backend, keyring=dl.keyring, layer=dl,
                   stats_interval_s=s.cache_stats_interval_s)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await self.backend.start()
        except BackendUnavailable as exc:
            self._failed(exc)
        if self._stats_interval > 0 and self._maintenance is None:
            self._maintenance = asyncio.create_task(self._maintain_loop())

    async def close(self) -> None:
        """Stop background work, write the last statistics, close the backend."""
        tasks = [t for t in (self._maintenance, self._recovery) if t is not None]
        tasks += [f.task for f in self._flights.values()] + list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):  # cancelled, or already reported
                await t
        self._maintenance = self._recovery = None
        self._flights.clear()
        if self._layer is not None and self._stats_interval > 0:
            await self.flush_stats()
        with contextlib.suppress(BackendUnavailable):
            await self.backend.close()

    @property
    def healthy(self) -> bool:
        """False while the backend is considered down (operations degrade)."""
        return self._healthy

    @property
    def ai(self) -> AICache:
        """Typed namespaces for AI workloads (embeddings, vector search, LLM responses)."""
        if self._ai is None:
            from datalayer.cache.ai import AICache

            self._ai = AICache(self)
        return self._ai

    # -- namespaces ---------------------------------------------------------------------
    @overload
    def namespace(self, spec: Namespace | str, *, row: None = None) -> NamespaceCache[Any]: ...

    @overload
    def namespace(self, spec: Namespace | str, *, row: type[T]) -> NamespaceCache[T]: ...

    def namespace(self, spec: Namespace | str, *, row: type[Any] | None = None,
                  ) -> NamespaceCache[Any]:
        """The handle of a namespace (created on first use). ``row``: a dataclass that
        values are rebuilt into on read. One name, one configuration: asking again with a
        different one is a ``ValidationError``."""
        name = spec if isinstance(spec, str) else spec.name
        h = self._handles.get(name)
        if h is not None:
            if (isinstance(spec, Namespace) and spec != h.spec) or (
                    row is not None and row is not h.row):
                raise ValidationError(f"cache namespace {name} is already configured "
                                      "differently in this process")
            return h
        ns = Namespace(spec) if isinstance(spec, str) else spec
        if ns.sensitive and self.keyring is None:
            raise ValidationError(f"namespace {ns.name} is sensitive: the cache needs a keyring")
        h = NamespaceCache(self, ns, row)
        self._handles[name] = h
        self._counters.setdefault(name, h._st)
        return h

    async def invalidate_tags(self, *tags: str) -> None:
        """Remove every entry, in any namespace, carrying any of ``tags``. Never raises for
        the backend: when it is down the invalidation is kept and replayed (see module)."""
        checked = check_tags(tags)
        if checked:
            self._gen += 1
            await self._invalidate(tags=checked)

    def stats(self) -> dict[str, CacheStats]:
        """Per-namespace counters of this process (evictions: the backend's, for space)."""
        evicted = self.backend.evictions()
        return {name: CacheStats(hits=c.hits, misses=c.misses, sets=c.sets, deletes=c.deletes,
                                 evictions=evicted.get(name, 0), errors=c.errors,
                                 loads=c.loads, load_ms=c.load_ms, refreshes=c.refreshes)
                for name, c in self._counters.items()}

    # -- invalidation and degradation ---------------------------------------------------
    async def _invalidate(self, *, keys: Sequence[str] = (), tags: Sequence[str] = (),
                          clear: str | None = None) -> None:
        if self._healthy:
            try:
                await self._apply(keys, tags, clear)
                return
            except BackendUnavailable as exc:
                # Even when merely busy: until this is replayed, reads must not trust the
                # backend, so it counts as down.
                self._failed(exc, down=True)
        self._remember(keys, tags, clear)

    async def _apply(self, keys: Sequence[str], tags: Sequence[str], clear: str | None) -> None:
        b = self.backend
        if keys:
            await b.delete(keys)
        if tags:
            await b.invalidate(tags)
        if clear is not None:
            await b.clear(clear)

    def _remember(self, keys: Sequence[str], tags: Sequence[str], clear: str | None) -> None:
        if self._overflow:
            return
        self._pending_keys.update(keys)
        self._pending_tags.update(tags)
        if clear is not None:
            self._pending_clear.add(clear)
        size = len(self._pending_keys) + len(self._pending_tags) + len(self._pending_clear)
        if size > self._max_pending:
            self._overflow = True
            self._pending_keys.clear()
            self._pending_tags.clear()
            self._pending_clear.clear()

    def _failed(self, exc: BaseException, *, down: bool = False) -> None:
        """The backend failed: degrade, warn (once per interval), start probing it. A busy
        backend (no free connection) only fails this operation, unless ``down``."""
        if isinstance(exc, BackendBusy) and not down:
            self._warn("busy", "cache backend %s busy (%s); this operation degrades",
                       self.backend.name, exc)
            return
        self._healthy = False
        self._warn("backend", "cache backend %s unavailable (%s); operations degrade to "
                   "misses until it answers again", self.backend.name, exc)
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover())

    def _warn(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warn[kind] >= self._warn_interval:
            suppressed, self._suppressed[kind] = self._suppressed[kind], 0
            self._last_warn[kind] = now
            log.warning(msg + " (%d similar messages suppressed)", *args, suppressed,
                        extra={"backend": self.backend.name, "suppressed": suppressed})
        else:
            self._suppressed[kind] += 1

    async def _recover(self) -> None:
        """Probe every retry interval; once the backend answers, replay what could not be
        invalidated, then serve from it again."""
        while True:
            await asyncio.sleep(self._retry)
            try:
                await self.backend.start()
                await self.backend.ping()
                while (self._pending_keys or self._pending_tags or self._pending_clear
                       or self._overflow):
                    await self._replay()
            except BackendUnavailable:
                continue
            self._healthy = True
            log.info("cache backend %s is back; pending invalidations replayed",
                     self.backend.name, extra={"backend": self.backend.name})
            return

    async def _replay(self) -> None:
        if self._overflow:
            self._overflow = False
            names = list(self._handles)
            log.error("cache: more than %d invalidations were missed while the backend was "
                      "down; clearing namespaces %s (other processes' namespaces may stay "
                      "stale until their TTL)", self._max_pending, names)
            try:
                for name in names:
                    await self.backend.clear(name)
            except BackendUnavailable:
                self._overflow = True
                raise
            return
        keys, tags, clears = self._pending_keys, self._pending_tags, self._pending_clear
        self._pending_keys, self._pending_tags, self._pending_clear = set(), set(), set()
        try:
            if keys:
                await self.backend.delete(sorted(keys))
                keys = set()
            if tags:
                await self.backend.invalidate(sorted(tags))
                tags = set()
            while clears:
                await self.backend.clear(min(clears))
                clears.discard(min(clears))
        except BackendUnavailable:
            self._remember(list(keys), list(tags), None)
            for name in clears:
                self._remember((), (), name)
            raise

    # -- statistics and maintenance -----------------------------------------------------
    async def flush_stats(self) -> int:
        """Append this process's per-namespace deltas since the last flush to
        ``cache_stats`` (one statement, maintenance role). Returns rows written; on a
        database error logs and keeps the deltas for next time."""
        if self._layer is None:
            return 0
        now = self.stats()
        rows: dict[str, dict[str, float]] = {}
        for name, s in now.items():
            before = self._flushed.get(name, CacheStats())
            delta = {f.name: getattr(s, f.name) - getattr(before, f.name) for f in fields(s)}
            if any(delta.values()):
                rows[name] = delta
        if not rows:
            return 0
        cols = {f.name: [rows[n][f.name] for n in rows] for f in fields(CacheStats)}
        try:
            async with self._layer.system() as db:
                await db.exec("cache.record_stats", instance=self.instance,
                              backend=self.backend.name, namespaces=list(rows),
                              **{k: (v if k == "load_ms" else [int(x) for x in v])
                                 for k, v in cols.items()})
        except Exception as exc:
            log.warning("cache: could not write cache_stats (%s); will retry", exc)
            return 0
        self._flushed.update(now)
        return len(rows)

    async def maintain(self) -> None:
        """One round of housekeeping: write statistics (and drop those older than
        ``STATS_KEEP_DAYS``), let the backend clean up."""
        if await self.flush_stats() and self._layer is not None:
            try:
                async with self._layer.system() as db:
                    await db.execrows("cache.prune_stats", keep_days=STATS_KEEP_DAYS)
            except Exception as exc:
                log.warning("cache: could not prune cache_stats (%s)", exc)
        if self._healthy:
            try:
                await self.backend.maintain()
            except BackendUnavailable as exc:
                self._failed(exc)

    async def _maintain_loop(self) -> None:
        while True:
            await asyncio.sleep(self._stats_interval)
            try:
                await self.maintain()
            except Exception:
                log.exception("cache maintenance failed")

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(_settled)
        task.add_done_callback(self._tasks.discard)


def _settled(task: asyncio.Task[Any]) -> None:
    """Mark a load's exception as retrieved: its callers re-raise it; if every caller was
    cancelled meanwhile, nobody needs it."""
    if not task.cancelled():
        task.exception()
