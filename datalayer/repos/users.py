"""Users: global accounts (``queries/users.sql``). Secrets never reach this module's rows."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from datalayer.cache import lookups
from datalayer.core.errors import NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import FIRST, Page, Repository, check_limit, page_of

__all__ = ["TIERS", "User", "Users"]

TIERS = ("free", "pro", "enterprise")


@dataclass(frozen=True, slots=True, kw_only=True)
class User:
    id: uuid.UUID
    email: str
    display_name: str
    first_name: str | None
    last_name: str | None
    preferences: dict[str, Any]
    subscription_tier: str
    status: str
    email_verified_at: datetime | None
    failed_logins: int
    locked_until: datetime | None
    last_login_at: datetime | None
    totp_enabled_at: datetime | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


CREATE = RowQuery("users.create", User)
GET = RowQuery("users.get", User)
GET_BY_EMAIL = RowQuery("users.get_by_email", User)
LIST_MEMBERS = RowQuery("users.list_members", User)
UPDATE_PROFILE = RowQuery("users.update_profile", User)


def _tier(tier: str | None) -> None:
    if tier is not None and tier not in TIERS:
        raise ValidationError(f"subscription_tier must be one of {', '.join(TIERS)}")


class Users(Repository):
    """``db.users``: the context's own account and the members of its organization."""

    __slots__ = ()

    async def create(self, *, email: str, password_hash: str | None = None,
                     display_name: str = "", first_name: str | None = None,
                     last_name: str | None = None, preferences: dict[str, Any] | None = None,
                     subscription_tier: str = "free") -> User:
        """Insert the context user's account (its id is the context's user_id). Prefer
        ``db.auth.register``, which hashes the password. ``Conflict`` for a taken email."""
        _tier(subscription_tier)
        user = await self._db.fetch_one(
            CREATE, email=email, display_name=display_name, first_name=first_name,
            last_name=last_name, preferences=preferences or {},
            subscription_tier=subscription_tier, password_hash=password_hash)
        assert user is not None
        return user

    async def get(self, user_id: uuid.UUID) -> User | None:
        """A live user visible to the context. Read-only sessions read through the cache
        (``datalayer.cache.lookups``: keyed by what RLS decides on)."""
        db = self._db
        cached = lookups.user_key(db, user_id)
        if cached is None:
            return await db.fetch_one(GET, id=user_id)
        return await lookups.read_through(db, lookups.USERS, User, cached[0],
                                          lambda: db.fetch_one(GET, id=user_id),
                                          tags=cached[1])

    async def get_by_email(self, email: str) -> User | None:
        """A live user by email, case-insensitive; None unless visible to the context."""
        return await self._db.fetch_one(GET_BY_EMAIL, email=email)

    async def list_members(self, *, after: tuple[Any, ...] | None = None,
                           limit: int = 100) -> Page[User]:
        """Live users of the context organization, oldest first; keyset-paginated."""
        a = after or FIRST
        rows = await self._db.fetch_many(LIST_MEMBERS, after_created_at=a[0], after_id=a[1],
                                         limit=check_limit(limit))
        return page_of(rows, limit, lambda u: (u.created_at, u.id))

    async def update_profile(self, user_id: uuid.UUID, *, display_name: str | None = None,
                             first_name: str | None = None, last_name: str | None = None,
                             preferences: dict[str, Any] | None = None,
                             subscription_tier: str | None = None) -> User:
        """Change the context user's own profile. ``NotFound`` for anyone else."""
        _tier(subscription_tier)
        user = await self._db.fetch_one(
            UPDATE_PROFILE, id=user_id, display_name=display_name, first_name=first_name,
            last_name=last_name, preferences=preferences, subscription_tier=subscription_tier)
        if user is None:
            raise NotFound("user not found, deleted, or not the context's own account",
                           query=UPDATE_PROFILE.name)
        await lookups.invalidate(self._db, lookups.user_tag(user_id))
        return user

    async def soft_delete(self, user_id: uuid.UUID) -> bool:
        return await self._changed(user_id, await self._db.execrows("users.soft_delete",
                                                                    id=user_id))

    async def restore(self, user_id: uuid.UUID) -> bool:
        """Undo a soft delete; ``Conflict`` if a live account took the email meanwhile."""
        return await self._changed(user_id, await self._db.execrows("users.restore",
                                                                    id=user_id))

    async def hard_delete(self, user_id: uuid.UUID) -> bool:
        """Delete the account and (by cascade) its memberships, keys and tokens."""
        return await self._changed(user_id, await self._db.execrows("users.hard_delete",
                                                                    id=user_id))

    async def _changed(self, user_id: uuid.UUID, rows: int) -> bool:
        if rows:
            await lookups.invalidate(self._db, lookups.user_tag(user_id))
        return rows == 1
