"""``datalayer.seed``: row counts, tenant visibility of seeded rows, argument checks."""

from __future__ import annotations

import io
import uuid

import pytest

from datalayer import Context, DataLayer, ValidationError
from datalayer.seed import SeedPlan, seed, user_id


async def test_dev_scale_one_seeds_visible_organizations(dl: DataLayer) -> None:
    run_id = uuid.uuid4().hex[:8]
    out = io.StringIO()
    async with dl.system() as db:
        before = await db.scalar("orgs.count_all")

    counts = await seed(dl, profile="dev", scale=1, out=out, run_id=run_id)

    plan = SeedPlan("dev", 1, run_id)
    assert counts == {"orgs": 3, "users": 15, "workflows": 12, "executions": 30,
                                  "digitwin": 72}
    assert len(plan.org_ids) == 3
    assert f"run {run_id}" in out.getvalue()
    async with dl.system() as db:
        assert await db.scalar("orgs.count_all") == before + 3
        for i, org_id in enumerate(plan.org_ids):
            org = await db.orgs.get(org_id)
            assert org is not None
            assert org.slug == plan.slug(i)
            assert org.settings == {"seed": run_id}
    for i, org_id in enumerate(plan.org_ids):
        other = plan.org_ids[(i + 1) % 3]
        async with dl.session(Context(org_id), readonly=True) as db:
            own = await db.orgs.get(org_id)
            assert own is not None and own.id == org_id
            assert await db.orgs.get(other) is None
            assert [o.id for o in await db.orgs.list_visible()] == [org_id]


async def test_seeding_twice_does_not_collide(dl: DataLayer) -> None:
    first = await seed(dl, profile="dev", scale=1, out=io.StringIO())
    second = await seed(dl, profile="dev", scale=1, out=io.StringIO())
    assert first == second == {"orgs": 3, "users": 15, "workflows": 12, "executions": 30,
                                  "digitwin": 72}


@pytest.mark.parametrize(
    ("profile", "scale", "message"),
    [
        ("prod", 1, "profile"),
        ("", 1, "profile"),
        ("dev", 0, "scale"),
        ("dev", -3, "scale"),
        ("bench", 10**9, "scale"),
        ("dev", True, "scale"),
        ("dev", "2", "scale"),
    ],
)
async def test_bad_profile_or_scale(dl: DataLayer, profile: str, scale: int,
                                    message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        await seed(dl, profile=profile, scale=scale, out=io.StringIO())


def test_plan_counts_and_bad_run_id() -> None:
    assert len(SeedPlan("bench", 2, "abc123").org_ids) == 200
    assert SeedPlan("dev", 5, "abc123").rows("orgs") == 15
    assert SeedPlan("dev", 1, "abc").org_ids == SeedPlan("dev", 1, "abc").org_ids
    with pytest.raises(ValidationError, match="run id"):
        SeedPlan("dev", 1, "Not-OK")
    with pytest.raises(ValidationError, match="domain"):
        SeedPlan("dev", 1, "abc").rows("nope")


async def test_seeded_users_are_members_of_their_org_only(dl: DataLayer) -> None:
    await seed(dl, profile="dev", scale=1, out=io.StringIO(), run_id="usr1")
    plan = SeedPlan("dev", 1, "usr1")
    first, second = plan.org_ids[0], plan.org_ids[1]
    async with dl.session(Context(first), readonly=True) as db:
        members = await db.users.list_members()
        assert all(u.id != user_id(plan, 1) for u in members.items)  # user 1 is in org 1
        assert any(u.id == user_id(plan, 0) for u in members.items)
    async with dl.session(Context(second), readonly=True) as db:
        owner = await db.memberships.get(user_id(plan, 1))
    assert owner is not None and owner.role == "owner"
