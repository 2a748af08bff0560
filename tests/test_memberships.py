"""Memberships and roles: admins manage members, owners manage owners, one owner stays."""

from __future__ import annotations

import uuid

import pytest

from datalayer import Context, DataLayer, NotFound, PermissionDenied, ValidationError
from tests.conftest import MemberFactory, TenantFactory, email_for


async def test_owner_membership_exists_and_for_user_spans_orgs(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    m = await add_member(a, "admin")
    assert m.user_id is not None
    async with dl.session(b.owner) as db:
        token = await db.auth.invite(email_for(m.user_id), "viewer")
    async with dl.session(Context(None, user_id=m.user_id)) as db:
        assert await db.auth.consume_token("invitation", token) is not None
    async with dl.session(Context(None, user_id=m.user_id), readonly=True) as db:
        mine = await db.memberships.for_user()
    assert {(x.org_id, x.role) for x in mine} == {(a.org_id, "admin"), (b.org_id, "viewer")}


@pytest.mark.parametrize("role", ["owner", "admin", "member", "viewer", "guest"])
async def test_nobody_adds_another_user_without_an_invitation(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory, role: str,
) -> None:
    t = await make_tenant()
    actor = await add_member(t, role)
    newcomer = await add_member(await make_tenant())
    with pytest.raises(PermissionDenied):
        async with dl.session(actor) as db:
            await db.memberships.add(newcomer.user_id, "member")  # type: ignore[arg-type]


async def test_only_owners_grant_or_change_ownership(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    admin = await add_member(t, "admin")
    member = await add_member(t, "member")
    with pytest.raises(PermissionDenied):  # WITH CHECK: only owners make owners
        async with dl.session(admin) as db:
            await db.memberships.set_role(member.user_id, "owner")  # type: ignore[arg-type]
    with pytest.raises(NotFound):  # USING: an owner's row is out of an admin's reach
        async with dl.session(admin) as db:
            await db.memberships.set_role(t.owner_id, "member")
    async with dl.session(admin) as db:
        changed = await db.memberships.set_role(member.user_id, "viewer")  # type: ignore[arg-type]
    assert changed.role == "viewer"
    async with dl.session(t.owner) as db:
        promoted = await db.memberships.set_role(member.user_id, "owner")  # type: ignore[arg-type]
    assert promoted.role == "owner"


async def test_last_owner_cannot_leave_or_be_demoted(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    with pytest.raises(ValidationError, match="at least one owner") as err:
        async with dl.session(t.owner) as db:
            await db.memberships.set_role(t.owner_id, "admin")
    assert err.value.constraint == "memberships_last_owner"
    with pytest.raises(ValidationError, match="at least one owner"):
        async with dl.session(t.owner) as db:
            await db.memberships.remove(t.owner_id)
    second = await add_member(t, "member")
    async with dl.session(t.owner) as db:
        await db.memberships.set_role(second.user_id, "owner")  # type: ignore[arg-type]
        assert await db.memberships.remove(t.owner_id)  # now the first owner may leave


async def test_members_may_leave_but_not_remove_others(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    a, b = await add_member(t), await add_member(t)
    async with dl.session(a) as db:
        assert await db.memberships.remove(b.user_id) is False  # type: ignore[arg-type]
        assert await db.memberships.remove(a.user_id) is True  # type: ignore[arg-type]


async def test_memberships_of_another_org_are_invisible(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    async with dl.session(a.owner) as db:
        assert await db.memberships.get(b.owner_id) is None
        assert await db.memberships.remove(b.owner_id) is False
        page = await db.memberships.list()
    assert {m.org_id for m in page.items} == {a.org_id}


async def test_unknown_role_is_refused(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    with pytest.raises(ValidationError, match="role must be one of"):
        async with dl.session(t.owner) as db:
            await db.memberships.add(uuid.uuid4(), "superuser")
