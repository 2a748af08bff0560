"""Workflow analytics: roll-ups kept as executions finish, ranges for an organization, a
workflow and a user, the dashboard, the materialized view and its refresh, the rebuild job,
and tenancy (another tenant, no context, private workflows)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest

from datalayer import Context, DataLayer, PermissionDenied, ValidationError
from datalayer.repos.analytics import refresh_analytics, rollup_analytics
from tests.conftest import MemberFactory, Tenant, TenantFactory


def today() -> date:
    return datetime.now(UTC).date()


@dataclass(frozen=True)
class World:
    a: Tenant
    b: Tenant
    member: Context
    wf: uuid.UUID  # A, organization-visible
    private: uuid.UUID  # A, private to the owner
    wf_b: uuid.UUID


async def run(dl: DataLayer, ctx: Context, workflow_id: uuid.UUID, outcomes: list[str]) -> None:
    """Enqueue, claim (tenant worker) and finish one execution per outcome."""
    async with dl.session(ctx) as db:
        for _ in outcomes:
            await db.executions.enqueue(workflow_id)
    worker = f"an-{uuid.uuid4().hex[:8]}"
    async with dl.session(ctx) as db:
        claimed = await db.executions.claim(worker, limit=len(outcomes))
        assert len(claimed) == len(outcomes)
        ok = [ex for ex, outcome in zip(claimed, outcomes, strict=True) if outcome == "succeeded"]
        # Successes in one statement (the triggers' set-based path), the rest one by one
        # (the per-row path): the rebuild test below checks both against executions.
        assert len(await db.executions.complete_many(worker, ok)) == len(ok)
        for ex, outcome in zip(claimed, outcomes, strict=True):
            if outcome != "succeeded":
                await db.executions.finish(ex, outcome, error="boom")


@pytest.fixture(scope="module")
async def world(dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory) -> World:
    a, b = await make_tenant("Analytics A"), await make_tenant("Analytics B")
    member = await add_member(a, "member")
    node = [{"id": "a", "type": "code"}]
    async with dl.session(a.owner) as db:
        wf = (await db.workflows.create("Busy", nodes=node)).id
        private = (await db.workflows.create("Hidden", nodes=node, visibility="private")).id
    async with dl.session(b.owner) as db:
        wf_b = (await db.workflows.create("B's", nodes=node)).id
    await run(dl, a.owner, wf, ["succeeded"] * 3 + ["failed", "timed_out", "cancelled"])
    await run(dl, a.owner, private, ["failed", "failed"])
    await run(dl, b.owner, wf_b, ["failed"] * 7)
    await refresh_analytics(dl)  # organization figures are as of the last refresh
    return World(a, b, member, wf, private, wf_b)


async def test_rollups_follow_finished_executions(dl: DataLayer, world: World) -> None:
    t = today()
    async with dl.system() as db:
        assert (await db.analytics.state()).refreshed_at is not None
    async with dl.session(world.a.owner, readonly=True) as db:
        org = await db.analytics.org_range(t, t)
        wf = await db.analytics.workflow_range(world.wf, t - timedelta(days=89), t)
        user = await db.analytics.user_range(world.a.owner_id, t, t)
        stats = await db.workflows.stats(world.wf)
    assert (org.executions, org.successes, org.failures, org.cancellations) == (8, 3, 4, 1)
    assert (wf.executions, wf.successes, wf.failures, wf.cancellations) == (6, 3, 2, 1)
    assert user.executions == 8  # the owner owns both workflows
    assert stats is not None and stats.executions == wf.executions  # same calls
    assert (stats.successes, stats.failures, stats.cancellations) == (3, 2, 1)
    assert wf.avg_duration_ms is not None and wf.p95_duration_ms is not None
    assert wf.p95_duration_ms >= 0


async def test_dashboard(dl: DataLayer, world: World) -> None:
    async with dl.session(world.a.owner, readonly=True) as db:
        d = await db.analytics.dashboard(days=30)
    assert d.totals.executions == 8
    assert [(x.day, x.executions) for x in d.per_day] == [(today(), 8)]
    assert [(f.workflow_id, f.failures) for f in d.top_failing] == [(world.private, 2),
                                                                     (world.wf, 2)] or \
        [(f.workflow_id, f.failures) for f in d.top_failing] == [(world.wf, 2),
                                                                 (world.private, 2)]
    assert sum(h.executions for h in d.busiest_hours) == 8
    assert d.busiest_hours[0].hour == datetime.now(UTC).hour or len(d.busiest_hours) > 1


async def test_tenancy_other_tenant_no_context_private(dl: DataLayer, world: World) -> None:
    t = today()
    async with dl.session(world.member, readonly=True) as db:
        assert (await db.analytics.org_range(t, t)).executions == 8  # org totals: everyone's
        # A private workflow the member cannot see: no figures, no name.
        assert (await db.analytics.workflow_range(world.private, t, t)).executions == 0
        assert world.private not in {f.workflow_id for f in
                                     await db.analytics.top_failing(t, t)}
        # Another tenant's workflow id: nothing.
        assert (await db.analytics.workflow_range(world.wf_b, t, t)).executions == 0
    async with dl.session(world.b.owner, readonly=True) as db:
        assert (await db.analytics.org_range(t, t)).executions == 7
        assert world.wf not in {f.workflow_id for f in await db.analytics.top_failing(t, t)}
    for ctx in (Context(None), Context(None, user_id=world.member.user_id)):
        async with dl.session(ctx, readonly=True) as db:
            assert (await db.analytics.org_range(t, t)).executions == 0
            assert await db.analytics.daily(t, t) == []
            assert await db.analytics.top_failing(t, t) == []


async def test_matview_is_refreshed_and_read_only_through_functions(
        dl: DataLayer, world: World, admin_conn: asyncpg.Connection) -> None:
    t = today()
    # Yesterday's roll-up row (as an import would leave it), then a refresh: the view
    # serves yesterday, the live table today; totals agree.
    await admin_conn.execute(
        "INSERT INTO workflow_daily_stats (org_id, workflow_id, day, executions, successes) "
        "VALUES ($1, $2, $3, 5, 5)", world.a.org_id, world.wf, t - timedelta(days=1))
    assert await refresh_analytics(dl) == {"refreshed": 1, "skipped": 0}
    assert await admin_conn.fetchval(
        "SELECT executions FROM analytics_org_daily WHERE org_id = $1 AND day = $2",
        world.a.org_id, t - timedelta(days=1)) == 5
    assert await admin_conn.fetchval(
        "SELECT cum_executions FROM analytics_org_daily WHERE org_id = $1 AND day = $2",
        world.a.org_id, t) == 13
    async with dl.session(world.a.owner, readonly=True) as db:
        r = await db.analytics.org_range(t - timedelta(days=1), t)
        assert (r.executions, r.successes) == (13, 8)
        # Today alone: today's running total minus yesterday's.
        r = await db.analytics.org_range(t, t)
        assert (r.executions, r.successes, r.failures) == (8, 3, 4)
        assert r.p95_duration_ms is not None
        r = await db.analytics.org_range(t - timedelta(days=1), t - timedelta(days=1))
        assert (r.executions, r.p95_duration_ms) == (5, None)
        days = await db.analytics.daily(t - timedelta(days=6), t)
        assert [(d.day, d.executions) for d in days] == [(t - timedelta(days=1), 5), (t, 8)]
    # Concurrent refreshes: both succeed or one skips, never an error.
    outs = await asyncio.gather(refresh_analytics(dl), refresh_analytics(dl))
    assert sum(o["refreshed"] for o in outs) >= 1
    # The run-time role cannot read the view or run the maintenance functions.
    async with dl.session(world.a.owner, readonly=True) as db:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.connection.fetch("SELECT * FROM analytics_org_daily")
    with pytest.raises(PermissionDenied):
        async with dl.session(world.a.owner) as db:
            await db.analytics.refresh()
    # Cleanup: the rebuild job below would otherwise remove it anyway.
    await admin_conn.execute("DELETE FROM workflow_daily_stats WHERE org_id = $1 AND day = $2",
                             world.a.org_id, t - timedelta(days=1))
    await refresh_analytics(dl)


async def test_rebuild_day_is_idempotent_and_exact(dl: DataLayer, world: World,
                                                   admin_conn: asyncpg.Connection) -> None:
    t = today()
    before = await admin_conn.fetch(
        "SELECT * FROM workflow_daily_stats WHERE org_id = $1 AND day = $2 ORDER BY workflow_id",
        world.a.org_id, t)
    # Damage today's roll-up, then rebuild it from executions, twice.
    await admin_conn.execute(
        "UPDATE workflow_daily_stats SET executions = 999 WHERE org_id = $1 AND day = $2",
        world.a.org_id, t)
    async with dl.system() as db:
        assert await db.analytics.rebuild_day(t) >= 2
    async with dl.system() as db:
        await db.analytics.rebuild_day(t)
    after = await admin_conn.fetch(
        "SELECT * FROM workflow_daily_stats WHERE org_id = $1 AND day = $2 ORDER BY workflow_id",
        world.a.org_id, t)
    assert [dict(r) for r in after] == [dict(r) for r in before]
    with pytest.raises(ValidationError):
        async with dl.system() as db:
            await db.analytics.rebuild_day(t + timedelta(days=1))


async def test_rollup_job_catches_up_once(dl: DataLayer) -> None:
    first = await rollup_analytics(dl, days=3)
    assert first["days"] <= 3
    assert await rollup_analytics(dl, days=3) == {"days": 0, "rows": 0}  # done: idempotent


async def test_range_validation(dl: DataLayer, world: World) -> None:
    t = today()
    async with dl.session(world.a.owner, readonly=True) as db:
        with pytest.raises(ValidationError):
            await db.analytics.org_range(t, t - timedelta(days=1))
        with pytest.raises(ValidationError):
            await db.analytics.org_range(t - timedelta(days=5000), t)
        with pytest.raises(ValidationError):
            await db.analytics.dashboard(days=0)
