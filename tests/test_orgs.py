"""Organizations: the tenant root, under RLS."""

from __future__ import annotations

import uuid

import pytest

from datalayer import Context, DataLayer, NotFound, PermissionDenied, ValidationError
from tests.conftest import TenantFactory


async def test_create_uses_the_context_org_id_and_defaults(dl: DataLayer) -> None:
    org_id = uuid.uuid4()
    async with dl.session(Context(org_id, role="owner")) as db:
        org = await db.orgs.create(slug=f"o-{org_id.hex[:10]}", name="Org",
                                   settings={"theme": "dark"})
    assert (org.id, org.plan, org.settings, org.deleted_at) == (
        org_id, "free", {"theme": "dark"}, None)
    assert org.created_at == org.updated_at


@pytest.mark.parametrize("role", ["admin", "member", "viewer", "guest"])
async def test_only_an_owner_context_creates_its_organization(dl: DataLayer, role: str) -> None:
    org_id = uuid.uuid4()
    with pytest.raises(PermissionDenied):
        async with dl.session(Context(org_id, role=role)) as db:  # type: ignore[arg-type]
            await db.orgs.create(slug=f"r-{org_id.hex[:10]}", name="Nope")


async def test_another_tenant_cannot_read_update_or_delete(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    a, b = await make_tenant("A"), await make_tenant("B")
    async with dl.session(a.owner) as db:
        assert await db.orgs.get(b.org_id) is None
        assert await db.orgs.get_by_slug(b.slug) is None
        with pytest.raises(NotFound):
            await db.orgs.update(b.org_id, name="Hijacked")
        assert await db.orgs.soft_delete(b.org_id) is False
    async with dl.session(b.owner, readonly=True) as db:
        org = await db.orgs.get(b.org_id)
    assert org is not None and (org.name, org.deleted_at) == ("B", None)


async def test_update_by_role(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant("Roles")
    for role in ("viewer", "guest", "member"):
        with pytest.raises(NotFound):
            async with dl.session(t.ctx(role)) as db:
                await db.orgs.update(t.org_id, name=f"by {role}")
    async with dl.session(t.ctx("admin")) as db:
        org = await db.orgs.update(t.org_id, name="By admin", plan="pro")
    assert (org.name, org.plan) == ("By admin", "pro")
    assert org.updated_at > org.created_at  # the touch trigger ran


async def test_soft_delete_and_restore_owner_only(dl: DataLayer,
                                                  make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    with pytest.raises(PermissionDenied, match="only an owner may delete or restore"):
        async with dl.session(t.ctx("admin")) as db:
            await db.orgs.soft_delete(t.org_id)
    async with dl.session(t.owner) as db:
        assert await db.orgs.soft_delete(t.org_id) is True
        assert await db.orgs.get_by_slug(t.slug) is None
        gone = await db.orgs.get(t.org_id)
        assert gone is not None and gone.deleted_at is not None
        assert await db.orgs.restore(t.org_id) is True
        assert await db.orgs.get_by_slug(t.slug) is not None


async def test_bad_input_is_refused_with_clear_errors(dl: DataLayer,
                                                      make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    with pytest.raises(ValidationError, match="plan must be one of"):
        async with dl.session(t.owner) as db:
            await db.orgs.update(t.org_id, plan="platinum")
    with pytest.raises(ValidationError, match="organizations_settings_object"):
        async with dl.session(Context(uuid.uuid4(), role="owner")) as db:
            await db.run("orgs.create", slug=f"s-{uuid.uuid4().hex[:8]}", name="x",
                         plan="free", settings=[1, 2])
    with pytest.raises(ValidationError, match="organizations_name_length"):
        async with dl.session(t.owner) as db:
            await db.orgs.update(t.org_id, name="x" * 201)


async def test_system_session_sees_every_tenant(dl: DataLayer,
                                                make_tenant: TenantFactory) -> None:
    a, b = await make_tenant(), await make_tenant()
    async with dl.system() as db:
        assert await db.orgs.get(a.org_id) is not None
        assert await db.orgs.get(b.org_id) is not None
        assert await db.connection.fetchval("SELECT current_user") == "datalayer_maint"
