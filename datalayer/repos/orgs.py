"""Organizations, the tenant root (``queries/orgs.sql``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from datalayer.cache import lookups
from datalayer.core.errors import NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import Repository

__all__ = ["Organization", "Organizations"]

PLANS = ("free", "starter", "pro", "enterprise")


@dataclass(frozen=True, slots=True, kw_only=True)
class Organization:
    id: uuid.UUID
    slug: str
    name: str
    plan: str
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


CREATE = RowQuery("orgs.create", Organization)
GET = RowQuery("orgs.get", Organization)
GET_BY_SLUG = RowQuery("orgs.get_by_slug", Organization)
LIST_VISIBLE = RowQuery("orgs.list_visible", Organization)
UPDATE = RowQuery("orgs.update", Organization)


class Organizations(Repository):
    """``db.orgs``. A session reaches only its own organization (RLS)."""

    __slots__ = ()

    async def create(self, *, slug: str, name: str, plan: str = "free",
                     settings: dict[str, Any] | None = None) -> Organization:
        """Create the context's organization (the context's org_id becomes its id; role
        owner). Raises ``Conflict`` for a taken slug, ``PermissionDenied`` for other roles."""
        if plan not in PLANS:
            raise ValidationError(f"plan must be one of {', '.join(PLANS)}")
        org = await self._db.fetch_one(CREATE, slug=slug, name=name, plan=plan,
                                       settings=settings or {})
        assert org is not None  # INSERT … RETURNING returns the row or raises
        return org

    async def get(self, org_id: uuid.UUID) -> Organization | None:
        """The organization, or None when it is not the context's."""
        return await self._db.fetch_one(GET, id=org_id)

    async def get_by_slug(self, slug: str) -> Organization | None:
        return await self._db.fetch_one(GET_BY_SLUG, slug=slug)

    async def list_visible(self) -> list[Organization]:
        return await self._db.fetch_many(LIST_VISIBLE)

    async def update(self, org_id: uuid.UUID, *, name: str | None = None,
                     plan: str | None = None,
                     settings: dict[str, Any] | None = None) -> Organization:
        """Change name, plan or settings (owner/admin). Raises ``NotFound`` when the
        organization is not visible, deleted, or the role may not change it."""
        if plan is not None and plan not in PLANS:
            raise ValidationError(f"plan must be one of {', '.join(PLANS)}")
        org = await self._db.fetch_one(UPDATE, id=org_id, name=name, plan=plan,
                                       settings=settings)
        if org is None:
            raise NotFound("organization not found, deleted, or not writable by this role",
                           query=UPDATE.name)
        return org

    async def soft_delete(self, org_id: uuid.UUID) -> bool:
        """Mark deleted (owner only); False when nothing changed."""
        return await self._changed(org_id, await self._db.execrows("orgs.soft_delete",
                                                                   id=org_id))

    async def restore(self, org_id: uuid.UUID) -> bool:
        return await self._changed(org_id, await self._db.execrows("orgs.restore", id=org_id))

    async def _changed(self, org_id: uuid.UUID, rows: int) -> bool:
        if rows:  # cached API-key verifications of the organization go
            await lookups.invalidate(self._db, lookups.org_tag(org_id))
        return rows == 1
