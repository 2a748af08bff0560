"""Marketplace (``queries/marketplace.sql``, ``schema/0021_marketplace.sql``): listings of
plugins and workflow templates, reviews, the purchase/refund ledger and payouts.

Listings belong to their seller (owners and admins manage them); the catalog, reviewing,
buying and refunding go through SECURITY DEFINER functions that take the actor from the
context and every price from the listing. A review's rating updates the listing's aggregate
in the same transaction (trigger). :func:`marketplace_payout_run` (``dl.system()``) computes
payouts per seller, period and currency idempotently.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from datalayer.core.errors import NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import LAST, Page, Repository, check_limit, page_of

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = ["Listing", "ListingHit", "Marketplace", "Payout", "Purchase", "Review",
           "marketplace_payout_run"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Listing:
    org_id: uuid.UUID
    id: uuid.UUID
    kind: str
    plugin_id: uuid.UUID | None
    workflow_id: uuid.UUID | None
    title: str
    summary: str
    categories: list[str]
    pricing: str
    price: Decimal
    currency: str
    featured: bool
    status: str
    rating_sum: int
    rating_count: int

    @property
    def rating(self) -> float | None:
        return self.rating_sum / self.rating_count if self.rating_count else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ListingHit(Listing):
    rank: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Review:
    listing_id: uuid.UUID
    user_id: uuid.UUID
    rating: int
    body: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Purchase:
    id: uuid.UUID
    listing_id: uuid.UUID
    seller_org_id: uuid.UUID
    kind: str
    amount: Decimal
    currency: str
    refund_of: uuid.UUID | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Payout:
    org_id: uuid.UUID
    id: uuid.UUID
    period_start: date
    period_end: date
    currency: str
    gross: Decimal
    refunds: Decimal
    platform_share: Decimal
    platform_fee: Decimal
    net: Decimal
    created_at: datetime


CREATE_LISTING = RowQuery("marketplace.create_listing", Listing)
UPDATE_LISTING = RowQuery("marketplace.update_listing", Listing)
SEARCH = RowQuery("marketplace.search", ListingHit)
REVIEW = RowQuery("marketplace.review", Review)
REVIEWS = RowQuery("marketplace.reviews", Review)
BUY = RowQuery("marketplace.buy", Purchase)
REFUND = RowQuery("marketplace.refund", Purchase)
LEDGER = RowQuery("marketplace.ledger", Purchase)
PAYOUTS = RowQuery("marketplace.payouts", Payout)


def _money(price: Decimal | str | int, currency: str) -> Decimal:
    try:
        p = Decimal(str(price))
        ok = p.is_finite() and p >= 0 and p == p.quantize(Decimal("0.01"))
    except ArithmeticError:  # not a number at all (decimal.InvalidOperation)
        ok = False
    if not ok:
        raise ValidationError("price must be a non-negative amount with at most 2 decimals")
    if len(currency) != 3 or not currency.isalpha() or not currency.isupper():
        raise ValidationError("currency must be an ISO 4217 code like USD")
    return p


class Marketplace(Repository):
    """``db.marketplace``: see the module docstring."""

    __slots__ = ()

    async def create_listing(self, title: str, *, plugin_id: uuid.UUID | None = None,
                             workflow_id: uuid.UUID | None = None, summary: str = "",
                             categories: Sequence[str] = (),
                             price: Decimal | str | int = 0, currency: str = "USD",
                             status: str = "listed") -> Listing:
        """A listing of an own plugin or workflow template (exactly one); free when
        ``price`` is 0."""
        if (plugin_id is None) == (workflow_id is None):
            raise ValidationError("a listing is of exactly one plugin or workflow template")
        p = _money(price, currency)
        row = await self._db.fetch_one(
            CREATE_LISTING, id=uuid.uuid4(),
            kind="plugin" if plugin_id is not None else "workflow_template",
            plugin_id=plugin_id, workflow_id=workflow_id, title=title, summary=summary,
            categories=list(categories), pricing="paid" if p > 0 else "free", price=p,
            currency=currency, status=status)
        assert row is not None
        return row

    async def update_listing(self, listing_id: uuid.UUID, *, title: str | None = None,
                             summary: str | None = None,
                             categories: Sequence[str] | None = None,
                             price: Decimal | str | int | None = None,
                             currency: str | None = None,
                             status: str | None = None) -> Listing:
        p = None if price is None else _money(price, currency or "USD")
        row = await self._db.fetch_one(
            UPDATE_LISTING, id=listing_id, title=title, summary=summary,
            categories=None if categories is None else list(categories),
            pricing=None if p is None else ("paid" if p > 0 else "free"), price=p,
            currency=currency, status=status)
        if row is None:
            raise NotFound("listing not found or not writable by this role",
                           query=UPDATE_LISTING.name)
        return row

    async def search(self, query: str | None = None, *, kind: str | None = None,
                     category: str | None = None, featured: bool | None = None,
                     after: tuple[float, uuid.UUID] | None = None,
                     limit: int = 20) -> Page[ListingHit]:
        check_limit(limit, 100)
        rank, after_id = after if after is not None else (0.0, None)
        rows = await self._db.fetch_many(SEARCH, query=query, kind=kind, category=category,
                                         featured=featured, after_rank=rank,
                                         after_id=after_id, limit=limit)
        return page_of(rows, limit, lambda h: (h.rank, h.id))

    async def review(self, listing_id: uuid.UUID, rating: int, body: str = "") -> Review:
        """Write or edit the context user's review (one per user and listing)."""
        if not 1 <= rating <= 5:
            raise ValidationError("rating must be between 1 and 5")
        row = await self._db.fetch_one(REVIEW, listing_id=listing_id, rating=rating, body=body)
        if row is None:
            raise NotFound("listing not found", query=REVIEW.name)
        return row

    async def reviews(self, listing_id: uuid.UUID, *,
                      before: tuple[datetime, uuid.UUID] | None = None,
                      limit: int = 20) -> Page[Review]:
        b = before or LAST
        rows = await self._db.fetch_many(REVIEWS, listing_id=listing_id,
                                         before_updated_at=b[0], before_user_id=b[1],
                                         limit=check_limit(limit))
        return page_of(rows, limit, lambda r: (r.updated_at, r.user_id))

    async def buy(self, listing_id: uuid.UUID) -> Purchase:
        """Buy a listed paid listing at its price (owners, admins)."""
        row = await self._db.fetch_one(BUY, listing_id=listing_id)
        if row is None:
            raise NotFound("listing not found, not listed or not for sale", query=BUY.name)
        return row

    async def refund(self, purchase_id: uuid.UUID) -> Purchase:
        """Refund an own purchase in full, once (``NotFound`` if not refundable)."""
        row = await self._db.fetch_one(REFUND, purchase_id=purchase_id)
        if row is None:
            raise NotFound("purchase not found", query=REFUND.name)
        return row

    async def ledger(self, *, limit: int = 100) -> builtins.list[Purchase]:
        return await self._db.fetch_many(LEDGER, limit=check_limit(limit))

    async def payouts(self) -> builtins.list[Payout]:
        return await self._db.fetch_many(PAYOUTS)


async def marketplace_payout_run(dl: DataLayer, period_start: date, period_end: date, *,
                                 platform_share: Decimal = Decimal("0.30")) -> dict[str, int]:
    """Payouts of every seller for [period_start, period_end); running twice pays once."""
    if not Decimal(0) <= platform_share <= Decimal(1):
        raise ValidationError("platform_share must be between 0 and 1")
    async with dl.system() as db:
        n: int = await db.scalar("marketplace.payout_run", period_start=period_start,
                                 period_end=period_end, platform_share=platform_share)
    return {"payouts": n}
