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
