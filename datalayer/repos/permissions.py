"""Permission checks (``queries/permissions.sql``): role matrix plus team ownership, in SQL."""

from __future__ import annotations

import uuid

from datalayer.core.errors import ValidationError
from datalayer.repos._base import Repository

__all__ = ["ACTIONS", "RESOURCES", "Permissions"]

RESOURCES = ("organization", "members", "teams", "workflows", "executions", "credentials",
             "webhooks", "api_keys", "audit")
ACTIONS = ("read", "create", "update", "delete", "execute", "manage")


def _check_names(resource: str, action: str) -> None:
    if resource not in RESOURCES:
        raise ValidationError(f"resource must be one of {', '.join(RESOURCES)}")
    if action not in ACTIONS:
        raise ValidationError(f"action must be one of {', '.join(ACTIONS)}")


class Permissions(Repository):
    """``db.permissions``: the same rules the database applies, asked ahead of time."""

    __slots__ = ()

    async def check(self, user_id: uuid.UUID, action: str, resource: str, *,
                    team_id: uuid.UUID | None = None) -> bool:
        """May ``user_id`` do ``action`` on a ``resource`` (owned by ``team_id``) in the
        context organization? False for non-members. One round trip."""
        _check_names(resource, action)
        return bool(await self._db.scalar("permissions.check", user_id=user_id,
                                          action=action, resource=resource, team_id=team_id))

    async def role_allows(self, role: str, action: str, resource: str) -> bool:
        _check_names(resource, action)
        return bool(await self._db.scalar("permissions.role_allows", role=role,
                                          action=action, resource=resource))
