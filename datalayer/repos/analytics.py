"""Workflow analytics (``queries/analytics.sql``, ``schema/0018_analytics.sql``).

Daily roll-ups per workflow are kept by the database as executions finish (the executions
triggers call ``app.workflow_stats_record``, which upserts the day's row next to the running
statistics): per-workflow and per-user figures are live. Organization figures (totals, per
day, busiest hours, top failing workflows) come from the ``analytics_org_daily`` and
``analytics_workflow_daily`` materialized views, as of their last refresh
(:func:`refresh_analytics`; run it every few minutes); the run-time role reads them only
through SECURITY DEFINER functions that filter by the context's organization.

Ranges are UTC dates, both ends included, at most :data:`MAX_RANGE_DAYS` long.

Periodic jobs (``dl.system()``; idempotent; safe to run concurrently):

* :func:`refresh_analytics` refreshes the view CONCURRENTLY (readers never wait).
* :func:`rollup_analytics` rebuilds the last closed days from executions (repairs roll-ups of
  imported or hand-edited executions) and catches up after downtime, at most
  :data:`REBUILD_DAYS` days back.
"""

from __future__ import annotations

import builtins
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from datalayer.core.errors import ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import Repository, check_limit

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = [
    "MAX_RANGE_DAYS",
    "REBUILD_DAYS",
    "Analytics",
    "Dashboard",
    "DayFigures",
    "FailingWorkflow",
    "HourFigures",
    "RangeFigures",
    "refresh_analytics",
    "rollup_analytics",
]

MAX_RANGE_DAYS = 3660
REBUILD_DAYS = 7


@dataclass(frozen=True, slots=True, kw_only=True)
class RangeFigures:
    """Totals over a range; durations in milliseconds (None without timed executions)."""

    executions: int
    successes: int
    failures: int  # failed or timed out
    cancellations: int
    avg_duration_ms: float | None
    p95_duration_ms: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DayFigures:
    day: date
    executions: int
    successes: int
    failures: int
    cancellations: int
    avg_duration_ms: float | None
    p95_duration_ms: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class FailingWorkflow:
    workflow_id: uuid.UUID
    name: str
    executions: int
    failures: int
    failure_rate: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class HourFigures:
    hour: int  # 0-23, UTC
    executions: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Dashboard:
    """The dashboard's figures over ``[from_day, to_day]``."""

    from_day: date
    to_day: date
    totals: RangeFigures
    per_day: list[DayFigures]
    top_failing: list[FailingWorkflow]
    busiest_hours: list[HourFigures]


@dataclass(frozen=True, slots=True, kw_only=True)
class JobState:
    refreshed_at: datetime | None
    rebuilt_through: date | None


ORG_RANGE = RowQuery("analytics.org_range", RangeFigures)
WORKFLOW_RANGE = RowQuery("analytics.workflow_range", RangeFigures)
USER_RANGE = RowQuery("analytics.user_range", RangeFigures)
DAILY = RowQuery("analytics.daily", DayFigures)
TOP_FAILING = RowQuery("analytics.top_failing", FailingWorkflow)
BUSIEST_HOURS = RowQuery("analytics.busiest_hours", HourFigures)
STATE = RowQuery("analytics.state", JobState)

_EMPTY = RangeFigures(executions=0, successes=0, failures=0, cancellations=0,
                      avg_duration_ms=None, p95_duration_ms=None)


def today() -> date:
    return datetime.now(UTC).date()


def check_range(from_day: date, to_day: date) -> tuple[date, date]:
    if not isinstance(from_day, date) or not isinstance(to_day, date):
        raise ValidationError("from_day and to_day must be dates")
    if isinstance(from_day, datetime) or isinstance(to_day, datetime):
        raise ValidationError("from_day and to_day must be dates, not datetimes")
    if from_day > to_day:
        raise ValidationError("from_day must not be after to_day")
    if (to_day - from_day).days >= MAX_RANGE_DAYS:
        raise ValidationError(f"a range may span at most {MAX_RANGE_DAYS} days")
    return from_day, to_day


def last_days(days: int) -> tuple[date, date]:
    """``[today - days + 1, today]``."""
    if not 1 <= days <= MAX_RANGE_DAYS:
        raise ValidationError(f"days must be between 1 and {MAX_RANGE_DAYS}")
    end = today()
    return end - timedelta(days=days - 1), end


