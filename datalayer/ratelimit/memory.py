"""In-process backend: one event loop's dict. Exact (a check never awaits), not shared.

Also the reference for the arithmetic the Lua script (``redis.py``) and the SQL function
(``schema/0010_ratelimit.sql``) repeat, in integer microseconds:

* token bucket: state (credit, at). Credit refills one microsecond per microsecond up to
  ``capacity * interval``; a request passes when the credit covers ``cost * interval``.
* GCRA: state (tat, at), the theoretical arrival time. A request passes when
  ``max(tat, now) + cost * interval - now <= capacity * interval``, and moves tat on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from datalayer.ratelimit.limits import Limit, Outcome

__all__ = ["MemoryBackend", "step"]


def step(state: tuple[int, int] | None, now: int, *, gcra: bool, interval: int,
         capacity: int, cost: int) -> tuple[tuple[int, int], Outcome]:
    """One check on ``state`` (None: a fresh key) at ``now`` (µs): the new state and the
    outcome. ``now`` is clamped to the state's time, so a clock step back changes nothing."""
    full = capacity * interval
    need = cost * interval
    if state is not None and state[1] > now:
        now = state[1]
    if gcra:
        tat = now if state is None or state[0] < now else state[0]
        ok = tat + need - now <= full
        if ok:
            tat += need
        return (tat, now), Outcome(ok, (full - (tat - now)) // interval,
                                   0 if ok else tat + need - now - full, tat - now, now)
    level = full if state is None else min(full, state[0] + now - state[1])
    ok = level >= need
    if ok:
        level -= need
    return (level, now), Outcome(ok, level // interval, 0 if ok else need - level,
                                 full - level, now)


class MemoryBackend:
    """Buckets in a dict of this process: for tests, single-process services, and as a
    first line in front of a shared backend. Keys expire when their bucket is full again;
    at ``max_keys`` the expired ones are dropped, then the oldest down to nine tenths
    (which can only make the limiter more permissive for those keys, never stricter)."""

    name = "memory"

    def __init__(self, *, max_keys: int = 100_000,
                 clock: Callable[[], int] | None = None) -> None:
        """``clock`` returns microseconds (tests pass a fake one); the default is the
        monotonic clock shifted to the epoch once, so it never jumps."""
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        offset = time.time_ns() // 1000 - time.monotonic_ns() // 1000
        self._clock = clock or (lambda: time.monotonic_ns() // 1000 + offset)
        self._max_keys = max_keys
        self._state: dict[str, tuple[int, int, int]] = {}  # key -> (level, at, expires)

    def __len__(self) -> int:
        return len(self._state)

    async def check(self, key: str, limit: Limit, cost: int) -> Outcome:
        now = self._clock()
        entry = self._state.get(key)
        if entry is not None and entry[2] <= now:
            entry = None  # full again: the same as a fresh key
        (level, at), out = step(None if entry is None else (entry[0], entry[1]), now,
                                gcra=limit.algorithm == "gcra", interval=limit.interval_us,
                                capacity=limit.capacity, cost=cost)
        if entry is None and len(self._state) >= self._max_keys:
            self._evict(now)
        self._state[key] = (level, at, at + out.reset_after_us)
        return out

    def _evict(self, now: int) -> None:
        state = self._state
        for key in [k for k, v in state.items() if v[2] <= now]:
            del state[key]
        target = self._max_keys - max(1, self._max_keys // 10)  # amortize the scan
        while len(state) > target:
            del state[next(iter(state))]

    async def close(self) -> None:
        self._state.clear()
