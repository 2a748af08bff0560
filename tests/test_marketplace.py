"""Marketplace: listings (plugins and workflow templates, prices as exact decimals), search
across organizations, reviews (one per user, editable, the aggregate exact under concurrent
reviewers), the purchase/refund ledger, and idempotent payouts with the platform's share."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from datalayer import Conflict, Context, DataLayer, NotFound, PermissionDenied, ValidationError
from datalayer.repos.marketplace import marketplace_payout_run
from tests.conftest import MemberFactory, Tenant, TenantFactory


@pytest.fixture
async def seller(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant("Seller")


@pytest.fixture
async def buyer(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant("Buyer")


async def _plugin_listing(dl: DataLayer, seller: Tenant, word: str, price: str = "0",
                          status: str = "listed") -> uuid.UUID:
    async with dl.session(seller.owner) as db:
        p = await db.plugins.create(f"{word}-{uuid.uuid4().hex[:6]}")
        listing = await db.marketplace.create_listing(
            f"{word} connector", plugin_id=p.id, summary=f"syncs {word} data",
            categories=["data"], price=price, status=status)
    return listing.id


async def test_listings_are_searchable_across_organizations_when_listed(
    dl: DataLayer, seller: Tenant, buyer: Tenant,
) -> None:
    word = "m" + uuid.uuid4().hex[:8]
    listed = await _plugin_listing(dl, seller, word, "19.99")
    draft = await _plugin_listing(dl, seller, word, status="draft")
    async with dl.session(seller.owner) as db:
        wf = await db.workflows.create(f"{word} template", is_template=True,
                                       nodes=[{"id": "a", "type": "http"}])
        tpl = await db.marketplace.create_listing(f"{word} onboarding template",
                                                  workflow_id=wf.id)
        assert (tpl.kind, tpl.pricing, tpl.price) == ("workflow_template", "free", Decimal(0))
    async with dl.session(buyer.owner, readonly=True) as db:
        hits = (await db.marketplace.search(word)).items
        assert {h.id for h in hits} == {listed, tpl.id}
        paid = next(h for h in hits if h.id == listed)
        assert (paid.pricing, paid.price, paid.currency) == ("paid", Decimal("19.99"), "USD")
        assert [h.id for h in (await db.marketplace.search(word, kind="workflow_template"))
                .items] == [tpl.id]
    async with dl.session(seller.owner, readonly=True) as db:  # its own drafts too
        assert draft in {h.id for h in (await db.marketplace.search(word)).items}
    for bad in ("-1", "1.999", "abc", "NaN", "Infinity"):
        with pytest.raises(ValidationError, match="price"):
            async with dl.session(seller.owner) as db:
                await db.marketplace.create_listing("x", plugin_id=uuid.uuid4(), price=bad)


async def test_only_the_platform_features_a_listing(
    dl: DataLayer, seller: Tenant, buyer: Tenant,
) -> None:
    listing = await _plugin_listing(dl, seller, "feat")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with dl.session(seller.owner) as db:
            await db.connection.execute(
                "UPDATE marketplace_listings SET featured = true WHERE id = $1", listing)
    async with dl.system() as db:
        assert await db.execrows("marketplace.set_featured", id=listing, featured=True) == 1
    async with dl.session(buyer.owner, readonly=True) as db:
        hits = (await db.marketplace.search(featured=True, limit=100)).items
        assert listing in {h.id for h in hits}


async def test_one_review_per_user_editable_and_the_aggregate_stays_exact(
    dl: DataLayer, seller: Tenant, buyer: Tenant, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    listing = await _plugin_listing(dl, seller, "rate")
    members = [await add_member(buyer, "member") for _ in range(8)]

    async def review(ctx: Context, rating: int) -> None:
        async with dl.session(ctx) as db:
            await db.marketplace.review(listing, rating, f"rating {rating}")

    await asyncio.gather(*(review(m, 1 + i % 5) for i, m in enumerate(members)))
    await asyncio.gather(*(review(m, 5) for m in members[:4]))  # edits, concurrently
    row = await admin_conn.fetchrow(
        "SELECT rating_sum, rating_count, (SELECT sum(rating) FROM marketplace_reviews r "
        "WHERE r.listing_id = l.id) AS real_sum FROM marketplace_listings l WHERE id = $1",
        listing)
    assert row is not None
    assert row["rating_count"] == 8
    assert row["rating_sum"] == row["real_sum"] == 4 * 5 + (5 + 1 + 2 + 3)
    async with dl.session(buyer.owner, readonly=True) as db:
        page = await db.marketplace.reviews(listing, limit=5)
        assert len(page.items) == 5 and page.next is not None
        rest = await db.marketplace.reviews(listing, before=page.next, limit=5)
        assert len({r.user_id for r in page.items + rest.items}) == 8
    with pytest.raises(PermissionDenied):
        async with dl.session(buyer.ctx("guest", user_id=uuid.uuid4())) as db:
            await db.marketplace.review(listing, 5)
    with pytest.raises(NotFound):
        async with dl.session(buyer.owner) as db:
            await db.marketplace.review(uuid.uuid4(), 3)


async def test_purchases_refunds_and_payouts_are_idempotent(
    dl: DataLayer, seller: Tenant, buyer: Tenant, make_tenant: TenantFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    listing = await _plugin_listing(dl, seller, "sale", "10.00")
    other_buyer = await make_tenant("Second buyer")
    async with dl.session(buyer.owner) as db:
        first = await db.marketplace.buy(listing)
        second = await db.marketplace.buy(listing)
        assert first.amount == Decimal("10.00") and first.seller_org_id == seller.org_id
        refund = await db.marketplace.refund(second.id)
        assert (refund.kind, refund.amount, refund.refund_of) == ("refund", Decimal("10.00"),
                                                                   second.id)
    async with dl.session(other_buyer.owner) as db:
        await db.marketplace.buy(listing)
    with pytest.raises(Conflict):
        async with dl.session(buyer.owner) as db:
            await db.marketplace.refund(second.id)
    with pytest.raises(PermissionDenied):
        async with dl.session(buyer.ctx("member", user_id=uuid.uuid4())) as db:
            await db.marketplace.buy(listing)
    async with dl.session(buyer.owner, readonly=True) as db:
        assert [p.kind for p in await db.marketplace.ledger()].count("purchase") == 2
    today = datetime.now(UTC).date()
    start, end = today - timedelta(days=1), today + timedelta(days=1)
    await marketplace_payout_run(dl, start, end, platform_share=Decimal("0.30"))
    again = await marketplace_payout_run(dl, start, end, platform_share=Decimal("0.30"))
    assert again == {"payouts": 0}
    async with dl.session(seller.owner, readonly=True) as db:
        payouts = await db.marketplace.payouts()
    assert len(payouts) == 1
    p = payouts[0]
    assert (p.gross, p.refunds, p.platform_fee, p.net) == (
        Decimal("30.00"), Decimal("10.00"), Decimal("6.00"), Decimal("14.00"))
    assert await admin_conn.fetchval(
        "SELECT count(*) FROM marketplace_payouts WHERE org_id = $1", seller.org_id) == 1
    async with dl.session(buyer.owner, readonly=True) as db:  # not the buyer's to see
        assert await db.marketplace.payouts() == []
