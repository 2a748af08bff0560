"""Teams and team members inside one organization (``queries/teams.sql``)."""

from __future__ import annotations

import builtins
import uuid
from dataclasses import dataclass
from datetime import datetime

from datalayer.core.errors import NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import Page, Repository, check_limit, page_of

__all__ = ["Team", "TeamMember", "Teams"]

TEAM_ROLES = ("lead", "member")


@dataclass(frozen=True, slots=True, kw_only=True)
class Team:
    org_id: uuid.UUID
    id: uuid.UUID
    name: str
    description: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class TeamMember:
    org_id: uuid.UUID
    team_id: uuid.UUID
    user_id: uuid.UUID
    team_role: str
    created_at: datetime


CREATE = RowQuery("teams.create", Team)
GET = RowQuery("teams.get", Team)
LIST = RowQuery("teams.list", Team)
RENAME = RowQuery("teams.rename", Team)
OF_USER = RowQuery("teams.of_user", Team)
ADD_MEMBER = RowQuery("teams.add_member", TeamMember)
MEMBERS = RowQuery("teams.members", TeamMember)


class Teams(Repository):
    """``db.teams``: everyone in the organization reads; admins write."""

    __slots__ = ()

    async def create(self, name: str, description: str = "") -> Team:
        """``Conflict`` when the organization has a team of that name (case-insensitive)."""
        team = await self._db.fetch_one(CREATE, name=name, description=description)
        assert team is not None
        return team

    async def get(self, team_id: uuid.UUID) -> Team | None:
        return await self._db.fetch_one(GET, id=team_id)

    async def list(self, *, after: tuple[str, uuid.UUID] | None = None,
                   limit: int = 100) -> Page[Team]:
        """Teams by name (case-insensitive), keyset-paginated."""
        name, tid = after or ("", uuid.UUID(int=0))
        rows = await self._db.fetch_many(LIST, after_name=name, after_id=tid,
                                         limit=check_limit(limit))
        return page_of(rows, limit, lambda t: (t.name, t.id))

    async def rename(self, team_id: uuid.UUID, *, name: str | None = None,
                     description: str | None = None) -> Team:
        team = await self._db.fetch_one(RENAME, id=team_id, name=name, description=description)
        if team is None:
            raise NotFound("team not found or not writable by this role", query=RENAME.name)
        return team

    async def delete(self, team_id: uuid.UUID) -> bool:
        deleted = await self._db.execrows("teams.delete", id=team_id) == 1
        if deleted:
            await self._db.audit.record("team.deleted", resource_type="team",
                                        resource_id=team_id)
        return deleted

    async def add_member(self, team_id: uuid.UUID, user_id: uuid.UUID,
                         team_role: str = "member") -> TeamMember:
        """Add (or change the team role of) an organization member. ``ValidationError`` when
        the team or the membership does not exist in this organization."""
        if team_role not in TEAM_ROLES:
            raise ValidationError(f"team_role must be one of {', '.join(TEAM_ROLES)}")
        member = await self._db.fetch_one(ADD_MEMBER, team_id=team_id, user_id=user_id,
                                          team_role=team_role)
        assert member is not None
        await self._db.audit.record("team.member_added", subject_user_id=user_id,
                                    resource_type="team", resource_id=team_id,
                                    details={"team_role": team_role})
        return member

    async def remove_member(self, team_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        removed = await self._db.execrows("teams.remove_member", team_id=team_id,
                                          user_id=user_id) == 1
        if removed:
            await self._db.audit.record("team.member_removed", subject_user_id=user_id,
                                        resource_type="team", resource_id=team_id)
        return removed

    async def members(self, team_id: uuid.UUID) -> builtins.list[TeamMember]:
        return await self._db.fetch_many(MEMBERS, team_id=team_id)

    async def of_user(self, user_id: uuid.UUID) -> builtins.list[Team]:
        return await self._db.fetch_many(OF_USER, user_id=user_id)
