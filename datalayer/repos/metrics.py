"""System metrics (``queries/metrics.sql``; schema ``metrics`` in ``schema/0018_analytics.sql``).

Operator-level time series (name, labels, value, time): the platform's own figures, not a
tenant's, so only the maintenance role reaches them (``dl.system()``; the run-time role has
no privilege on schema ``metrics``).

* :meth:`Metrics.record` ingests points in bulk (one statement, arrays through ``unnest``).
* :meth:`Metrics.series` reads a series (or every series whose labels contain the given ones,
  aggregated) over a range at the finest resolution that is kept that far back and fits in
  ``max_points`` buckets: raw (1 s), 1 minute, 1 hour or 1 day. Final roll-ups serve what the
  job has rolled up; the rest is aggregated from raw points on the fly.

Periodic jobs (idempotent, safe to run concurrently: advisory locks in the database):
:func:`rollup_metrics` (raw → 1m → 1h → 1d, and raw partitions ahead) and
:func:`metrics_retention` (drops whole partitions past each resolution's retention; edit
with :meth:`Metrics.set_retention`).
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from datalayer.core.errors import ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import Repository, check_choice

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = ["RESOLUTIONS", "Bucket", "Metrics", "Point", "Series", "metrics_retention",
           "rollup_metrics"]

# Finest first: (name, step).
RESOLUTIONS: tuple[tuple[str, timedelta], ...] = (
    ("raw", timedelta(seconds=1)), ("1m", timedelta(minutes=1)), ("1h", timedelta(hours=1)),
    ("1d", timedelta(days=1)))
_NAMES = tuple(name for name, _ in RESOLUTIONS)
MAX_BATCH = 100_000


@dataclass(frozen=True, slots=True)
class Point:
    name: str
    value: float
    time: datetime | None = None  # None: now
    labels: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bucket:
    bucket: datetime
    count: int
    sum: float
    min: float
    max: float
    avg: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Resolution:
    resolution: str
    step: timedelta
    keep: timedelta
    through: datetime | None


@dataclass(frozen=True, slots=True)
class Series:
    resolution: str
    buckets: list[Bucket]


SERIES = RowQuery("metrics.series", Bucket)
RESOLUTION_ROWS = RowQuery("metrics.resolutions", Resolution)


class Metrics(Repository):
    """``db.metrics``: maintenance sessions (``dl.system()``) only."""

    __slots__ = ()

    async def record(self, points: Iterable[Point]) -> int:
        """Store points (at most 100,000 per call); the number stored."""
        now = datetime.now(UTC)
        names: list[str] = []
        labels: list[Mapping[str, Any]] = []
        times: list[datetime] = []
        values: list[float] = []
        for p in points:
            if len(names) == MAX_BATCH:
                raise ValidationError(f"record at most {MAX_BATCH} points per call")
            try:
                values.append(float(p.value))
            except (TypeError, ValueError):
                raise ValidationError(f"metric {p.name!r}: value must be a number") from None
            names.append(p.name)
            labels.append(dict(p.labels))
            times.append(p.time or now)
        if not names:
            return 0
        return await self._db.execrows("metrics.record", names=names, labels=labels,
                                       times=times, values=values)

    async def resolutions(self) -> builtins.list[Resolution]:
        return await self._db.fetch_many(RESOLUTION_ROWS)

    async def set_retention(self, resolution: str, keep: timedelta) -> None:
        check_choice(resolution, _NAMES, "resolution")
        if keep <= timedelta(0):
            raise ValidationError("keep must be a positive duration")
        await self._db.execrows("metrics.set_retention", resolution=resolution, keep=keep)

    async def series(self, name: str, *, start: datetime, end: datetime | None = None,
                     labels: Mapping[str, Any] | None = None, max_points: int = 1000,
                     resolution: str | None = None) -> Series:
        """Buckets of ``name`` (series whose labels contain ``labels``, aggregated) over
        ``[start, end)``, at ``resolution`` or the best one (see the module docstring)."""
        end = end or datetime.now(UTC)
        if start.tzinfo is None or end.tzinfo is None:
            raise ValidationError("start and end must be timezone-aware")
        if start >= end:
            raise ValidationError("start must be before end")
        if not 1 <= max_points <= 100_000:
            raise ValidationError("max_points must be between 1 and 100000")
        if resolution is None:
            resolution = self.best_resolution(start, end, max_points,
                                              {r.resolution: r.keep
                                               for r in await self.resolutions()})
        else:
            check_choice(resolution, _NAMES, "resolution")
        rows = await self._db.fetch_many(SERIES, name=name, labels=dict(labels or {}),
                                         start=start, end=end, resolution=resolution)
        return Series(resolution, rows)

    @staticmethod
    def best_resolution(start: datetime, end: datetime, max_points: int,
                        keep: Mapping[str, timedelta]) -> str:
        """The finest resolution kept back to ``start`` whose buckets over the range number
        at most ``max_points`` (the coarsest when none fits)."""
        age = datetime.now(UTC) - start
        for name, step in RESOLUTIONS:
            if age <= keep.get(name, timedelta(0)) and (end - start) / step <= max_points:
                return name
        return RESOLUTIONS[-1][0]


async def rollup_metrics(dl: DataLayer) -> dict[str, int]:
    """Maintenance job: raw partitions for the next days, then the roll-ups (raw → 1m → 1h
    → 1d) of every closed bucket not rolled up yet (re-aggregating the last 5 minutes for
    late points; at most 4 days per resolution per run)."""
    async with dl.system() as db:
        made = int(await db.scalar("metrics.ensure_raw_partitions", days_ahead=3) or 0)
        rows = await db.run("metrics.rollup")
    out = {"partitions_created": made}
    for r in rows:
        out[f"rows_{r['resolution']}"] = int(r["rows_written"])
    return out


async def metrics_retention(dl: DataLayer) -> dict[str, int]:
    """Maintenance job: drop the partitions past each resolution's retention."""
    async with dl.system() as db:
        dropped = await db.run("metrics.apply_retention")
    return {"partitions_dropped": len(dropped)}
