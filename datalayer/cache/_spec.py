"""Namespace configuration, loader results, statistics: the plain types of the cache."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from datalayer.core.errors import ValidationError

__all__ = ["MAX_KEY", "CacheStats", "Counters", "Flight", "Loaded", "Namespace", "check_tags",
           "ms_of"]

T = TypeVar("T")
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
MAX_KEY = 1024


@dataclass(frozen=True, slots=True)
class Namespace:
    """How one family of keys is cached.

    ``ttl`` (seconds) is the default lifetime; ``sensitive`` encrypts every value with the
    DataLayer's keyring (bound to its key); values whose JSON exceeds ``compress_threshold``
    bytes are zlib-compressed (None: never). ``refresh_ahead`` (0 ≤ f < 1): a
    ``get_or_set`` hit in the last ``f * ttl`` of an entry's life reloads it. ``lease_s``:
    how long one process may load a key while others wait.
    """

    name: str
    ttl: float = 300.0
    sensitive: bool = False
    compress_threshold: int | None = 1024
    refresh_ahead: float = 0.0
    lease_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValidationError("a namespace name is 1-64 characters of a-z, 0-9, '_', '.' "
                                  "and '-', starting with a letter or digit")
        if not self.ttl > 0:
            raise ValidationError(f"namespace {self.name}: ttl must be > 0 seconds")
        if not 0 <= self.refresh_ahead < 1:
            raise ValidationError(f"namespace {self.name}: refresh_ahead must be in [0, 1)")
        if not self.lease_s > 0:
            raise ValidationError(f"namespace {self.name}: lease_s must be > 0")
        if self.compress_threshold is not None and self.compress_threshold < 0:
            raise ValidationError(f"namespace {self.name}: compress_threshold must be >= 0")


@dataclass(frozen=True, slots=True)
class Loaded(Generic[T]):
    """What a loader may return instead of a bare value: the value with a TTL and tags that
    are only known once it is loaded (e.g. an API key's expiry and organization)."""

    value: T | None
    ttl: float | None = None
    tags: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of one namespace in this process since start (``load_ms``: loader time)."""

    hits: int = 0
    misses: int = 0
    sets: int = 0
    deletes: int = 0
    evictions: int = 0
    errors: int = 0
    loads: int = 0
    load_ms: float = 0.0
    refreshes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class Counters:
    __slots__ = ("deletes", "errors", "hits", "load_ms", "loads", "misses", "refreshes", "sets")

    def __init__(self) -> None:
        self.hits = self.misses = self.sets = self.deletes = self.errors = 0
        self.loads = self.refreshes = 0
        self.load_ms = 0.0


class Flight:
    """One load in progress; joinable until its loader has returned."""

    __slots__ = ("gen", "task")

    def __init__(self, task: asyncio.Task[tuple[Any, bool]], gen: int) -> None:
        self.task = task
        self.gen = gen


def check_tags(tags: Iterable[str]) -> tuple[str, ...]:
    out = tuple(tags)
    for t in out:
        if not isinstance(t, str) or not t or len(t) > 512 or t[0] == "#":
            raise ValidationError("a tag is a non-empty string of at most 512 characters "
                                  "that does not start with '#'")
    return out


def ms_of(ttl: float) -> int:
    if not ttl > 0:
        raise ValidationError("ttl must be > 0 seconds")
    return max(1, int(ttl * 1000))
