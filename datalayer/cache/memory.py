"""In-process cache backend: LRU bounded by bytes, per-process (no sharing across processes).

Each entry costs ``len(key) + len(value) + tag names + ENTRY_OVERHEAD`` bytes against the
budget; inserting past the budget evicts least-recently-used entries. Expired entries go on
read and in :meth:`maintain`. Everything is O(1) per operation except tag invalidation
(O(entries carrying the tag)) and ``clear`` (O(entries)). Not thread-safe: one event loop.

Invalidation reaches only this process: with several processes, use Redis or PostgreSQL,
or accept staleness up to the TTL.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence

from datalayer.cache._backend import (
    VERSION_TTL_S,
    Item,
    Lease,
    guard_tags,
    key_tag,
    namespace_of,
    ns_tag,
)

__all__ = ["ENTRY_OVERHEAD", "MemoryBackend"]

ENTRY_OVERHEAD = 120  # bytes: dict slot, OrderedDict link, entry object, bytes headers
SWEEP = 10_000


class _Entry:
    __slots__ = ("expires", "size", "tags", "value")

    def __init__(self, value: bytes, expires: float, tags: tuple[str, ...], size: int) -> None:
        self.value = value
        self.expires = expires
        self.tags = tags
        self.size = size


class MemoryBackend:
    """``max_bytes``: the budget; ``clock``: seconds, monotonic (tests may pass their own)."""

    name = "memory"

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 1024:
            raise ValueError("max_bytes must be at least 1024")
        self.max_bytes = max_bytes
        self._now = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._tags: dict[str, set[str]] = {}
        self._versions: dict[str, tuple[int, float]] = {}
        self._prune_at = 1024
        self._clock = 0
        self._leases: dict[str, tuple[str, float]] = {}
        self._counters: dict[str, tuple[int, float]] = {}
        self._bytes = 0
        self._evictions: Counter[str] = Counter()

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def ping(self) -> None:
        pass

    # -- reads ----------------------------------------------------------------------------
    def _get(self, key: str) -> bytes | None:
        e = self._entries.get(key)
        if e is None:
            return None
        if e.expires <= self._now():
            self._remove(key, e)
            return None
        self._entries.move_to_end(key)
        return e.value

    async def get(self, key: str) -> bytes | None:
        return self._get(key)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._get(k) for k in keys]

    # -- writes ---------------------------------------------------------------------------
    def _remove(self, key: str, e: _Entry) -> None:
        del self._entries[key]
        self._bytes -= e.size
        for t in e.tags:
            members = self._tags.get(t)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._tags[t]

    def _put(self, key: str, value: bytes, ttl_ms: int, tags: Sequence[str]) -> None:
        old = self._entries.get(key)
        if old is not None:
            self._remove(key, old)
        tags = tuple(dict.fromkeys(tags))
        size = len(key) + len(value) + sum(len(t) for t in tags) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return  # larger than the whole budget: never cached
        self._entries[key] = _Entry(value, self._now() + ttl_ms / 1000, tags, size)
        self._bytes += size
        for t in tags:
            self._tags.setdefault(t, set()).add(key)
        while self._bytes > self.max_bytes:
            victim, e = next(iter(self._entries.items()))
            self._remove(victim, e)
            self._evictions[namespace_of(victim)] += 1

    def _version(self, tag: str) -> int:
        v = self._versions.get(tag)
        return 0 if v is None else v[0]

    async def store(self, key: str, value: bytes, ttl_ms: int, tags: Sequence[str], *,
                    since: int | None = None, lease_token: str | None = None) -> bool:
        ok = since is None or all(self._version(t) <= since for t in guard_tags(key, tags))
        if ok:
            self._put(key, value, ttl_ms, tags)
        if lease_token is not None:
            self._release(key, lease_token)
        return ok

    async def store_many(self, items: Sequence[Item]) -> None:
        for it in items:
            self._put(it.key, it.value, it.ttl_ms, it.tags)

    def _bump(self, tags: Sequence[str]) -> None:
        self._clock += 1
        now = self._now()
        for t in tags:
            self._versions[t] = (self._clock, now)
        if len(self._versions) > self._prune_at:
            horizon = now - VERSION_TTL_S
            self._versions = {t: v for t, v in self._versions.items() if v[1] > horizon}
            self._prune_at = max(1024, 2 * len(self._versions))

    async def delete(self, keys: Sequence[str]) -> int:
        self._bump([key_tag(k) for k in keys])
        n = 0
        for k in keys:
            e = self._entries.get(k)
            if e is not None:
                self._remove(k, e)
                n += 1
        return n

    async def invalidate(self, tags: Sequence[str]) -> int:
        self._bump(tags)
        n = 0
        for t in tags:
            for k in list(self._tags.get(t, ())):
                e = self._entries.get(k)
                if e is not None:
                    self._remove(k, e)
                    n += 1
        return n

    async def clear(self, namespace: str) -> int:
        self._bump([ns_tag(namespace)])
        prefix = namespace + ":"
        victims = [k for k in self._entries if k.startswith(prefix)]
        for k in victims:
            self._remove(k, self._entries[k])
        for k in [k for k in self._counters if k.startswith(prefix)]:
            del self._counters[k]
        return len(victims)

    # -- leases, clock, counters ------------------------------------------------------------
    async def lease(self, key: str, token: str, ttl_ms: int, *, if_absent: bool) -> Lease:
        if if_absent:
            value = self._get(key)
            if value is not None:
                return Lease(value, False, self._clock)
        now = self._now()
        held = self._leases.get(key)
        if held is not None and held[1] > now:
            return Lease(None, False, self._clock)
        self._leases[key] = (token, now + ttl_ms / 1000)
        return Lease(None, True, self._clock)

    def _release(self, key: str, token: str) -> None:
        held = self._leases.get(key)
        if held is not None and held[0] == token:
            del self._leases[key]

    async def release(self, key: str, token: str) -> None:
        self._release(key, token)

    async def clock(self) -> int:
        return self._clock

    async def incr(self, key: str, ttl_ms: int) -> int:
        now = self._now()
        held = self._counters.get(key)
        if held is None or held[1] <= now:
            self._counters[key] = (1, now + ttl_ms / 1000)
            return 1
        self._counters[key] = (held[0] + 1, held[1])
        return held[0] + 1

    def evictions(self) -> Mapping[str, int]:
        return self._evictions

    async def maintain(self) -> None:
        """Drop expired entries among the ``SWEEP`` least recently used (reads drop the
        others; a full sweep of a big cache would stall the event loop), expired leases
        and counters."""
        now = self._now()
        oldest = itertools.islice(self._entries.items(), SWEEP)
        for k in [k for k, e in oldest if e.expires <= now]:
            self._remove(k, self._entries[k])
        self._leases = {k: v for k, v in self._leases.items() if v[1] > now}
        self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
