"""Users: global accounts, visible to themselves and to members of the context org."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from datalayer import Conflict, Context, DataLayer, NotFound, PermissionDenied, ValidationError
from datalayer.core.errors import translate
from tests.conftest import MemberFactory, TenantFactory, email_for


async def test_register_and_read_back(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner, readonly=True) as db:
        me = await db.users.get(t.owner_id)
        by_email = await db.users.get_by_email(email_for(t.owner_id).upper())
    assert me is not None and by_email == me
    assert (me.subscription_tier, me.status, me.failed_logins) == ("free", "active", 0)


async def test_email_unique_among_live_users_case_insensitive(dl: DataLayer) -> None:
    email = f"Dup-{uuid.uuid4().hex[:8]}@Example.test"
    first = Context(None, user_id=uuid.uuid4())
    async with dl.session(first) as db:
        await db.users.create(email=email)
    with pytest.raises(Conflict) as err:
        async with dl.session(Context(None, user_id=uuid.uuid4())) as db:
            await db.users.create(email=email.lower())
    assert err.value.constraint == "users_email_live_key"
    assert email.lower() not in str(err.value).lower()
    async with dl.session(first) as db:  # a deleted account frees its address …
        assert await db.users.soft_delete(first.user_id)  # type: ignore[arg-type]
    second = Context(None, user_id=uuid.uuid4())
    async with dl.session(second) as db:
        await db.users.create(email=email.upper())
    with pytest.raises(Conflict):  # … and cannot come back while it is taken
        async with dl.session(first) as db:
            await db.users.restore(first.user_id)  # type: ignore[arg-type]


async def test_users_see_themselves_and_their_org_members_only(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    a_member = await add_member(a, "viewer")
    async with dl.session(a_member, readonly=True) as db:
        assert await db.users.get(a.owner_id) is not None
        assert await db.users.get(b.owner_id) is None
        assert await db.users.get_by_email(email_for(b.owner_id)) is None
        page = await db.users.list_members()
    assert {u.id for u in page.items} == {a.owner_id, a_member.user_id}
    lone = Context(None, user_id=a_member.user_id)  # no organization: only yourself
    async with dl.session(lone, readonly=True) as db:
        assert await db.users.get(a_member.user_id) is not None  # type: ignore[arg-type]
        assert await db.users.get(a.owner_id) is None


async def test_profile_changes_only_by_the_user_itself(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    member = await add_member(t, "member")
    async with dl.session(member) as db:
        me = await db.users.update_profile(member.user_id,  # type: ignore[arg-type]
                                           display_name="Me", preferences={"tz": "UTC"})
    assert (me.display_name, me.preferences) == ("Me", {"tz": "UTC"})
    with pytest.raises(NotFound):  # even the organization's owner cannot edit an account
        async with dl.session(t.owner) as db:
            await db.users.update_profile(member.user_id,  # type: ignore[arg-type]
                                          display_name="Owned")
    with pytest.raises(ValidationError, match="subscription_tier must be one of"):
        async with dl.session(member) as db:
            await db.users.update_profile(member.user_id,  # type: ignore[arg-type]
                                          subscription_tier="gold")


async def test_secret_columns_are_not_readable_by_the_runtime_role(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    for column in ("password_hash", "totp_secret", "recovery_codes"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as err:
            async with dl.session(t.owner, readonly=True) as db:
                await db.connection.fetchval(f"SELECT {column} FROM users WHERE id = $1",
                                             t.owner_id)
        assert isinstance(translate(err.value), PermissionDenied)


async def test_hard_delete_cascades_memberships(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    t = await make_tenant()
    member = await add_member(t, "member")
    async with dl.session(member) as db:
        assert await db.users.hard_delete(member.user_id)  # type: ignore[arg-type]
    assert await admin_conn.fetchval(
        "SELECT count(*) FROM memberships WHERE user_id = $1", member.user_id) == 0


async def test_list_members_keyset_pagination(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    for _ in range(4):
        await add_member(t)
    seen: list[uuid.UUID] = []
    after = None
    async with dl.session(t.owner, readonly=True) as db:
        while True:
            page = await db.users.list_members(after=after, limit=2)
            seen += [u.id for u in page.items]
            if page.next is None:
                break
            after = page.next
    assert len(seen) == len(set(seen)) == 5
    with pytest.raises(ValidationError, match="limit must be between"):
        async with dl.session(t.owner, readonly=True) as db:
            await db.users.list_members(limit=0)
