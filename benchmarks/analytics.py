"""Analytics scenarios: 90 days of an organization with 1,000,000 executions.

* ``analytics.range``: ``db.analytics.org_range(today - 89, today)``: totals, average and p95
  duration over 90 days, from the view's running totals (two rows, histograms subtracted
  element-wise). Target p99 < 10 ms.
* ``analytics.dashboard``: ``db.analytics.dashboard(days=30)``: totals, executions per day,
  the top 5 failing workflows and the busiest hours (four statements, one session).
  Target p99 < 10 ms.

Both run in a member's read-only tenant session; the raw asyncpg side runs the same
statements on connections whose organization setting was set once (the functions read it).

Data, server-side: one organization with 200 workflows and a roll-up row per workflow and
day for 90 days (18,000 rows, about 55.6 executions each: 1,000,000 executions), with
random outcome counts, duration histograms and hourly counts; 20 other organizations with
the same shape over fewer workflows (the view and the table hold other tenants' rows too).
Then the view is refreshed and the tables analyzed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from datalayer import Context
from datalayer.repos.analytics import refresh_analytics

from .core import owned_org
from .harness import BenchContext, Scenario

__all__ = ["SCENARIOS"]

WORKFLOWS = 200
DAYS = 90
EXECUTIONS = 1_000_000
OTHER_ORGS = 20
OTHER_WORKFLOWS = 20

_SEED_ROLLUPS = """
INSERT INTO workflow_daily_stats
  (org_id, workflow_id, day, executions, successes, failures, cancellations, timed_executions,
   total_duration_ms, min_duration_ms, max_duration_ms, duration_histogram, hourly)
SELECT w.org_id, w.id, d.day, x.n, x.n - x.f - x.c, x.f, x.c, x.n, x.n * 800, 3, 90000,
       (SELECT array_agg(CASE WHEN b BETWEEN 30 AND 60 THEN x.n / 31 + (b = 45)::int * (x.n % 31)
                              ELSE 0 END ORDER BY b) FROM generate_series(1, 110) b),
       (SELECT array_agg(CASE WHEN h = 24 THEN x.n - 23 * (x.n / 24) ELSE x.n / 24 END
                         ORDER BY h) FROM generate_series(1, 24) h)
FROM workflows w
CROSS JOIN (SELECT (now() AT TIME ZONE 'UTC')::date - g AS day
            FROM generate_series(0, $2 - 1) g) d
CROSS JOIN LATERAL (SELECT $3::bigint + (hashtext(w.id::text || d.day::text) & 1)::bigint AS n,
                           (abs(hashtext(w.id::text || d.day::text)) % 6)::bigint AS f,
                           (abs(hashtext(d.day::text || w.id::text)) % 2)::bigint AS c) x
