"""API keys: shown once, stored as a hash, verified in one lookup across organizations."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from datalayer import Context, DataLayer, PermissionDenied
from datalayer.repos.api_keys import hash_key
from tests.conftest import MemberFactory, TenantFactory


async def test_create_shows_the_key_once_and_stores_only_its_hash(
    dl: DataLayer, make_tenant: TenantFactory, admin_conn: asyncpg.Connection,
) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        issued = await db.api_keys.create("ci", scopes=["workflows:read", "workflows:read"])
    assert issued.secret.startswith("dl_test_") and len(issued.secret) > 40
    assert issued.secret not in repr(issued)
    assert (issued.key.last4, issued.key.scopes) == (issued.secret[-4:], ["workflows:read"])
    row = await admin_conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", issued.key.id)
    assert row is not None
    assert bytes(row["key_hash"]) == hashlib.sha256(issued.secret.encode()).digest()
    stored = " ".join(str(v) for v in row.values())
    assert issued.secret not in stored and issued.secret[8:] not in stored


async def test_verify_works_without_context_and_records_use(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    t = await make_tenant()
    member = await add_member(t, "viewer")
    with pytest.raises(PermissionDenied, match="row-level security"):
        async with dl.session(member) as db:
            await db.api_keys.create("viewer key")  # viewers cannot write
    async with dl.session(t.owner) as db:
        issued = await db.api_keys.create("ops", scopes=["admin"])
    async with dl.session(Context(None)) as db:
        found = await db.api_keys.verify(issued.secret)
        flipped = "y" if issued.secret.endswith("x") else "x"
        assert await db.api_keys.verify(issued.secret[:-1] + flipped) is None
        assert await db.api_keys.verify("garbage") is None
    assert found is not None
    assert (found.org_id, found.user_id, found.role, found.scopes) == (
        t.org_id, t.owner_id, "owner", ["admin"])
    assert await admin_conn.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1",
                                     issued.key.id) is not None


async def test_revoked_expired_and_orphaned_keys_do_not_verify(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    t = await make_tenant()
    member = await add_member(t, "member")
    async with dl.session(t.owner) as db:
        revoked = await db.api_keys.create("revoked")
        expired = await db.api_keys.create(
            "expired", expires_at=datetime.now(UTC) + timedelta(seconds=60))
    async with dl.session(member) as db:
        orphan = await db.api_keys.create("member's")
    await admin_conn.execute("UPDATE api_keys SET expires_at = now() - interval '1 s' "
                             "WHERE id = $1", expired.key.id)
    async with dl.session(t.owner) as db:
        assert await db.api_keys.revoke(revoked.key.id)
        assert await db.memberships.remove(member.user_id)  # type: ignore[arg-type]
    async with dl.session(Context(None)) as db:
        for issued in (revoked, expired, orphan):
            assert await db.api_keys.verify(issued.secret) is None


async def test_members_see_their_own_keys_admins_see_all_other_orgs_none(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    member, admin = await add_member(a, "member"), await add_member(a, "admin")
    async with dl.session(member) as db:
        mine = await db.api_keys.create("mine")
    async with dl.session(a.owner) as db:
        owners = await db.api_keys.create("owner's")
    async with dl.session(member, readonly=True) as db:
        assert [k.id for k in (await db.api_keys.list()).items] == [mine.key.id]
    async with dl.session(admin, readonly=True) as db:
        assert {k.id for k in (await db.api_keys.list()).items} == {mine.key.id, owners.key.id}
    async with dl.session(b.owner) as db:
        assert (await db.api_keys.list()).items == []
        assert await db.api_keys.revoke(mine.key.id) is False
    async with dl.session(member) as db:
        assert await db.api_keys.revoke(owners.key.id) is False  # not a member's to revoke


async def test_key_hash_is_not_readable_by_the_runtime_role(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        await db.api_keys.create("x")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with dl.session(t.owner, readonly=True) as db:
            await db.connection.fetch("SELECT key_hash FROM api_keys")


def test_hash_key_is_sha256_of_the_whole_key() -> None:
    assert hash_key("dl_test_abc") == hashlib.sha256(b"dl_test_abc").digest()


async def test_verify_in_a_readonly_session_reads_without_writing(
    dl: DataLayer, make_tenant: TenantFactory, admin_conn: asyncpg.Connection,
) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        issued = await db.api_keys.create("ro")
    async with dl.session(Context(None), readonly=True) as db:
        assert await db.api_keys.verify(issued.secret) is not None
    assert await admin_conn.fetchval("SELECT last_used_at FROM api_keys WHERE id = $1",
                                     issued.key.id) is None
