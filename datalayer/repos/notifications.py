"""Per-user notifications (``queries/notifications.sql``) and their push feed.

``db.notifications`` creates notifications (one, or fanned out to a team or the whole
organization in one statement), lists the context user's own with their unread count in
one round trip, marks them read and deletes expired ones (maintenance). RLS lets a user
read and mark only their own notifications; any writer of an organization may notify its
members (``schema/0014_notifications.sql``).

Push: every new notification is announced once its transaction commits. With Redis
(``REDIS_URL``) on the channel ``{prefix}notifications:{user_id}`` (published right after
COMMIT); without Redis as a PostgreSQL NOTIFY on ``datalayer_notifications``, sent by the
creating statement itself (PostgreSQL delivers it at COMMIT, and never after a rollback).
The message is a :class:`NotificationEvent`: ids, type, priority and time, never the title,
message or data (the NOTIFY channel is shared by every tenant of the database): a client
that receives one fetches the list. :class:`NotificationFeed` subscribes a service to a
user's events.
"""

from __future__ import annotations

import builtins
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

from datalayer.core.errors import Unavailable, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.live import Feed
from datalayer.repos._base import LAST, Repository, check_limit, page_of

if TYPE_CHECKING:

    from datalayer.core.database import DataLayer

__all__ = ["NOTIFY_CHANNEL", "PRIORITIES", "Notification", "NotificationEvent",
           "NotificationFeed", "NotificationList", "NotificationSubscription", "Notifications"]

log = logging.getLogger("datalayer.notifications")

NOTIFY_CHANNEL = "datalayer_notifications"
PRIORITIES = ("low", "normal", "high", "urgent")


def channel_for(prefix: str, user_id: uuid.UUID) -> str:
    return f"{prefix}notifications:{user_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Notification:
    org_id: uuid.UUID
    id: uuid.UUID
    user_id: uuid.UUID
    type: str
    title: str
    message: str
    data: dict[str, Any]
    priority: str
    created_at: datetime
    read_at: datetime | None
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class NotificationList:
    """One page of a user's notifications, newest first, and their unread count (all of
    their unread live notifications, not just this page's). ``next`` is the cursor for the
    following page (``before=``), None at the end."""

    items: list[Notification]
    unread: int
    next: tuple[datetime, uuid.UUID] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class NotificationEvent:
    """What is pushed for a new notification: no title, message or data."""

    org_id: uuid.UUID
    id: uuid.UUID
    user_id: uuid.UUID
    type: str
    priority: str
    created_at: datetime

    def to_json(self) -> bytes:
        return orjson.dumps({
            "org_id": str(self.org_id), "id": str(self.id), "user_id": str(self.user_id),
            "type": self.type, "priority": self.priority,
            "created_at": self.created_at.isoformat(),
        })

    @classmethod
    def from_json(cls, data: bytes | str) -> NotificationEvent:
        d = orjson.loads(data)
        return cls(org_id=uuid.UUID(d["org_id"]), id=uuid.UUID(d["id"]),
                   user_id=uuid.UUID(d["user_id"]), type=d["type"], priority=d["priority"],
                   created_at=datetime.fromisoformat(d["created_at"]))


GET = RowQuery("notifications.get", Notification)
# notifications.list has the same columns after its ``unread``: built by GET's builder.
_BUILD = GET.build


