"""``NamespaceCache``: the operations on one namespace, and the single-flight load.

See :mod:`datalayer.cache.core` for what the guarantees are; this module is how the reads,
writes and loads of one namespace keep them.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson

from datalayer.cache._backend import GUARD_MAX_AGE_S, BackendUnavailable, Item
from datalayer.cache._codec import CodecError, decode, dumps, encode
from datalayer.cache._spec import (
    MAX_KEY,
    Counters,
    Flight,
    Loaded,
    Namespace,
    check_tags,
    ms_of,
)
from datalayer.cache._typed import row_converter
from datalayer.core.errors import ValidationError

if TYPE_CHECKING:
    from datalayer.cache.core import Cache

__all__ = ["NamespaceCache"]

T = TypeVar("T")
_MISSING: Any = object()


class NamespaceCache(Generic[T]):
    """The operations on one namespace; from ``cache.namespace(...)``. Keys are strings of
    at most 1,024 characters. Values are anything orjson writes (plus bytes, Decimal,
    timedelta); reads give JSON back, or the ``row`` dataclass of a typed namespace. None is
    never stored: a loader returning None is called again next time."""

    def __init__(self, cache: Cache, spec: Namespace, row: type[T] | None) -> None:
        self.cache = cache
        self.spec = spec
        self.row = row
        self._prefix = spec.name + ":"
        self._st = cache._counters.get(spec.name) or Counters()
        self._keyring = cache.keyring if spec.sensitive else None
        self._convert: Callable[[Any], T] | None = (
            row_converter(row) if row is not None else None)
        self._ttl_ms = ms_of(spec.ttl)
        self._window_ms = int(spec.ttl * spec.refresh_ahead * 1000)

    @property
    def name(self) -> str:
        return self.spec.name

    def _key(self, key: str) -> str:
        if type(key) is not str or not 0 < len(key) <= MAX_KEY:
            raise ValidationError(f"cache keys are strings of 1 to {MAX_KEY} characters")
        return self._prefix + key

    def _encode(self, fk: str, value: Any, ttl_ms: int) -> bytes:
        if value is None:
            raise ValidationError("None is not cached; delete the key instead")
        try:
            return encode(value, key=fk, expires_at_ms=int(time.time() * 1000) + ttl_ms,
                          compress_above=self.spec.compress_threshold, keyring=self._keyring)
        except TypeError as exc:
            raise ValidationError(f"cannot cache this value in {self.name}: {exc}") from None

    def _copy(self, value: Any) -> Any:
        """A value as a read from the cache returns it (JSON round trip): callers sharing
        one load never share one mutable object."""
        plain = orjson.loads(dumps(value))
        return plain if self._convert is None else self._convert(plain)

    def _decode(self, fk: str, blob: bytes) -> tuple[Any, int]:
        """(value, expires_at_ms), or (_MISSING, 0) for an unreadable entry (counted)."""
        try:
            value, exp = decode(blob, key=fk, keyring=self._keyring)
            if self._convert is not None:
                value = self._convert(value)
            return value, exp
        except (CodecError, TypeError, ValueError, KeyError) as exc:
            self._st.errors += 1
            self.cache._warn("entry", "cache: unreadable entry in %s treated as a miss (%s)",
                             self.name, exc)
            return _MISSING, 0

    async def _read(self, fk: str) -> bytes | None:
        c = self.cache
        if not c._healthy:
            self._st.errors += 1
            return None
        try:
            return await c.backend.get(fk)
        except BackendUnavailable as exc:
            c._failed(exc)
            self._st.errors += 1
            return None

    # -- basic operations ---------------------------------------------------------------
    async def get(self, key: str, default: Any = None) -> T | Any:
        """The cached value, or ``default``. One backend read; never raises for it."""
        fk = self._key(key)
        blob = await self._read(fk)
        if blob is not None:
            value, _ = self._decode(fk, blob)
            if value is not _MISSING:
                self._st.hits += 1
                return value
        self._st.misses += 1
        return default

    async def get_many(self, keys: Sequence[str]) -> dict[str, T]:
        """The cached values of ``keys`` (missing keys are absent). One backend round trip."""
        fks = [self._key(k) for k in keys]
        c, st = self.cache, self._st
        blobs: list[bytes | None] = [None] * len(fks)
        if not c._healthy:
            st.errors += 1
        elif fks:
            try:
                blobs = await c.backend.get_many(fks)
            except BackendUnavailable as exc:
                c._failed(exc)
                st.errors += 1
        out: dict[str, T] = {}
        for key, fk, blob in zip(keys, fks, blobs, strict=True):
            value = _MISSING if blob is None else self._decode(fk, blob)[0]
            if value is _MISSING:
                st.misses += 1
            else:
                st.hits += 1
                out[key] = value
        return out

    async def set(self, key: str, value: T | Any, *, ttl: float | None = None,
                  tags: Iterable[str] = ()) -> None:
        """Store ``value`` with its ``tags``, atomically, for ``ttl`` seconds (default: the
        namespace's). A no-op while the backend is down."""
        fk = self._key(key)
        ttl_ms = self._ttl_ms if ttl is None else ms_of(ttl)
        checked = check_tags(tags)
        blob = self._encode(fk, value, ttl_ms)
        c = self.cache
        if not c._healthy:
            self._st.errors += 1
            return
        try:
            await c.backend.store(fk, blob, ttl_ms, checked)
        except BackendUnavailable as exc:
            c._failed(exc)
            self._st.errors += 1
            return
        self._st.sets += 1

    async def set_many(self, values: Mapping[str, T | Any], *, ttl: float | None = None,
                       tags: Iterable[str] = ()) -> None:
        """Store several values (each with ``tags``). One backend round trip."""
        ttl_ms = self._ttl_ms if ttl is None else ms_of(ttl)
        checked = check_tags(tags)
        items = [Item(fk, self._encode(fk, v, ttl_ms), ttl_ms, checked)
                 for fk, v in ((self._key(k), v) for k, v in values.items())]
        c = self.cache
        if not c._healthy:
            self._st.errors += 1
            return
        try:
            await c.backend.store_many(items)
        except BackendUnavailable as exc:
            c._failed(exc)
            self._st.errors += 1
            return
        self._st.sets += len(items)

    async def delete(self, *keys: str) -> None:
        """Remove ``keys``; loads of them already in flight will not store. Never raises for
        the backend (a failed delete is replayed once it is back)."""
        fks = [self._key(k) for k in keys]
        if fks:
            self.cache._gen += 1
            self._st.deletes += len(fks)
            await self.cache._invalidate(keys=fks)

    async def clear(self) -> None:
        """Remove every entry of this namespace (in every process sharing the backend)."""
        self.cache._gen += 1
        await self.cache._invalidate(clear=self.name)

    async def incr(self, key: str, *, ttl: float | None = None) -> int | None:
        """Add one to a counter stored beside the entries (e.g. hit counts); its count, or
        None when the backend is down. The counter lives ``ttl`` (default: the
        namespace's) from its first increment."""
        fk = self._key(key)
        c = self.cache
        if not c._healthy:
            self._st.errors += 1
            return None
        try:
            return await c.backend.incr(fk, self._ttl_ms if ttl is None else ms_of(ttl))
        except BackendUnavailable as exc:
            c._failed(exc)
            self._st.errors += 1
            return None

    # -- read-through ---------------------------------------------------------------------
    async def get_or_set(self, key: str,
                         loader: Callable[[], Awaitable[T | Loaded[T] | None]], *,
                         ttl: float | None = None, tags: Iterable[str] = ()) -> T | None:
        """The cached value, or ``await loader()`` stored for next time (unless None).

        Concurrent misses of ``key`` share one ``loader`` call in this process, and (lease)
        one across processes. The loader may return :class:`Loaded` to give the TTL and
        tags it learned. Its exception propagates to its caller; callers that shared the
        failed load try once more with their own loader (again shared).
        """
        fk = self._key(key)
        ttl_ms = self._ttl_ms if ttl is None else ms_of(ttl)
        checked = check_tags(tags)
        c, st = self.cache, self._st
        flight = c._flights.get(fk)
        if flight is None or flight.gen != c._gen:  # a load in progress: join it unread
            blob = await self._read(fk)
            if blob is not None:
                value, exp = self._decode(fk, blob)
                if value is not _MISSING:
                    st.hits += 1
                    if self._window_ms and exp - time.time() * 1000 < self._window_ms \
                            and fk not in c._refreshing:
                        value = await self._refresh(fk, value, loader, ttl_ms, checked)
                    return value  # type: ignore[no-any-return]
        st.misses += 1
        for attempt in (0, 1):
            flight = c._flights.get(fk)
            mine = flight is None or flight.gen != c._gen
            if mine:
                task = asyncio.ensure_future(self._load(fk, loader, ttl_ms, checked, c._gen))
                c._track(task)
                flight = c._flights[fk] = Flight(task, c._gen)
            assert flight is not None
            try:
                value, validated = await asyncio.shield(flight.task)
            except Exception:
                # A joiner does not inherit another caller's failure (its loader may have
                # run in a session that caller's cancellation closed): it loads once more.
                if mine or attempt == 1:
                    raise
                continue
            # A joiner takes a shared result only when nothing was invalidated while it
            # was being loaded; otherwise it loads once more (a load that began after it).
            if mine or validated or attempt == 1:
                if not mine and value is not None:
                    value = self._copy(value)  # its own object, as a hit would give
                return value  # type: ignore[no-any-return]
        raise AssertionError("unreachable")

    async def _load(self, fk: str, loader: Callable[[], Awaitable[Any]], ttl_ms: int,
                    tags: tuple[str, ...], gen: int) -> tuple[Any, bool]:
        """The single flight: lease (or wait for another process's load), load, store
        guarded. Returns (value, validated): validated when the store was accepted, i.e.
        nothing the entry depends on was invalidated since the load began."""
        c, st = self.cache, self._st
        token = secrets.token_hex(8)
        since: int | None = None
        leased = False
        started = time.monotonic()
        try:
            if c._healthy:
                try:
                    deadline = started + self.spec.lease_s
                    delay = 0.002
                    while True:
                        lease = await c.backend.lease(fk, token, int(self.spec.lease_s * 1000),
                                                      if_absent=True)
                        since = lease.clock
                        if lease.value is not None:
                            value, _ = self._decode(fk, lease.value)
                            if value is not _MISSING:
                                return value, True  # another process loaded it
                            break  # unreadable: load and overwrite it
                        if lease.leased:
                            leased = True
                            break
                        if time.monotonic() >= deadline:
                            break  # the holder is slow or gone: load without the lease
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 0.05)
                except BackendUnavailable as exc:
                    c._failed(exc)
                    st.errors += 1
                    since = None
            result = await self._call_loader(loader)
            self._unflight(fk)
            value, ttl_ms, tags = self._unpack(result, ttl_ms, tags)
            validated = c._gen == gen
            if value is None:
                return None, False
            blob = self._encode(fk, value, ttl_ms)
            if since is not None and c._healthy and \
                    time.monotonic() - started < GUARD_MAX_AGE_S:
                try:
                    stored = await c.backend.store(fk, blob, ttl_ms, tags, since=since,
                                                   lease_token=token if leased else None)
                    leased = False
                except BackendUnavailable as exc:
                    c._failed(exc)
                    st.errors += 1
                    stored = False
                st.sets += stored
                validated = validated and stored
            else:
                validated = validated and since is None and not c._healthy
            return value, validated
        finally:
            self._unflight(fk)
            if leased and c._healthy:
                try:
                    await c.backend.release(fk, token)
                except BackendUnavailable as exc:
                    c._failed(exc)

    def _unflight(self, fk: str) -> None:
        flights = self.cache._flights
        f = flights.get(fk)
        if f is not None and f.task is asyncio.current_task():
            del flights[fk]

    async def _call_loader(self, loader: Callable[[], Awaitable[Any]]) -> Any:
        st = self._st
        st.loads += 1
        t0 = time.perf_counter()
        try:
            return await loader()
        finally:
            st.load_ms += (time.perf_counter() - t0) * 1000

    def _unpack(self, result: Any, ttl_ms: int, tags: tuple[str, ...],
                ) -> tuple[Any, int, tuple[str, ...]]:
        if isinstance(result, Loaded):
            if result.ttl is not None:
                ttl_ms = ms_of(result.ttl)
            if result.tags:
                tags = tags + check_tags(result.tags)
            return result.value, ttl_ms, tags
        return result, ttl_ms, tags

    async def _refresh(self, fk: str, current: Any, loader: Callable[[], Awaitable[Any]],
                       ttl_ms: int, tags: tuple[str, ...]) -> Any:
        """Refresh-ahead by this caller: with the lease (no other process refreshing), load
        and store; everyone else keeps getting ``current`` meanwhile."""
        c, st = self.cache, self._st
        c._refreshing.add(fk)
        token = secrets.token_hex(8)
        leased = False
        try:
            try:
                lease = await c.backend.lease(fk, token, int(self.spec.lease_s * 1000),
                                              if_absent=False)
            except BackendUnavailable as exc:
                c._failed(exc)
                return current
            if not lease.leased:
                return current
            leased = True
            started = time.monotonic()
            st.refreshes += 1
            value, ttl_ms, tags = self._unpack(await self._call_loader(loader), ttl_ms, tags)
            if value is None:
                return current
            blob = self._encode(fk, value, ttl_ms)
            if time.monotonic() - started < GUARD_MAX_AGE_S:
                try:
                    st.sets += await c.backend.store(fk, blob, ttl_ms, tags, since=lease.clock,
                                                     lease_token=token)
                    leased = False
                except BackendUnavailable as exc:
                    c._failed(exc)
            return value
        finally:
            c._refreshing.discard(fk)
            if leased and c._healthy:
                try:
                    await c.backend.release(fk, token)
                except BackendUnavailable as exc:
                    c._failed(exc)
