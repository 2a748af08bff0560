"""PostgreSQL backend: one statement per check, on the service pool, in one round trip.

The statement is ``ratelimit.check`` (``queries/ratelimit.sql``), which calls
``app.rate_limit_check``: a single ``INSERT … ON CONFLICT DO UPDATE … RETURNING`` that
computes the decision from the row it locks, with ``clock_timestamp()``
(``schema/0010_ratelimit.sql``). Concurrent checks of one key serialize on that row lock.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import asyncpg

from datalayer.core.errors import DataLayerError, Timeout, Unavailable, translate
from datalayer.core.sqlfile import Query
from datalayer.ratelimit.limits import Limit, Outcome
from datalayer.service_pool import ServicePool

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer
    from datalayer.query_performance import QueryMetrics

__all__ = ["PostgresBackend", "sweep_buckets"]

_PARAMS = ("key", "gcra", "interval_us", "capacity", "cost")


class PostgresBackend:
    """Buckets in ``rate_limit_buckets``, shared by every process using the database."""

    name = "postgres"

    def __init__(self, pool: ServicePool, query: Query, *, timeout_s: float = 0.2,
                 metrics: QueryMetrics | None = None) -> None:
        """``query`` is the registry's ``ratelimit.check``. ``timeout_s`` bounds the whole
        check: waiting for (or opening) a connection, then the statement, which is
        cancelled when the time is up."""
        if query.params != _PARAMS:
            raise DataLayerError(f"{query.name} must take {', '.join(_PARAMS)}")
        self._pool = pool
        self._sql = query.sql
        self._name = query.name
        self._timeout = timeout_s
        self._metrics = metrics  # the DataLayer's query metrics, when given

    async def check(self, key: str, limit: Limit, cost: int) -> Outcome:
        started = time.monotonic()
        started_ns = time.perf_counter_ns()
        conn = await self._pool.acquire(self._timeout)
        try:
            left = self._timeout - (time.monotonic() - started)
            if left <= 0:
                raise Timeout("no database connection for the rate-limit check in time")
            t0 = time.perf_counter_ns()
            row = await conn.fetchrow(self._sql, key, limit.algorithm == "gcra",
                                      limit.interval_us, limit.capacity, cost, timeout=left)
            if self._metrics is not None:
                self._metrics.record(self._name, t0, 1)
        except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            if self._metrics is not None:
                self._metrics.failed(self._name, started_ns, exc)
            err = translate(exc, self._name)
            raise (err or Unavailable(f"{self._name}: the database did not answer")) from exc
        finally:
            await self._pool.release(conn)
        assert row is not None
        return Outcome(row[0], row[1], row[2], row[3], row[4])

    async def close(self) -> None:
        """Nothing of its own: the service pool belongs to the DataLayer."""


async def sweep_buckets(dl: DataLayer, *, batch: int = 10_000) -> int:
    """Delete buckets that are full again, ``batch`` rows per statement (as the
    maintenance role); returns how many. Changes no decision: a missing row is a full
    bucket. The limiter runs it every minute when it uses this backend."""
    total = 0
    while True:
        async with dl.system() as db:
            n = await db.execrows("ratelimit.sweep", batch=batch)
        total += n
        if n < batch:
            return total
