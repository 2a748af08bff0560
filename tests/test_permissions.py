"""Permission checks: the role matrix in SQL, team ownership, and non-members."""

from __future__ import annotations

import uuid

import pytest

from datalayer import DataLayer, ValidationError
from datalayer.repos.permissions import ACTIONS, RESOURCES
from tests.conftest import MemberFactory, TenantFactory

EXPECTED = {  # (role, resource, action) spot checks of the documented matrix
    ("owner", "organization", "delete"): True,
    ("admin", "organization", "delete"): False,
    ("admin", "members", "manage"): True,
    ("member", "workflows", "execute"): True,
    ("member", "members", "manage"): False,
    ("member", "api_keys", "create"): True,
    ("viewer", "workflows", "read"): True,
    ("viewer", "credentials", "read"): False,
    ("viewer", "workflows", "update"): False,
    ("guest", "executions", "read"): True,
    ("guest", "teams", "read"): False,
}


async def test_role_matrix(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner, readonly=True) as db:
        for (role, resource, action), allowed in EXPECTED.items():
            assert await db.permissions.role_allows(role, action, resource) is allowed, (
                role, resource, action)
        for resource in RESOURCES:  # owners may do everything, nobody else gets 'unknown'
            for action in ACTIONS:
                assert await db.permissions.role_allows("owner", action, resource)
                assert not await db.permissions.role_allows("nobody", action, resource)


async def test_check_uses_the_membership_and_team(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t, other = await make_tenant(), await make_tenant()
    member, outsider = await add_member(t, "member"), await add_member(t, "member")
    assert member.user_id and outsider.user_id
    async with dl.session(t.owner) as db:
        team = await db.teams.create("Owners of R")
        await db.teams.add_member(team.id, member.user_id)
    async with dl.session(member, readonly=True) as db:
        check = db.permissions.check
        assert await check(member.user_id, "update", "workflows")
        assert await check(member.user_id, "update", "workflows", team_id=team.id)
        assert not await check(outsider.user_id, "update", "workflows", team_id=team.id)
        assert await check(t.owner_id, "update", "workflows", team_id=team.id)  # owner: any team
        assert not await check(member.user_id, "manage", "members")
        assert not await check(other.owner_id, "read", "workflows")  # not a member here
        assert not await check(uuid.uuid4(), "read", "workflows")
    async with dl.session(other.owner, readonly=True) as db:  # B cannot ask about A's people
        assert not await db.permissions.check(member.user_id, "read", "workflows")


async def test_unknown_names_are_refused_before_the_database(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    async with dl.session(t.owner, readonly=True) as db:
        with pytest.raises(ValidationError, match="resource must be one of"):
            await db.permissions.check(t.owner_id, "read", "spaceships")
        with pytest.raises(ValidationError, match="action must be one of"):
            await db.permissions.check(t.owner_id, "fly", "workflows")
