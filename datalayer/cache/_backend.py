"""The contract between the cache front (:mod:`datalayer.cache.core`) and its stores.

A backend stores opaque bytes under full keys (``"namespace:key"``) with a TTL, keeps tag
memberships, and answers three questions the front needs for correctness under concurrency:

* **Guarded stores.** Every invalidation (of a tag, a key, or a whole namespace) takes the
  next value of a backend-wide *clock* and records it as that tag's version. A load first
  reads the clock (``lease`` or ``clock``); its ``store(..., since=clock)`` is refused when
  any of the entry's tags, its key or its namespace was invalidated after that. So a loader
  that read the database before a write committed can never put its stale value back after
  the write's invalidation: once an invalidation has returned, no entry older than it is
  readable. Versions live ``VERSION_TTL_S``; the front never stores a load older than
  ``GUARD_MAX_AGE_S``, so a version that has expired can no longer matter.
* **Leases.** ``lease`` takes a short lock per key (or returns the value when it appeared
  meanwhile) so that one process loads while others wait; ``store`` releases it atomically.
* **Atomic tags.** A value and its tag memberships are written in one step.

Backends raise :class:`BackendUnavailable` for anything that means "the store did not
answer"; the front turns that into a miss or a no-op (see ``core``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "GUARD_MAX_AGE_S",
    "VERSION_TTL_S",
    "Backend",
    "BackendBusy",
    "BackendUnavailable",
    "Item",
    "Lease",
    "ReadBatcher",
    "guard_tags",
    "key_tag",
    "namespace_of",
    "ns_tag",
]

GUARD_MAX_AGE_S = 60.0  # a load that took longer than this is not stored
VERSION_TTL_S = 2 * GUARD_MAX_AGE_S  # how long an invalidation's version is remembered


class BackendUnavailable(Exception):
    """The backend did not answer (refused, timed out, lost, or errored)."""


class BackendBusy(BackendUnavailable):
    """Every connection to the backend stayed in use for the wait limit: this process is
    overloaded, the backend is not down. The operation degrades; the backend stays in use."""


@dataclass(frozen=True, slots=True)
class Item:
    """One entry for ``store_many``."""

    key: str
    value: bytes
    ttl_ms: int
    tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Lease:
    """What ``lease`` found: the value (already cached: no lease taken), or whether this
    caller now holds the lease; and the clock to guard the coming store with."""

    value: bytes | None
    leased: bool
    clock: int


def namespace_of(key: str) -> str:
    return key.partition(":")[0]


def key_tag(key: str) -> str:
    """The pseudo-tag a delete of ``key`` bumps (user tags never start with '#')."""
    return "#k:" + key


def ns_tag(namespace: str) -> str:
    """The pseudo-tag a clear of ``namespace`` bumps."""
    return "#n:" + namespace


def guard_tags(key: str, tags: Sequence[str]) -> list[str]:
    """Every tag whose invalidation after a load's start refuses its store."""
    return [*tags, key_tag(key), ns_tag(namespace_of(key))]


class ReadBatcher:
    """Coalesce concurrent single-key reads into one multi-key read (one round trip).

    A read while no other is in flight goes out at once (no added latency). A read while
    others are in flight opens a batch, or joins the open one: the batch's first reader
    yields once to the event loop so that every read started in the same loop iteration
    joins it, then reads all their keys at once (1,000 callers of one cold key: two round
    trips, not 1,000). A caller only ever joins a read that has not been sent yet, so it
    never receives a value read before it started.
    """

    def __init__(self, fetch_one: Callable[[str], Awaitable[bytes | None]],
                 fetch_many: Callable[[list[str]], Awaitable[list[bytes | None]]]) -> None:
        self._one = fetch_one
        self._many = fetch_many
        self._open: dict[str, asyncio.Future[bytes | None]] | None = None
        self._inflight = 0

    async def get(self, key: str) -> bytes | None:
        batch = self._open
        if batch is not None:  # join the batch being collected
            fut = batch.get(key)
            if fut is None:
                fut = batch[key] = asyncio.get_running_loop().create_future()
                fut.add_done_callback(_retrieved)
            return await asyncio.shield(fut)
        self._inflight += 1
        try:
            if self._inflight == 1:
                return await self._one(key)  # nothing else in flight: no batching
            batch = self._open = {}
            try:
                await asyncio.sleep(0)
            finally:
                self._open = None
            return await self._send(key, batch)
        finally:
            self._inflight -= 1

    async def _send(self, key: str, batch: dict[str, asyncio.Future[bytes | None]],
                    ) -> bytes | None:
        keys = [key, *(k for k in batch if k != key)]
        try:
            values = [await self._one(key)] if len(keys) == 1 else await self._many(keys)
        except BaseException as exc:
            _fail(batch, exc)
            raise
        for k, v in zip(keys, values, strict=True):
            fut = batch.get(k)
            if fut is not None:
                fut.set_result(v)
        return values[0]


def _retrieved(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _fail(batch: dict[str, asyncio.Future[bytes | None]], exc: BaseException) -> None:
    """The batch's reader failed or was cancelled: its joiners degrade (a miss each)."""
    err = exc if isinstance(exc, BackendUnavailable) else BackendBusy(
        f"the batched read failed ({type(exc).__name__})")
    for fut in batch.values():
        if not fut.done():
            fut.set_exception(err)


class Backend(Protocol):
    """A cache store. Every method may raise :class:`BackendUnavailable`."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def store(self, key: str, value: bytes, ttl_ms: int, tags: Sequence[str], *,
                    since: int | None = None, lease_token: str | None = None) -> bool:
        """Write ``value`` and its tag memberships atomically; with ``since``, only if no
        guard tag was invalidated after clock ``since`` (False: refused). Releases the
        lease ``lease_token`` either way."""
        ...

    async def store_many(self, items: Sequence[Item]) -> None: ...

    async def delete(self, keys: Sequence[str]) -> int: ...

    async def invalidate(self, tags: Sequence[str]) -> int:
        """Remove every entry carrying any of ``tags``; returns how many."""
        ...

    async def clear(self, namespace: str) -> int: ...

    async def lease(self, key: str, token: str, ttl_ms: int, *, if_absent: bool) -> Lease:
        """Take the load lease of ``key`` for ``ttl_ms``. With ``if_absent``, return the
        value instead when the key is cached."""
        ...

    async def release(self, key: str, token: str) -> None: ...

    async def clock(self) -> int: ...

    async def incr(self, key: str, ttl_ms: int) -> int:
        """Add one to a counter (created with ``ttl_ms``); the new count."""
        ...

    def evictions(self) -> Mapping[str, int]:
        """Entries evicted for space so far, per namespace (cumulative)."""
        ...

    async def maintain(self) -> None:
        """Periodic housekeeping (expired rows, old versions)."""
        ...