class Notifications(Repository):
    """``db.notifications``: a user's own notifications; writers notify members."""

    __slots__ = ()

    async def create(self, user_id: uuid.UUID, type: str, title: str, *, message: str = "",
                     data: dict[str, Any] | None = None, priority: str = "normal",
                     expires_at: datetime | None = None,
                     org_id: uuid.UUID | None = None) -> NotificationEvent:
        """Notify one member of the organization. ``org_id`` is for maintenance sessions
        (``dl.system()``); a tenant session creates in its own organization only
        (``PermissionDenied`` otherwise, and for viewers, guests and read-only contexts).
        ``ValidationError`` when ``user_id`` is not a member."""
        (event,) = await self._insert("notifications.create", org_id, type, title, message,
                                      data, priority, expires_at, user_id=user_id)
        return event

    async def fan_out_team(self, team_id: uuid.UUID, type: str, title: str, *,
                           message: str = "", data: dict[str, Any] | None = None,
                           priority: str = "normal", expires_at: datetime | None = None,
                           org_id: uuid.UUID | None = None,
                           ) -> builtins.list[NotificationEvent]:
        """Notify every member of a team, in one statement; one event per recipient."""
        return await self._insert("notifications.fan_out_team", org_id, type, title, message,
                                  data, priority, expires_at, team_id=team_id)

    async def fan_out_org(self, type: str, title: str, *, message: str = "",
                          data: dict[str, Any] | None = None, priority: str = "normal",
                          expires_at: datetime | None = None,
                          org_id: uuid.UUID | None = None) -> builtins.list[NotificationEvent]:
        """Notify every member of the organization, in one statement."""
        return await self._insert("notifications.fan_out_org", org_id, type, title, message,
                                  data, priority, expires_at)

    async def _insert(self, name: str, org_id: uuid.UUID | None, type: str, title: str,
                      message: str, data: dict[str, Any] | None, priority: str,
                      expires_at: datetime | None, **target: object,
                      ) -> builtins.list[NotificationEvent]:
        if priority not in PRIORITIES:
            raise ValidationError(f"priority must be one of {', '.join(PRIORITIES)}")
        db = self._db
        redis = db.dl.redis
        rows = await db.many(name, org_id=org_id, type=type, title=title, message=message,
                             data=data or {}, priority=priority, expires_at=expires_at,
                             notify=redis is None, **target)
        events = [NotificationEvent(org_id=r["org_id"], id=r["id"], user_id=r["user_id"],
                                    type=type, priority=priority, created_at=r["created_at"])
                  for r in rows]
        if redis is not None and events:
            prefix = db.dl.settings.channel_prefix

            async def publish() -> None:
                try:
                    async with redis.pipeline(transaction=False) as pipe:
                        for e in events:
                            pipe.publish(channel_for(prefix, e.user_id), e.to_json())
                        await pipe.execute()
                except (RedisError, OSError) as exc:
                    raise Unavailable("Redis did not take the notifications") from exc

            await db.after_commit(publish)
        return events

    async def list(self, *, before: tuple[datetime, uuid.UUID] | None = None,
                   limit: int = 50, unread_only: bool = False) -> NotificationList:
        """The context user's live notifications, newest first, and their unread count:
        one statement. Pass the previous page's ``next`` as ``before``."""
        at, nid = before or LAST
        rows = await self._db.many("notifications.list", before_created_at=at, before_id=nid,
                                   limit=check_limit(limit), unread_only=unread_only)
        build = _BUILD
        items = [build(r) for r in rows if r["id"] is not None]
        unread: int = rows[0]["unread"] if rows else 0
        return NotificationList(items, unread,
                                page_of(items, limit, lambda n: (n.created_at, n.id)).next)

    async def get(self, notification_id: uuid.UUID) -> Notification | None:
        """One of the context user's notifications (None for anyone else's)."""
        return await self._db.fetch_one(GET, id=notification_id)

    async def unread_count(self) -> int:
        n: int = await self._db.scalar("notifications.unread_count")
        return n

    async def mark_read(self, ids: Sequence[uuid.UUID]) -> int:
        """Mark some of the context user's notifications read; how many were unread.
        Others' ids are ignored (RLS)."""
        if not ids:
            return 0
        return await self._db.execrows("notifications.mark_read", ids=list(ids))

    async def mark_all_read(self) -> int:
        return await self._db.execrows("notifications.mark_all_read")

    async def delete(self, notification_id: uuid.UUID) -> bool:
        """Dismiss one of the context user's notifications."""
        return await self._db.execrows("notifications.delete", id=notification_id) == 1

    async def delete_expired(self, *, batch: int = 1000, max_batches: int | None = None) -> int:
        """Maintenance (``dl.system()``): delete expired notifications in batches of
        ``batch`` rows; how many were deleted. Call it in a read-write system session."""
        if batch < 1:
            raise ValidationError("batch must be positive")
        total = 0
        done = 0
        while max_batches is None or done < max_batches:
            n = await self._db.execrows("notifications.delete_expired", batch=batch)
            total += n
            done += 1
            if n < batch:
                break
        return total


class NotificationFeed:
    """Subscribe a service to a user's new notifications (to stream them to clients).

    Redis channels are namespaced by ``Settings.channel_prefix`` (DATALAYER_CHANNEL_PREFIX),
    the same one the repository publishes under. Without Redis the feed LISTENs on
    ``datalayer_notifications`` and filters by user in this process.
    """

    __slots__ = ("_dl", "prefix")

    def __init__(self, dl: DataLayer) -> None:
        self._dl = dl
        self.prefix = dl.settings.channel_prefix

    def channel(self, user_id: uuid.UUID) -> str:
        return channel_for(self.prefix, user_id)

    async def subscribe(self, user_id: uuid.UUID) -> NotificationSubscription:
        """Subscribe to ``user_id``'s new notifications (in every organization): subscribed
        when this returns. The caller has authenticated the user (trusted service code);
        events carry ids only, the content is read through ``db.notifications.list``."""
        sub = NotificationSubscription(self, user_id)
        await sub._open()
        return sub


class NotificationSubscription(Feed[NotificationEvent]):
    """``async for event in sub`` until :meth:`close` (or the end of ``async with``)."""

    __slots__ = ("_feed", "user_id")

    def __init__(self, feed: NotificationFeed, user_id: uuid.UUID) -> None:
        super().__init__(feed._dl, NOTIFY_CHANNEL)
        self._feed = feed
        self.user_id = user_id

    def _decode(self, data: bytes | str) -> NotificationEvent:
        return NotificationEvent.from_json(data)

    def _wanted(self, event: NotificationEvent) -> bool:
        return event.user_id == self.user_id

    def _redis_channel(self) -> str:
        return self._feed.channel(self.user_id)
