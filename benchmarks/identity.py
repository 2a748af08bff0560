"""Identity scenarios: user by email, API-key verification, permission check.

Each runs in a tenant-scoped read-only session (RLS on, a different tenant each operation)
against raw asyncpg running the same statement. Data: ``TENANTS`` organizations with
``USERS_PER_TENANT`` members each, loaded through COPY, plus one API key and one team per
organization, then ANALYZE. The seed's goal is p99 under 1 ms for all three
(``p99_target_ms``); ``ratio`` is reported as everywhere.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from datalayer import Context
from datalayer.repos.api_keys import hash_key

from .core import owned_org
from .harness import BenchContext, Scenario, bind_context

__all__ = ["SCENARIOS"]

TENANTS = 67  # prime, ≥ 64: cycling never lines up with the pool's 16 connections
USERS_PER_TENANT = 150  # ~10k users in all


@dataclass(frozen=True, slots=True)
class IdentityState:
    orgs: tuple[uuid.UUID, ...]
    owners: tuple[uuid.UUID, ...]
    emails: tuple[str, ...]  # a member's email per organization
    keys: tuple[str, ...]  # an API key secret per organization
    teams: tuple[uuid.UUID, ...]
    members: tuple[uuid.UUID, ...]  # a team member per organization
    ctxs: tuple[Context, ...]
    sql_email: str
    sql_verify: str
    sql_check: str  # permissions.check with app.org_id() bound as a parameter


async def _setup(bctx: BenchContext) -> IdentityState:
    cached: IdentityState | None = bctx.cache.get("identity")
    if cached is not None:
        return cached
    dl, run = bctx.dl, uuid.uuid4().hex[:8]
    orgs, owners, emails, keys, teams, members = [], [], [], [], [], []
    users: list[tuple[Any, ...]] = []
    memberships: list[tuple[Any, ...]] = []
    for t in range(TENANTS):
        made = await owned_org(bctx, "identity")
        org, owner = made.org_id, made.user_id
        async with dl.session(made.ctx) as db:
            keys.append((await db.api_keys.create("bench")).secret)
        ids = [uuid.uuid4() for _ in range(USERS_PER_TENANT)]
        now = datetime.now(UTC)
        users += [(u, f"u{i}-{run}-{t}@bench.test", f"User {i}", "free", now)
                  for i, u in enumerate(ids)]
        memberships += [(org, u, "member", now) for u in ids]
        orgs.append(org)
        owners.append(owner)
        emails.append(f"u{USERS_PER_TENANT // 2}-{run}-{t}@bench.test")
        members.append(ids[0])
    async with dl.system() as db:
        await db.copy("users.copy_rows", users)
        await db.copy("memberships.copy_rows", memberships)
    for t, org in enumerate(orgs):
        async with dl.session(Context(org, user_id=owners[t], role="owner")) as db:
            team = await db.teams.create("Bench team")
            await db.teams.add_member(team.id, members[t])
            teams.append(team.id)
    async with dl.system() as db:
        await db.connection.execute("ANALYZE users; ANALYZE memberships; ANALYZE api_keys; "
                                    "ANALYZE team_members")
    reg = dl.registry
    check = reg["permissions.check"]
    state = IdentityState(
        tuple(orgs), tuple(owners), tuple(emails), tuple(keys), tuple(teams), tuple(members),
        tuple(Context(o, user_id=owners[i], role="member") for i, o in enumerate(orgs)),
        reg["users.get_by_email"].sql, reg["api_keys.verify"].sql,
        # the raw side has no context: pass the organization where the policy helper reads it
        bind_context(check.sql, len(check.params), user=False),
    )
    bctx.cache["identity"] = state
    return state


async def _email(b: BenchContext, s: IdentityState, i: int) -> None:
    k = i % TENANTS
    async with b.dl.session(s.ctxs[k], readonly=True) as db:
        if await db.users.get_by_email(s.emails[k]) is None:
            raise RuntimeError("users.get_by_email found nothing")


async def _email_raw(b: BenchContext, s: IdentityState, i: int) -> None:
    async with b.pool.acquire() as conn:
        await conn.fetchrow(s.sql_email, s.emails[i % TENANTS])


_ANON = Context(None)


async def _verify(b: BenchContext, s: IdentityState, i: int) -> None:
    async with b.dl.session(_ANON, readonly=True) as db:
        if await db.api_keys.verify(s.keys[i % TENANTS]) is None:
            raise RuntimeError("api_keys.verify found nothing")


async def _verify_raw(b: BenchContext, s: IdentityState, i: int) -> None:
    async with b.pool.acquire() as conn:
        await conn.fetchrow(s.sql_verify, hash_key(s.keys[i % TENANTS]))


async def _check(b: BenchContext, s: IdentityState, i: int) -> None:
    k = i % TENANTS
    async with b.dl.session(s.ctxs[k], readonly=True) as db:
        if not await db.permissions.check(s.members[k], "update", "workflows",
                                          team_id=s.teams[k]):
            raise RuntimeError("permissions.check refused a team member")


async def _check_raw(b: BenchContext, s: IdentityState, i: int) -> None:
    k = i % TENANTS
    params = {"resource": "workflows", "action": "update", "team_id": s.teams[k],
              "user_id": s.members[k]}
    order = b.dl.registry["permissions.check"].params
    async with b.pool.acquire() as conn:
        await conn.fetchval(s.sql_check, *(params[p] for p in order), s.orgs[k])


async def _p99_target(b: BenchContext, s: IdentityState) -> dict[str, Any]:
    return {"p99_target_ms": 1.0}


SCENARIOS: list[Scenario] = [
    Scenario("users.get_by_email", _setup, _email, _email_raw, extra=_p99_target,
             description="tenant session, user by email (case-insensitive index)"),
    Scenario("api_keys.verify", _setup, _verify, _verify_raw, extra=_p99_target,
             description="no-context session, key hash lookup across organizations"),
    Scenario("permissions.check", _setup, _check, _check_raw, extra=_p99_target,
             description="tenant session, role matrix + team membership"),
]
