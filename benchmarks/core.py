"""Foundation scenarios: the registry, a repository, and sessions, against raw asyncpg.

Every baseline runs the registry's own SQL text (``dl.registry["orgs.get"].sql``), so both
sides send the identical statement. The raw pool logs in as the database owner (no RLS);
sessions run as ``datalayer_app`` under RLS, which is part of what they cost.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from datalayer import Context

from .harness import BenchContext, Scenario

__all__ = ["SCENARIOS", "CoreState", "Owned", "owned_org", "tenants"]

TENANTS = 97  # ≥ 64 and prime: cycling never lines up with the 16 connections


async def tenants(bctx: BenchContext, n: int) -> list[uuid.UUID]:
    """``n`` organizations for this run, created once and shared by every scenario.

    Each is created the way a service would: a session whose context carries the new id
    with role owner, and ``db.orgs.create``. Slugs carry a uuid, so runs never collide.
    """
    have: list[uuid.UUID] = bctx.cache.setdefault("core.tenants", [])
    missing = n - len(have)
    if missing > 0:
        sem = asyncio.Semaphore(8)

        async def create() -> uuid.UUID:
            org_id = uuid.uuid4()
            async with sem, bctx.dl.session(Context(org_id, role="owner")) as db:
                await db.orgs.create(slug=f"bench-{org_id.hex[:20]}", name="Benchmark tenant")
            return org_id

        have.extend(await asyncio.gather(*(create() for _ in range(missing))))
    return have[:n]


@dataclass(frozen=True, slots=True)
class Owned:
    """An organization made by :func:`owned_org` and its owner."""

    org_id: uuid.UUID
    user_id: uuid.UUID
    ctx: Context  # the owner's context


async def owned_org(bctx: BenchContext, name: str) -> Owned:
    """A new organization with its owner (a user and an owner membership), created through
    the repositories as a service would. Slug and e-mail carry part of a fresh uuid, so runs
    never collide."""
    org, owner = uuid.uuid4(), uuid.uuid4()
    ctx, tag = Context(org, user_id=owner, role="owner"), org.hex[:12]
    async with bctx.dl.session(ctx) as db:
        await db.orgs.create(slug=f"bench-{name}-{tag}", name=f"{name} bench")
        await db.users.create(email=f"owner-{tag}@{name}.bench.test")
        await db.memberships.add(owner, "owner")
    return Owned(org, owner, ctx)


@dataclass(frozen=True, slots=True)
class CoreState:
    sql: str  # the registry's text of orgs.get, run by both sides
    ids: tuple[uuid.UUID, ...]
    ctxs: tuple[Context, ...]  # ctxs[i] is a member of ids[i]


async def _setup(bctx: BenchContext) -> CoreState:
    ids = await tenants(bctx, TENANTS)
    ctxs = tuple(Context(i, user_id=uuid.uuid4(), role="member") for i in ids)
    state = CoreState(bctx.dl.registry["orgs.get"].sql, tuple(ids), ctxs)
    # Both sides must find the row, or the comparison measures nothing.
    async with bctx.dl.session(ctxs[0], readonly=True) as db:
        if await db.orgs.get(ids[0]) is None:
            raise RuntimeError("orgs.get found nothing through a tenant session")
    async with bctx.pool.acquire() as conn:
        if await conn.fetchrow(state.sql, ids[0]) is None:
            raise RuntimeError("orgs.get found nothing on the raw pool")
    return state


# -- registry.one / repo.one: on a held raw connection, no context --------------------------
async def _registry_one(b: BenchContext, s: CoreState, i: int) -> None:
    await b.dl.executor(b.conn).one("orgs.get", id=s.ids[i % TENANTS])


async def _repo_one(b: BenchContext, s: CoreState, i: int) -> None:
    await b.dl.executor(b.conn).orgs.get(s.ids[i % TENANTS])


async def _raw_one(b: BenchContext, s: CoreState, i: int) -> None:
    await b.conn.fetchrow(s.sql, s.ids[i % TENANTS])


# -- session.one.*: acquire, context, one query, release ----------------------------------
async def _session_same(b: BenchContext, s: CoreState, i: int) -> None:
    async with b.dl.session(s.ctxs[0], readonly=True) as db:
        await db.orgs.get(s.ids[0])


async def _pool_same(b: BenchContext, s: CoreState, i: int) -> None:
    async with b.pool.acquire() as conn:
        await conn.fetchrow(s.sql, s.ids[0])


async def _session_switch(b: BenchContext, s: CoreState, i: int) -> None:
    k = i % TENANTS
    async with b.dl.session(s.ctxs[k], readonly=True) as db:
        await db.orgs.get(s.ids[k])


async def _pool_switch(b: BenchContext, s: CoreState, i: int) -> None:
    async with b.pool.acquire() as conn:
        await conn.fetchrow(s.sql, s.ids[i % TENANTS])


# -- session.ten: a read-write transaction of ten queries ----------------------------------
async def _session_ten(b: BenchContext, s: CoreState, i: int) -> None:
    org_id = s.ids[0]
    async with b.dl.session(s.ctxs[0]) as db:
        orgs = db.orgs
        for _ in range(10):
            await orgs.get(org_id)


async def _pool_ten(b: BenchContext, s: CoreState, i: int) -> None:
    org_id = s.ids[0]
    sql = s.sql
    async with b.pool.acquire() as conn, conn.transaction():
        for _ in range(10):
            await conn.fetchrow(sql, org_id)


SCENARIOS: list[Scenario] = [
    Scenario("registry.one", _setup, _registry_one, _raw_one, target=1.05,
             hold_connection=True,
             description="dl.executor(conn).one('orgs.get') vs conn.fetchrow, held connection"),
    Scenario("repo.one", _setup, _repo_one, _raw_one, target=1.10, hold_connection=True,
             description="dl.executor(conn).orgs.get → dataclass vs conn.fetchrow"),
    Scenario("session.one.same_tenant", _setup, _session_same, _pool_same, target=1.5,
             description="read-only session, same context every op, vs acquire+fetchrow"),
    Scenario("session.one.switch_tenant", _setup, _session_switch, _pool_switch, target=3.2,
             description=f"read-only session cycling {TENANTS} tenants vs acquire+fetchrow"),
    Scenario("session.ten", _setup, _session_ten, _pool_ten, target=1.25,
             description="read-write session, 10x orgs.get, vs 10 fetchrow in a transaction"),
]
