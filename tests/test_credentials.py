"""Credentials: per-type validation, encryption at rest, metadata-only reads, audited decrypt,
expiry, validity, soft delete, and the tenant/role boundary."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from datalayer import Context, DataLayer
from datalayer.core.errors import (
    Conflict,
    DataLayerError,
    NotFound,
    PermissionDenied,
    ValidationError,
)
from datalayer.repos.credentials import TYPES, validate_payload
from datalayer.security.keyring import DecryptionError
from tests.conftest import MemberFactory, TenantFactory

SECRET = "s3cr3t-" + uuid.uuid4().hex

PAYLOADS: dict[str, dict[str, Any]] = {
    "api_key": {"key": SECRET, "header": "X-Api-Key"},
    "oauth2": {"access_token": SECRET, "refresh_token": "r-" + SECRET,
               "expires_at": "2030-01-01T00:00:00+00:00", "scopes": ["read", "write"]},
    "basic": {"username": "alice", "password": SECRET},
    "database": {"host": "db.example", "port": 5432, "database": "app",
                 "username": "app", "password": SECRET},
    "ssh_key": {"private_key": "-----BEGIN KEY-----" + SECRET, "username": "git"},
    "custom": {"anything": SECRET, "n": 1},
}


def test_every_type_has_a_valid_example() -> None:
    assert set(PAYLOADS) == set(TYPES)
    for t, p in PAYLOADS.items():
        assert validate_payload(t, p) == p


@pytest.mark.parametrize(("type_", "payload", "field"), [
    ("api_key", {}, "key"),
    ("api_key", {"key": 5}, "key"),
    ("api_key", {"key": ""}, "key"),
    ("api_key", {"key": "k", "extra": SECRET}, "extra"),
    ("oauth2", {"refresh_token": "r"}, "access_token"),
    ("oauth2", {"access_token": "a", "scopes": "read"}, "scopes"),
    ("oauth2", {"access_token": "a", "scopes": ["read", 3]}, "scopes"),
    ("oauth2", {"access_token": "a", "expires_at": "tomorrow"}, "expires_at"),
    ("basic", {"username": "u"}, "password"),
    ("database", {"host": "h", "database": "d", "username": "u", "password": "p",
                  "port": "5432"}, "port"),
    ("database", {"host": "h", "database": "d", "username": "u", "password": "p",
                  "port": 70000}, "port"),
    ("database", {"host": "h", "database": "d", "username": "u", "password": "p",
                  "port": True}, "port"),
    ("ssh_key", {"username": "git"}, "private_key"),
])
def test_bad_payloads_name_the_field_not_the_value(type_: str, payload: dict[str, Any],
                                                   field: str) -> None:
    with pytest.raises(ValidationError) as err:
        validate_payload(type_, payload)
    assert repr(field) in str(err.value)
    assert SECRET not in str(err.value)


def test_unknown_type_and_non_objects_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown credential type"):
        validate_payload("ftp", {"x": 1})
    with pytest.raises(ValidationError, match="object"):
        validate_payload("basic", ["u", "p"])
    with pytest.raises(ValidationError, match="empty"):
        validate_payload("custom", {})


async def test_round_trip_metadata_only_and_audited_decrypt(
        dl: DataLayer, make_tenant: TenantFactory, admin_conn: asyncpg.Connection,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    t = await make_tenant()
    ids = {}
    async with dl.session(t.owner) as db:
        for type_, payload in PAYLOADS.items():
            cred = await db.credentials.create(f"cred {type_}", type_, payload,
                                               metadata={"note": "visible"})
            ids[type_] = cred.id
            assert cred.org_id == t.org_id and cred.type == type_ and cred.is_valid
            assert cred.created_by == t.owner_id
            assert SECRET not in repr(cred)
    async with dl.session(t.owner, readonly=True) as db:
        page = await db.credentials.list()
        assert [c.name for c in page.items] == sorted(f"cred {x}" for x in PAYLOADS)
        assert SECRET not in repr(page)
        assert [c.type for c in (await db.credentials.list(type="basic")).items] == ["basic"]
        one = await db.credentials.get(ids["basic"])
        assert one is not None and one.metadata == {"note": "visible"}
        with pytest.raises(PermissionDenied):
            await db.credentials.decrypt(ids["basic"])
    # at rest: no plaintext anywhere in the row
    rows = await admin_conn.fetch("SELECT * FROM credentials WHERE org_id = $1", t.org_id)
    assert len(rows) == len(PAYLOADS)
    for r in rows:
        assert SECRET.encode() not in bytes(r["secret"]) and SECRET not in repr(dict(r))
        assert dl.keyring.key_id_of(bytes(r["secret"])) == dl.keyring.active_kid
    async with dl.session(t.owner) as db:
        for type_, payload in PAYLOADS.items():
            out = await db.credentials.decrypt(ids[type_])
            assert out.payload == payload and out.type == type_
            assert SECRET not in repr(out)
        log = await db.credentials.access_log(ids["basic"])
        assert [(a.actor_id, a.action) for a in log] == [(t.owner_id, "decrypt")]
        assert SECRET not in repr(log)
        assert (await db.credentials.get(ids["basic"])).last_used_at is not None  # type: ignore[union-attr]
    audit = await admin_conn.fetch("SELECT * FROM credential_access WHERE org_id = $1",
                                   t.org_id)
    assert len(audit) == len(PAYLOADS) and SECRET not in repr([dict(a) for a in audit])
    assert not [r for r in caplog.records if SECRET in r.getMessage() or SECRET in repr(r.__dict__)]


async def test_access_log_is_append_only(dl: DataLayer, make_tenant: TenantFactory,
                                         admin_conn: asyncpg.Connection) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        cid = (await db.credentials.create("k", "api_key", {"key": SECRET})).id
        await db.credentials.decrypt(cid)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await admin_conn.execute("UPDATE credential_access SET actor_id = NULL "
                                 "WHERE credential_id = $1", cid)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await admin_conn.execute("DELETE FROM credential_access WHERE credential_id = $1", cid)
    async with dl.session(t.owner) as db:
        for sql in ("UPDATE credential_access SET action = 'decrypt' WHERE credential_id = $1",
                    "DELETE FROM credential_access WHERE credential_id = $1"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with db.savepoint():
                    await db.connection.execute(sql, cid)
        # forging a record for someone else is refused by the policy
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.savepoint():
                await db.connection.execute(
                    "INSERT INTO credential_access (org_id, credential_id, actor_id, action) "
                    "VALUES ($1, $2, $3, 'decrypt')", t.org_id, cid, uuid.uuid4())


async def test_update_soft_delete_and_names(dl: DataLayer, make_tenant: TenantFactory,
                                            admin_conn: asyncpg.Connection) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        c = await db.credentials.create("Stripe", "api_key", {"key": "old"})
        with pytest.raises(Conflict):
            async with db.savepoint():
                await db.credentials.create("stripe", "basic", {"username": "u",
                                                                "password": "p"})
        await db.credentials.mark_validated(c.id, valid=False)
        with pytest.raises(ValidationError, match="'key'"):
            await db.credentials.update(c.id, payload={"token": "x"})
        u = await db.credentials.update(c.id, name="Stripe live", payload={"key": "new"},
                                        metadata={"env": "live"})
        assert u.name == "Stripe live" and u.metadata == {"env": "live"} and u.is_valid
        assert u.last_validated_at is None
        assert (await db.credentials.decrypt(c.id)).payload == {"key": "new"}
        assert await db.credentials.delete(c.id)
        assert not await db.credentials.delete(c.id)
        assert await db.credentials.get(c.id) is None
        with pytest.raises(NotFound):
            await db.credentials.decrypt(c.id)
        with pytest.raises(NotFound):
            await db.credentials.update(c.id, name="again")
        again = await db.credentials.create("Stripe live", "api_key", {"key": "k"})
        assert again.id != c.id
    # a blob moved to another row does not decrypt (associated data binds the row)
    old_blob = await admin_conn.fetchval("SELECT secret FROM credentials WHERE id = $1", c.id)
    await admin_conn.execute("UPDATE credentials SET secret = $1 WHERE id = $2", old_blob,
                             again.id)
    async with dl.session(t.owner) as db:
        with pytest.raises(DecryptionError) as err:
            await db.credentials.decrypt(again.id)
        assert "old" not in str(err.value).split("credentials.secret")[0]


async def test_expiry_and_deactivate_expired(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    past = datetime.now(UTC) - timedelta(minutes=1)
    async with dl.session(t.owner) as db:
        gone = await db.credentials.create("expired", "api_key", {"key": "k"}, expires_at=past)
        live = await db.credentials.create("live", "api_key", {"key": "k"},
                                           expires_at=past + timedelta(days=1))
        never = await db.credentials.create("never", "api_key", {"key": "k"})
        u = await db.credentials.update(never.id, expires_at=past + timedelta(days=2))
        assert u.expires_at is not None
        u = await db.credentials.update(never.id, clear_expiry=True)
        assert u.expires_at is None
    async with dl.system() as db:
        assert await db.credentials.deactivate_expired() >= 1
        assert await db.credentials.deactivate_expired() == 0
    async with dl.session(t.owner, readonly=True) as db:
        assert (await db.credentials.get(gone.id)).is_valid is False  # type: ignore[union-attr]
        assert (await db.credentials.get(live.id)).is_valid is True  # type: ignore[union-attr]


async def test_roles_and_tenants(dl: DataLayer, make_tenant: TenantFactory,
                                 add_member: MemberFactory) -> None:
    a, b = await make_tenant(), await make_tenant()
    member = await add_member(a, "member")
    viewer = await add_member(a, "viewer")
    async with dl.session(member) as db:
        cid = (await db.credentials.create("by member", "basic",
                                           {"username": "u", "password": SECRET})).id
        assert (await db.credentials.decrypt(cid)).payload["password"] == SECRET
    async with dl.session(viewer) as db:
        assert (await db.credentials.list()).items == []
        with pytest.raises(NotFound):
            await db.credentials.decrypt(cid)
    with pytest.raises(DataLayerError):
        async with dl.session(viewer) as db:
            await db.credentials.create("by viewer", "api_key", {"key": "k"})
    with pytest.raises(PermissionDenied):
        async with dl.session(a.owner.with_(read_only=True)) as db:
            await db.credentials.decrypt(cid)
    async with dl.session(b.owner) as db:
        assert await db.credentials.get(cid) is None
        with pytest.raises(NotFound):
            await db.credentials.decrypt(cid)
        assert not await db.credentials.delete(cid)
    async with dl.session(Context(None)) as db:
        with pytest.raises(ValidationError):
            await db.credentials.create("no org", "api_key", {"key": "k"})
