"""``datalayer demo``: a real scenario against the configured database, printed as it runs.

Each domain adds a section. Output is for people; it goes to the stream it is given.
"""

from __future__ import annotations

import uuid
from typing import TextIO

import asyncpg

from datalayer.core.context import Context
from datalayer.core.database import DataLayer
from datalayer.core.errors import translate

__all__ = ["run_demo"]


async def run_demo(dl: DataLayer, out: TextIO) -> None:
    """Run every section in order."""
    await _tenancy(dl, out)
    await _identity(dl, out)


async def _tenancy(dl: DataLayer, out: TextIO) -> None:
    def say(text: str = "") -> None:
        print(text, file=out)

    run = uuid.uuid4().hex[:6]
    say("== Tenancy: two organizations, each sees only itself (RLS) ==")
    tenants = {}
    for name in ("Acme", "Globex"):
        ctx = Context(uuid.uuid4(), user_id=uuid.uuid4(), role="owner",
                      request_id=f"demo-{run}")
        async with dl.session(ctx) as db:
            org = await db.orgs.create(slug=f"{name.lower()}-{run}", name=name, plan="pro")
        tenants[name] = (ctx, org)
        say(f"created {org.name:<7} id={org.id} slug={org.slug}")
    acme_ctx, acme = tenants["Acme"]
    _, globex = tenants["Globex"]
    async with dl.session(acme_ctx, readonly=True) as db:
        visible = [o.name for o in await db.orgs.list_visible()]
        say(f"Acme's session lists: {visible}")
        say(f"Acme's session reads Globex by id: {await db.orgs.get(globex.id)}")
        role = await db.connection.fetchval("SELECT current_user")
        say(f"Acme's session runs as role {role!r} (NOBYPASSRLS, owns nothing)")
    async with dl.session(Context(None), readonly=True) as db:
        say(f"a session with no organization counts {await db.scalar('orgs.count_all')} "
            "organizations")
    try:
        async with dl.session(acme_ctx.with_(role="viewer")) as db:
            await db.orgs.update(acme.id, name="Renamed by a viewer")
    except Exception as exc:  # NotFound: the viewer's UPDATE matched no writable row
        say(f"a viewer renaming Acme: {type(exc).__name__}: {exc}")
    try:
        async with dl.session(acme_ctx) as db:
            await db.connection.execute(
                "INSERT INTO organizations (id, slug, name) VALUES ($1, $2, 'Sneaky')",
                uuid.uuid4(), f"sneaky-{run}")
    except asyncpg.PostgresError as exc:
        err = translate(exc)
        say(f"Acme inserting an organization with another id: {type(err).__name__}: {err}")
    async with dl.system() as db:
        say(f"the maintenance role (dl.system()) counts {await db.scalar('orgs.count_all')} "
            "organizations across all tenants")
    say()


async def _identity(dl: DataLayer, out: TextIO) -> None:
    def say(text: str = "") -> None:
        print(text, file=out)

    run = uuid.uuid4().hex[:6]
    say("== Identity: users, teams, API keys, lockout ==")
    orgs = {}
    for name in ("Initech", "Hooli"):
        org_id, owner_id = uuid.uuid4(), uuid.uuid4()
        owner = Context(org_id, user_id=owner_id, role="owner", request_id=f"demo-{run}")
        email = f"owner-{run}@{name.lower()}.example"
        async with dl.session(owner) as db:
            await db.orgs.create(slug=f"{name.lower()}-{run}", name=name)
            await db.auth.register(email=email, password=f"{name} owner password",
                                   display_name=f"{name} owner")
            await db.memberships.add(owner_id, "owner")
            team = await db.teams.create("Platform")
            await db.teams.add_member(team.id, owner_id, "lead")
        orgs[name] = (owner, email, team)
        say(f"{name}: owner {email} registered, team {team.name!r} created")
    initech, initech_email, _ = orgs["Initech"]
    hooli, _, hooli_team = orgs["Hooli"]
    async with dl.session(initech) as db:
        issued = await db.api_keys.create("ci", scopes=["workflows:read"])
    say(f"issued API key {issued.key.prefix}…{issued.key.last4} "
        "(the full key is shown once; only its sha256 is stored)")
    async with dl.session(Context(None)) as db:
        found = await db.api_keys.verify(issued.secret)
        last = issued.secret[-1]
        forged = await db.api_keys.verify(issued.secret[:-1] + ("1" if last == "0" else "0"))
    assert found is not None
    say(f"verified without a context: org={found.org_id} role={found.role} "
        f"scopes={found.scopes}; a forged key verifies as {forged}")
    async with dl.session(Context(None)) as db:
        for attempt in range(1, 6):
            result = await db.auth.login(initech_email, f"wrong password {attempt}")
            say(f"login attempt {attempt} with a wrong password: {result.outcome}")
        right = await db.auth.login(initech_email, "Initech owner password")
        say(f"the right password while locked: {right.outcome} "
            f"(until {right.locked_until:%H:%M:%S}; attempts while locked are not counted)")
    async with dl.session(initech, readonly=True) as db:
        foreign_team = await db.teams.get(hooli_team.id)
        user = await db.users.get(hooli.user_id)  # type: ignore[arg-type]
        allowed = await db.permissions.check(initech.user_id, "delete",  # type: ignore[arg-type]
                                             "organization")
    say(f"Initech reads Hooli's team: {foreign_team}; Hooli's owner: {user}")
    say(f"may Initech's owner delete the organization? {allowed}")
    say()
