"""Memberships: who belongs to an organization, with which role (``queries/memberships.sql``)."""

from __future__ import annotations

import builtins
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from datalayer.cache import lookups
from datalayer.core.context import ROLES
from datalayer.core.errors import NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import FIRST, Page, Repository, check_limit, page_of

__all__ = ["Membership", "Memberships"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Membership:
    org_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    invited_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


ADD = RowQuery("memberships.add", Membership)
GET = RowQuery("memberships.get", Membership)
LIST = RowQuery("memberships.list", Membership)
FOR_USER = RowQuery("memberships.for_user", Membership)
SET_ROLE = RowQuery("memberships.set_role", Membership)




def _role(role: str) -> str:
    if role not in ROLES:
        raise ValidationError(f"role must be one of {', '.join(ROLES)}")
    return role


class Memberships(Repository):
    """``db.memberships``. A context adds only its own membership (the founder of a new
    organization); others join by invitation (``db.auth.invite`` / ``consume_token``).
    Admins change and remove members; only owners touch owners; an organization always
    keeps one owner."""

    __slots__ = ()

    async def add(self, user_id: uuid.UUID, role: str = "member") -> Membership:
        """The context user's own membership (``user_id`` must be the context's): how the
        founder of an organization becomes its owner. ``PermissionDenied`` otherwise."""
        m = await self._db.fetch_one(ADD, user_id=user_id, role=_role(role))
        assert m is not None
        await self._changed(user_id)
        await self._db.audit.record("membership.added", subject_user_id=user_id,
                                    resource_type="membership", resource_id=user_id,
                                    details={"role": m.role})
        return m

    async def get(self, user_id: uuid.UUID) -> Membership | None:
        return await self._db.fetch_one(GET, user_id=user_id)

    async def list(self, *, after: tuple[Any, ...] | None = None,
                   limit: int = 100) -> Page[Membership]:
        a = after or FIRST
        rows = await self._db.fetch_many(LIST, after_created_at=a[0], after_user_id=a[1],
                                         limit=check_limit(limit))
        return page_of(rows, limit, lambda m: (m.created_at, m.user_id))

    async def for_user(self) -> builtins.list[Membership]:
        """The context user's memberships in every organization."""
        return await self._db.fetch_many(FOR_USER)

    async def set_role(self, user_id: uuid.UUID, role: str) -> Membership:
        m = await self._db.fetch_one(SET_ROLE, user_id=user_id, role=_role(role))
        if m is None:
            raise NotFound("membership not found or not changeable by this role",
                           query=SET_ROLE.name)
        await self._changed(user_id)
        await self._db.audit.record("membership.role_changed", subject_user_id=user_id,
                                    resource_type="membership", resource_id=user_id,
                                    details={"role": m.role})
        return m

    async def remove(self, user_id: uuid.UUID) -> bool:
        removed = await self._db.execrows("memberships.remove", user_id=user_id) == 1
        if removed:
            await self._changed(user_id)
            await self._db.audit.record("membership.removed", subject_user_id=user_id,
                                        resource_type="membership", resource_id=user_id)
        return removed

    async def _changed(self, user_id: uuid.UUID) -> None:
        """Cached lookups that depend on this membership (who sees the user, the role an
        API key acts with) are dropped once this commits."""
        ctx = self._db.context
        if ctx is not None and ctx.org_id is not None:
            await lookups.invalidate(self._db, lookups.member_tag(ctx.org_id, user_id))
