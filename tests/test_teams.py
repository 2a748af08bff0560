"""Teams and team members: read by the organization, written by its admins."""

from __future__ import annotations

import asyncpg
import pytest

from datalayer import Conflict, DataLayer, NotFound, PermissionDenied, ValidationError
from tests.conftest import MemberFactory, TenantFactory


async def test_admin_creates_team_and_adds_members(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    t = await make_tenant()
    admin, member = await add_member(t, "admin"), await add_member(t, "member")
    async with dl.session(admin) as db:
        team = await db.teams.create("Platform", "runs the platform")
        await db.teams.add_member(team.id, member.user_id, "lead")  # type: ignore[arg-type]
    async with dl.session(member, readonly=True) as db:
        assert [m.user_id for m in await db.teams.members(team.id)] == [member.user_id]
        assert [x.id for x in await db.teams.of_user(member.user_id)] == [team.id]  # type: ignore[arg-type]
    async with dl.session(admin) as db:
        assert await db.teams.delete(team.id)
    assert await admin_conn.fetchval("SELECT count(*) FROM team_members WHERE team_id = $1",
                                     team.id) == 0


async def test_team_names_unique_per_org_case_insensitive(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    async with dl.session(a.owner) as db:
        await db.teams.create("Ops")
    with pytest.raises(Conflict) as err:
        async with dl.session(a.owner) as db:
            await db.teams.create("OPS")
    assert err.value.constraint == "teams_name_key"
    async with dl.session(b.owner) as db:  # another organization may use the name
        assert (await db.teams.create("Ops")).org_id == b.org_id


async def test_members_read_but_cannot_write(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        team = await db.teams.create("Readers")
    member = await add_member(t, "member")
    with pytest.raises(PermissionDenied):
        async with dl.session(member) as db:
            await db.teams.create("Nope")
    with pytest.raises(NotFound):
        async with dl.session(member) as db:
            await db.teams.rename(team.id, name="Renamed")
    async with dl.session(member) as db:
        assert await db.teams.delete(team.id) is False
        assert await db.teams.get(team.id) is not None


async def test_team_member_must_belong_to_the_org(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    async with dl.session(a.owner) as db:
        team = await db.teams.create("Closed")
    with pytest.raises(ValidationError) as err:
        async with dl.session(a.owner) as db:
            await db.teams.add_member(team.id, b.owner_id)
    assert err.value.constraint == "team_members_org_id_user_id_fkey"
    with pytest.raises(ValidationError, match="team_role must be one of"):
        async with dl.session(a.owner) as db:
            await db.teams.add_member(team.id, a.owner_id, "captain")


async def test_other_org_cannot_see_or_touch_teams(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    async with dl.session(a.owner) as db:
        team = await db.teams.create("Secret")
    async with dl.session(b.owner) as db:
        assert await db.teams.get(team.id) is None
        assert await db.teams.members(team.id) == []
        assert await db.teams.delete(team.id) is False
        with pytest.raises(ValidationError):  # FK to a team B cannot see
            async with db.savepoint():
                await db.teams.add_member(team.id, b.owner_id)


async def test_team_list_keyset_by_name(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        for name in ("delta", "Alpha", "charlie", "Bravo", "echo"):
            await db.teams.create(name)
        first = await db.teams.list(limit=2)
        rest = await db.teams.list(after=first.next, limit=10)
    assert [x.name for x in first.items + rest.items] == [
        "Alpha", "Bravo", "charlie", "delta", "echo"]
    assert rest.next is None