WHERE w.org_id = ANY ($1::uuid[])
"""


@dataclass(frozen=True, slots=True)
class AnalyticsState:
    org_id: uuid.UUID
    ctx: Context
    queries: dict[str, tuple[str, tuple[str, ...]]]


async def _org(bctx: BenchContext, workflows: int) -> tuple[uuid.UUID, uuid.UUID]:
    dl = bctx.dl
    owner = await owned_org(bctx, "analytics")
    org, owner_id = owner.org_id, owner.user_id
    async with dl.system() as db:
        await db.connection.execute(
            "INSERT INTO workflows (org_id, name, owner_id) "
            "SELECT $1, 'flow ' || g, $2 FROM generate_series(1, $3) g", org, owner_id, workflows)
    return org, owner_id


async def _setup(bctx: BenchContext) -> AnalyticsState:
    cached: AnalyticsState | None = bctx.cache.get("analytics")
    if cached is not None:
        return cached
    org, owner_id = await _org(bctx, WORKFLOWS)
    others = [(await _org(bctx, OTHER_WORKFLOWS))[0] for _ in range(OTHER_ORGS)]
    per_row = EXECUTIONS // (WORKFLOWS * DAYS)  # 55 (+ 0 or 1 at random: about 1,000,000)
    async with bctx.pool.acquire() as conn:  # the tables' owner: seeding and ANALYZE
        await conn.execute(_SEED_ROLLUPS, [org, *others], DAYS, per_row)
        await conn.execute("ANALYZE workflow_daily_stats; ANALYZE workflows")
    await refresh_analytics(bctx.dl)
    async with bctx.pool.acquire() as conn:
        await conn.execute("ANALYZE analytics_org_daily; ANALYZE analytics_workflow_daily")
    conns = [await bctx.pool.acquire() for _ in range(bctx.pool.get_max_size())]
    try:
        for conn in conns:
            await conn.execute(
                "SELECT set_config('app.org_id', $1, false), set_config('app.user_id', $2, "
                "false), set_config('app.role', 'owner', false)", str(org), str(owner_id))
    finally:
        for conn in conns:
            await bctx.pool.release(conn)
    reg = bctx.dl.registry
    names = ("org_range", "daily", "top_failing", "busiest_hours")
    state = AnalyticsState(org, Context(org, user_id=owner_id, role="owner"),
                           {n: (reg[f"analytics.{n}"].sql, reg[f"analytics.{n}"].params)
                            for n in names})
    async with bctx.dl.session(state.ctx, readonly=True) as db:
        end = datetime.now(UTC).date()
        total = (await db.analytics.org_range(end - timedelta(days=DAYS - 1), end)).executions
    if not 0.98 * EXECUTIONS <= total <= 1.03 * EXECUTIONS:
        raise RuntimeError(f"the seed holds {total} executions, expected about {EXECUTIONS}")
    bctx.cache["analytics"] = state
    return state


def _range(days: int) -> tuple[Any, Any]:
    end = datetime.now(UTC).date()
    return end - timedelta(days=days - 1), end


async def _org_range(b: BenchContext, s: AnalyticsState, i: int) -> None:
    f, t = _range(DAYS)
    async with b.dl.session(s.ctx, readonly=True) as db:
        await db.analytics.org_range(f, t)


async def _raw(conn: Any, s: AnalyticsState, name: str, args: dict[str, Any]) -> None:
    sql, params = s.queries[name]
    await conn.fetch(sql, *(args[p] for p in params))


async def _org_range_raw(b: BenchContext, s: AnalyticsState, i: int) -> None:
    f, t = _range(DAYS)
    async with b.pool.acquire() as conn:
        await _raw(conn, s, "org_range", {"from_day": f, "to_day": t})


async def _dashboard(b: BenchContext, s: AnalyticsState, i: int) -> None:
    async with b.dl.session(s.ctx, readonly=True) as db:
        await db.analytics.dashboard(days=30, top=5)


async def _dashboard_raw(b: BenchContext, s: AnalyticsState, i: int) -> None:
    f, t = _range(30)
    async with b.pool.acquire() as conn:
        await _raw(conn, s, "org_range", {"from_day": f, "to_day": t})
        await _raw(conn, s, "daily", {"from_day": f, "to_day": t})
        await _raw(conn, s, "top_failing", {"from_day": f, "to_day": t, "limit": 5})
        await _raw(conn, s, "busiest_hours", {"from_day": f, "to_day": t, "limit": 24})


async def _extra(b: BenchContext, s: AnalyticsState) -> dict[str, Any]:
    return {"p99_target_ms": 10.0, "executions": EXECUTIONS, "days": DAYS,
            "workflows": WORKFLOWS}


SCENARIOS: list[Scenario] = [
    Scenario("analytics.range", _setup, _org_range, _org_range_raw, extra=_extra,
             description="org totals, avg and p95 over 90 days (1,000,000 executions)"),
    Scenario("analytics.dashboard", _setup, _dashboard, _dashboard_raw, extra=_extra,
             description="30-day dashboard: totals, per day, top failing, busiest hours"),
]