class Analytics(Repository):
    """``db.analytics``: figures of the context's organization (tenant sessions)."""

    __slots__ = ()

    async def org_range(self, from_day: date, to_day: date) -> RangeFigures:
        """The organization's totals over the range."""
        f, t = check_range(from_day, to_day)
        return await self._db.fetch_one(ORG_RANGE, from_day=f, to_day=t) or _EMPTY

    async def workflow_range(self, workflow_id: uuid.UUID, from_day: date,
                             to_day: date) -> RangeFigures:
        """One workflow's totals (zeros when the context cannot see it)."""
        f, t = check_range(from_day, to_day)
        return await self._db.fetch_one(WORKFLOW_RANGE, workflow_id=workflow_id,
                                        from_day=f, to_day=t) or _EMPTY

    async def user_range(self, user_id: uuid.UUID, from_day: date,
                         to_day: date) -> RangeFigures:
        """Totals of the workflows ``user_id`` owns now (those the context sees)."""
        f, t = check_range(from_day, to_day)
        return await self._db.fetch_one(USER_RANGE, user_id=user_id, from_day=f,
                                        to_day=t) or _EMPTY

    async def daily(self, from_day: date, to_day: date) -> builtins.list[DayFigures]:
        """Per-day figures (days with executions), oldest first."""
        f, t = check_range(from_day, to_day)
        return await self._db.fetch_many(DAILY, from_day=f, to_day=t)

    async def top_failing(self, from_day: date, to_day: date, *,
                          limit: int = 10) -> builtins.list[FailingWorkflow]:
        f, t = check_range(from_day, to_day)
        return await self._db.fetch_many(TOP_FAILING, from_day=f, to_day=t,
                                         limit=check_limit(limit, 100))

    async def busiest_hours(self, from_day: date, to_day: date, *,
                            limit: int = 24) -> builtins.list[HourFigures]:
        f, t = check_range(from_day, to_day)
        return await self._db.fetch_many(BUSIEST_HOURS, from_day=f, to_day=t,
                                         limit=min(check_limit(limit, 100), 24))

    async def dashboard(self, *, days: int = 30, top: int = 5) -> Dashboard:
        """Totals, executions per day, top failing workflows and busiest hours over the
        last ``days`` days (today included)."""
        f, t = last_days(days)
        return Dashboard(from_day=f, to_day=t, totals=await self.org_range(f, t),
                         per_day=await self.daily(f, t),
                         top_failing=await self.top_failing(f, t, limit=top),
                         busiest_hours=await self.busiest_hours(f, t, limit=24))

    # -- maintenance (dl.system()) -----------------------------------------------------------
    async def refresh(self) -> None:
        """Refresh ``analytics_org_daily`` CONCURRENTLY."""
        await self._db.exec("analytics.refresh")

    async def rebuild_day(self, day: date) -> int:
        """Rebuild one day's roll-ups from executions (idempotent); rows written. Only for
        days whose executions are all still there."""
        if not isinstance(day, date) or isinstance(day, datetime):
            raise ValidationError("day must be a date")
        return int(await self._db.scalar("analytics.rebuild_day", day=day))

    async def state(self) -> JobState:
        """When the view was last refreshed, and the last day the rollup job rebuilt."""
        row = await self._db.fetch_one(STATE)
        assert row is not None  # the migration inserts the single row
        return row


async def refresh_analytics(dl: DataLayer) -> dict[str, int]:
    """Maintenance job: refresh the organization view (CONCURRENTLY; readers never wait)."""
    async with dl.system() as db:
        if not await db.connection.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtext('datalayer.analytics.refresh'))"):
            return {"refreshed": 0, "skipped": 1}
        await db.analytics.refresh()
    return {"refreshed": 1, "skipped": 0}


async def rollup_analytics(dl: DataLayer, *, days: int = REBUILD_DAYS) -> dict[str, int]:
    """Maintenance job: rebuild from executions every closed day (UTC) not rebuilt yet, at
    most ``days`` back (yesterday and, after downtime, the days missed). Idempotent: a day
    is rebuilt once unless called with a larger ``days`` after its executions changed."""
    if not 1 <= days <= 90:
        raise ValidationError("days must be between 1 and 90")
    # A day is closed an hour after midnight UTC (transactions that began before midnight
    # have committed by then).
    yesterday = (datetime.now(UTC) - timedelta(hours=1)).date() - timedelta(days=1)
    async with dl.system() as db:
        state = await db.analytics.state()
    start = yesterday - timedelta(days=days - 1)
    if state.rebuilt_through is not None:
        start = max(start, state.rebuilt_through + timedelta(days=1))
    rebuilt = rows = 0
    day = start
    while day <= yesterday:
        async with dl.system() as db:
            rows += await db.analytics.rebuild_day(day)
            await db.exec("analytics.set_rebuilt", day=day)
        rebuilt += 1
        day += timedelta(days=1)
    return {"days": rebuilt, "rows": rows}
