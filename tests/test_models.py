"""DigiTwin profile and personal models: storage references, status transitions, exactly one
active model per user and kind under concurrent activations, tier limits under concurrent
creations, soft delete / restore / hard delete, and privacy inside the organization."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from datalayer import (
    Context,
    DataLayer,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    ValidationError,
)
from datalayer.repos.models import Model
from tests.conftest import MemberFactory, Tenant, TenantFactory


@pytest.fixture
async def tenant(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant("Twin")


async def tiered(dl: DataLayer, ctx: Context, tier: str) -> Context:
    async with dl.system() as db:  # billing sets the tier, not the user
        assert ctx.user_id is not None
        await db.users.update_profile(ctx.user_id, subscription_tier=tier)
    return ctx


async def ready_model(dl: DataLayer, ctx: Context, kind: str = "voice", tag: str = "") -> Model:
    async with dl.session(ctx) as db:
        m = await db.models.create(kind, provider="elevenlabs", name=f"{kind} {tag}",
                                   storage_uri=f"s3://models/{uuid.uuid4().hex}.bin",
                                   training_params={"epochs": 10})
        await db.models.set_status(m.id, "training")
        return await db.models.set_status(m.id, "ready", quality_metrics={"mos": 4.2})


async def test_profile_traits_and_preferences(dl: DataLayer, tenant: Tenant) -> None:
    async with dl.session(tenant.owner) as db:
        p = await db.models.profile()
        assert p is not None and p.personality_traits == [] and p.subscription_tier == "free"
        p = await db.models.set_profile(personality_traits=["curious", "warm"],
                                        conversation_preferences={"tone": "casual"})
        assert p.personality_traits == ["curious", "warm"]
        p = await db.models.set_profile(conversation_preferences={"tone": "formal"})
        assert p.personality_traits == ["curious", "warm"]
        assert p.conversation_preferences == {"tone": "formal"}
        with pytest.raises(ValidationError):
            await db.models.set_profile(personality_traits=[""])
        u = await db.models.usage()
    assert u is not None and (u.tier, u.max_models, u.max_documents, u.max_monthly_turns) == (
        "free", 2, 10, 500)


async def test_storage_reference_is_a_uri_never_a_blob(dl: DataLayer, tenant: Tenant) -> None:
    async with dl.session(tenant.owner) as db:
        with pytest.raises(ValidationError, match="URI"):
            await db.models.create("voice", provider="x", storage_uri="AAAA" * 100)
        with pytest.raises(ValidationError, match="kind"):
            await db.models.create("smell", provider="x", storage_uri="s3://a/b")
    with pytest.raises(asyncpg.CheckViolationError):  # for callers that skip the repository
        async with dl.session(tenant.owner) as db:
            await db.connection.execute(
                "INSERT INTO twin_models (org_id, user_id, kind, provider, storage_uri) "
                "VALUES (app.org_id(), app.user_id(), 'voice', 'x', 'raw bytes here')")


async def test_status_transitions_stamp_times_and_refuse_illegal_moves(
    dl: DataLayer, tenant: Tenant,
) -> None:
    async with dl.session(tenant.owner) as db:
        m = await db.models.create("face", provider="heygen", storage_uri="gs://b/face.onnx")
        assert m.status == "uploading" and m.training_started_at is None
        with pytest.raises(NotFound):  # not ready: cannot be active
            await db.models.activate(m.id)
        m = await db.models.set_status(m.id, "training")
        assert m.training_started_at is not None
        m = await db.models.set_status(m.id, "failed", error="diverged")
        assert m.error == "diverged"
        m = await db.models.set_status(m.id, "training")
        assert m.error is None
        m = await db.models.set_status(m.id, "ready", quality_metrics={"psnr": 31.5})
        assert m.ready_at is not None and m.quality_metrics == {"psnr": 31.5}
    with pytest.raises(ValidationError, match="illegal model status transition"):
        async with dl.session(tenant.owner) as db:
            await db.models.set_status(m.id, "uploading")
    async with dl.session(tenant.owner) as db:
        await db.models.activate(m.id)
    with pytest.raises(ValidationError):  # an active model must be deactivated to retrain
        async with dl.session(tenant.owner) as db:
            await db.models.set_status(m.id, "training")


async def test_activate_switches_the_active_model_of_its_kind(
    dl: DataLayer, tenant: Tenant,
) -> None:
    v1 = await ready_model(dl, tenant.owner, "voice", "1")
    f1 = await ready_model(dl, tenant.owner, "face", "1")
    async with dl.session(tenant.owner) as db:
        assert (await db.models.activate(v1.id)).is_active
        assert (await db.models.activate(f1.id)).activated_at is not None
        await db.models.delete(f1.id)
        assert await db.models.active("face") is None  # deleting deactivates
        v2 = await db.models.create("voice", provider="x", storage_uri="s3://m/v2")
    v2 = await ready_model(dl, await tiered(dl, tenant.owner, "pro"), "voice", "2")
    async with dl.session(tenant.owner) as db:
        await db.models.activate(v2.id)
        active = await db.models.active("voice")
        assert active is not None and active.id == v2.id
        old = await db.models.get(v1.id)
        assert old is not None and not old.is_active
        assert await db.models.deactivate(v2.id) is not None
        assert await db.models.active("voice") is None


async def test_concurrent_activations_leave_exactly_one_active(
    dl: DataLayer, tenant: Tenant, admin_conn: asyncpg.Connection,
) -> None:
    """Many rounds of concurrent activations of different models on separate sessions:
    afterwards exactly one is active, and no unique violation escapes."""
    owner = await tiered(dl, tenant.owner, "pro")
    models = [await ready_model(dl, owner, "voice", str(i)) for i in range(4)]

    async def activate(m: Model) -> None:
        async with dl.session(owner) as db:
            await db.models.activate(m.id)

    for _ in range(12):
        await asyncio.gather(*(activate(m) for m in models), activate(models[0]))
        n = await admin_conn.fetchval(
            "SELECT count(*) FROM twin_models WHERE org_id = $1 AND user_id = $2 "
            "AND kind = 'voice' AND is_active", tenant.org_id, tenant.owner_id)
        assert n == 1


async def test_model_limit_holds_under_concurrent_creations(
    dl: DataLayer, tenant: Tenant, add_member: MemberFactory,
) -> None:
    """A free user may hold 2 live models: of 6 concurrent creations exactly 2 succeed; the
    others fail with LimitExceeded naming the limit. Restoring past it fails too."""
    me = await add_member(tenant, "member")

    async def create(i: int) -> Model | BaseException:
        try:
            async with dl.session(me) as db:
                return await db.models.create("voice", provider="p",
                                              storage_uri=f"s3://m/{i}")
        except LimitExceeded as exc:
            return exc

    out = await asyncio.gather(*(create(i) for i in range(6)))
    made = [m for m in out if isinstance(m, Model)]
    refused = [e for e in out if isinstance(e, LimitExceeded)]
    assert len(made) == 2 and len(refused) == 4
    assert refused[0].constraint == "twin_limit_models"
    assert "models limit reached: the free tier allows 2 models" in str(refused[0])
    async with dl.session(me) as db:
        await db.models.delete(made[0].id)
        third = await db.models.create("face", provider="p", storage_uri="s3://m/face")
    with pytest.raises(LimitExceeded):
        async with dl.session(me) as db:
            await db.models.restore(made[0].id)
    async with dl.session(me) as db:
        assert await db.models.hard_delete(third.id)
        assert (await db.models.restore(made[0].id)).deleted_at is None
        assert await db.models.get(third.id) is None
        usage = await db.models.usage()
    assert usage is not None and usage.models == 2


async def test_models_are_private_to_their_user(
    dl: DataLayer, tenant: Tenant, add_member: MemberFactory, make_tenant: TenantFactory,
) -> None:
    """Another member of the organization, an admin, another tenant and no context neither
    see nor change the user's models."""
    me = await add_member(tenant, "member")
    mine = await ready_model(dl, me)
    other = await add_member(tenant, "member")
    admin = await add_member(tenant, "admin")
    stranger = await make_tenant("Elsewhere")
    for ctx in (other, admin, tenant.owner, stranger.owner, Context(None),
                Context(tenant.org_id, role="owner")):
        async with dl.session(ctx) as db:
            assert await db.models.get(mine.id) is None
            assert await db.models.list() == []
            assert await db.models.deactivate(mine.id) is None
        with pytest.raises(NotFound):
            async with dl.session(ctx) as db:
                await db.models.activate(mine.id)
        with pytest.raises(NotFound):
            async with dl.session(ctx) as db:
                await db.models.delete(mine.id)
        async with dl.session(ctx) as db:
            assert not await db.models.hard_delete(mine.id)
    # A viewer of the organization cannot create a twin model at all.
    viewer = await add_member(tenant, "viewer")
    with pytest.raises(PermissionDenied):
        async with dl.session(viewer) as db:
            await db.models.create("voice", provider="p", storage_uri="s3://v/1")
    async with dl.session(me) as db:
        m = await db.models.get(mine.id)
    assert m is not None and m.deleted_at is None


async def test_a_user_cannot_raise_their_own_tier(dl: DataLayer, tenant: Tenant) -> None:
    """Limits come from the tier, so the tier is billing's (dl.system()) to change: a user
    who updates their own profile, or signs up, with a higher tier is refused."""
    ctx = tenant.owner
    assert ctx.user_id is not None
    with pytest.raises(PermissionDenied, match="subscription tier is set by billing"):
        async with dl.session(ctx) as db:
            await db.users.update_profile(ctx.user_id, subscription_tier="enterprise")
    signup = uuid.uuid4()
    with pytest.raises(PermissionDenied, match="subscription tier is set by billing"):
        async with dl.session(Context(None, user_id=signup)) as db:
            await db.users.create(email=f"{signup.hex}@example.test", display_name="S",
                                  subscription_tier="pro")
    async with dl.session(ctx) as db:  # the rest of the profile stays the user's
        me = await db.users.update_profile(ctx.user_id, display_name="Still mine")
    assert (me.display_name, me.subscription_tier) == ("Still mine", "free")
    await tiered(dl, ctx, "pro")
    async with dl.session(ctx, readonly=True) as db:
        got = await db.users.get(ctx.user_id)
    assert got is not None and got.subscription_tier == "pro"
