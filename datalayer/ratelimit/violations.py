"""Violations: rejections counted per key and window, written in batches, with alert hooks.

``record`` is on the request path and costs a dict update: no I/O. ``flush`` (the limiter
runs it every second, and at close) adds each (key, window) count to
``rate_limit_violations`` with one UPSERT for the whole batch, so the table holds one row
per key and window however many requests were rejected, summed over every process. The
totals the UPSERT returns drive the hooks: a hook registered with ``threshold=T`` is
called once per key and window, by the process whose flush takes the total from below
``T`` to ``T`` or more. Without a store (no database) the totals are this process's.

Windows are aligned to the epoch on the backend's clock (the time of the check that
rejected), so every process agrees on them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = ["PostgresViolationStore", "Violation", "ViolationHook", "ViolationStore",
           "Violations"]

log = logging.getLogger("datalayer.ratelimit")


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation:
    """Rejections of one key in one window. ``count`` is the window's total so far."""

    operation: str
    key: str
    window_start: datetime
    window_s: int
    count: int
    first_at: datetime
    last_at: datetime


ViolationHook = Callable[[Violation], Awaitable[None] | None]


class ViolationStore(Protocol):
    async def add(self, window_s: int, batch: Sequence[Violation]) -> list[int]:
        """Add ``batch`` (unique keys and windows); the new totals, in the same order."""
        ...


class PostgresViolationStore:
    """``rate_limit_violations``, written through ``dl.system()`` (off the request path)."""

    def __init__(self, dl: DataLayer) -> None:
        self._dl = dl

    async def add(self, window_s: int, batch: Sequence[Violation]) -> list[int]:
        async with self._dl.system() as db:
            rows = await db.many(
                "ratelimit.record_violations", window_s=window_s,
                keys=[v.key for v in batch], window_starts=[v.window_start for v in batch],
                operations=[v.operation for v in batch], counts=[v.count for v in batch],
                first_ats=[v.first_at for v in batch], last_ats=[v.last_at for v in batch])
        totals = {(r["key"], r["window_start"]): r["count"] for r in rows}
        return [totals[v.key, v.window_start] for v in batch]


def _at(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


class _Pending:
    """Counts of one key and window since the last flush (times: backend µs)."""

    __slots__ = ("count", "first", "last", "operation")

    def __init__(self, operation: str, count: int, first: int, last: int) -> None:
        self.operation = operation
        self.count = count
        self.first = first
        self.last = last

    def merge(self, other: _Pending) -> None:
        self.count += other.count
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)


class Violations:
    """Pending rejection counts of this process, and the hooks to call on thresholds."""

    def __init__(self, *, window_s: int = 60, store: ViolationStore | None = None,
                 max_pending: int = 10_000) -> None:
        if window_s < 1:
            raise ValueError("window_s must be >= 1")
        self.window_s = window_s
        self._window_us = window_s * 1_000_000
        self._store = store
        self._max_pending = max_pending
        self._pending: dict[tuple[str, int], _Pending] = {}  # (key, window start µs)
        self._totals: dict[tuple[str, int], int] = {}  # without a store only
        self._hooks: list[tuple[int, ViolationHook]] = []
        self.dropped = 0  # rejections not counted because max_pending keys were waiting

    def on_violation(self, hook: ViolationHook, *, threshold: int = 1) -> None:
        """Call ``hook(violation)`` (a function or a coroutine function) once per key and
        window, when its total reaches ``threshold``. Exceptions it raises are logged."""
        if threshold < 1:
            raise ValueError("threshold must be >= 1")
        self._hooks.append((threshold, hook))

    @property
    def pending(self) -> int:
        """Keys and windows waiting for the next flush."""
        return len(self._pending)

    def record(self, operation: str, key: str, at_us: int) -> None:
        """Count one rejection of ``key`` at backend time ``at_us``. No I/O."""
        slot = (key, at_us - at_us % self._window_us)
        entry = self._pending.get(slot)
        if entry is None:
            if len(self._pending) >= self._max_pending:
                self.dropped += 1
                return
            self._pending[slot] = _Pending(operation, 1, at_us, at_us)
            return
        entry.count += 1
        if at_us < entry.first:
            entry.first = at_us
        if at_us > entry.last:
            entry.last = at_us

    async def flush(self) -> list[Violation]:
        """Write what is pending and call the hooks whose threshold was crossed; returns
        the flushed rows with their new totals. If the store fails, the counts go back to
        pending (nothing is lost) and the error propagates."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, {}
        batch = [Violation(operation=e.operation, key=key, window_start=_at(w),
                           window_s=self.window_s, count=e.count, first_at=_at(e.first),
                           last_at=_at(e.last))
                 for (key, w), e in pending.items()]
        if self._store is not None:
            try:
                totals = await self._store.add(self.window_s, batch)
            except BaseException:
                self._restore(pending)
                raise
        else:
            totals = self._count_locally(pending)
        flushed = []
        for v, total in zip(batch, totals, strict=True):
            before = total - v.count
            row = Violation(operation=v.operation, key=v.key, window_start=v.window_start,
                            window_s=v.window_s, count=total, first_at=v.first_at,
                            last_at=v.last_at)
            flushed.append(row)
            for threshold, hook in self._hooks:
                if before < threshold <= total:
                    await self._call(hook, row)
        return flushed

    def _restore(self, pending: dict[tuple[str, int], _Pending]) -> None:
        for slot, e in pending.items():
            now = self._pending.get(slot)
            if now is None:
                self._pending[slot] = e
            else:
                now.merge(e)

    def _count_locally(self, pending: dict[tuple[str, int], _Pending]) -> list[int]:
        newest = max(w for _, w in pending)
        for slot in [s for s in self._totals if s[1] < newest - self._window_us]:
            del self._totals[slot]  # windows that have ended for good
        out = []
        for slot, e in pending.items():
            total = self._totals.get(slot, 0) + e.count
            self._totals[slot] = total
            out.append(total)
        return out

    @staticmethod
    async def _call(hook: ViolationHook, v: Violation) -> None:
        try:
            result = hook(v)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("rate-limit violation hook failed",
                          extra={"operation": v.operation, "window_start": v.window_start})
