"""Notification scenario: a user's notification list with their unread count.

One user with ``NOTIFICATIONS`` notifications (one in ten unread, one minute apart),
inserted by one ``INSERT … SELECT generate_series`` through ``dl.system()``, then VACUUM
ANALYZE. The candidate lists the first page (50) and the unread count in the user's
read-only tenant session (RLS on); the baseline runs the same statement on raw asyncpg with
``app.org_id()`` / ``app.user_id()`` bound as parameters. Target: p99 under 2 ms.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from datalayer import Context
from datalayer.repos._base import LAST

from .core import owned_org
from .harness import BenchContext, Scenario, bind_context

__all__ = ["SCENARIOS"]

NOTIFICATIONS = 10_000
PAGE = 50


@dataclass(frozen=True, slots=True)
class NotificationState:
    org_id: uuid.UUID
    user_id: uuid.UUID
    ctx: Context
    sql: str  # notifications.list with the context helpers bound as parameters
    args: tuple[Any, ...]


async def _setup(bctx: BenchContext) -> NotificationState:
    cached: NotificationState | None = bctx.cache.get("notifications")
    if cached is not None:
        return cached
    dl = bctx.dl
    made = await owned_org(bctx, "notifications")
    org, owner = made.org_id, made.user_id
    async with dl.system() as db:
        await db.connection.execute(
            """INSERT INTO notifications (org_id, user_id, type, title, message, data, priority,
                                          created_at, read_at)
               SELECT $1, $2, 'bench.event', 'Event ' || g, 'Something happened (' || g || ')',
                      jsonb_build_object('n', g),
                      (ARRAY['low', 'normal', 'high', 'urgent'])[g % 4 + 1],
                      now() - g * interval '1 minute',
                      CASE WHEN g % 10 <> 0 THEN now() END
               FROM generate_series(1, $3) g""", org, owner, NOTIFICATIONS)
    async with bctx.pool.acquire() as conn:
        await conn.execute("VACUUM ANALYZE notifications")
    q = dl.registry["notifications.list"]
    n = len(q.params)
    sql = bind_context(q.sql, n)
    params = {"before_created_at": LAST[0], "before_id": LAST[1], "limit": PAGE,
              "unread_only": False}
    state = NotificationState(org, owner, Context(org, user_id=owner, role="owner"), sql,
                              (*(params[p] for p in q.params), org, owner))
    bctx.cache["notifications"] = state
    return state


async def _list(b: BenchContext, s: NotificationState, i: int) -> None:
    async with b.dl.session(s.ctx, readonly=True) as db:
        page = await db.notifications.list(limit=PAGE)
    if len(page.items) != PAGE or page.unread != NOTIFICATIONS // 10:
        raise RuntimeError(f"notifications.list: {len(page.items)} items, {page.unread} unread")


async def _list_raw(b: BenchContext, s: NotificationState, i: int) -> None:
    async with b.pool.acquire() as conn:
        await conn.fetch(s.sql, *s.args)


async def _extra(b: BenchContext, s: NotificationState) -> dict[str, Any]:
    return {"p99_target_ms": 2.0, "notifications": NOTIFICATIONS,
            "unread": NOTIFICATIONS // 10, "page": PAGE}


SCENARIOS: list[Scenario] = [
    Scenario("notifications.list", _setup, _list, _list_raw, extra=_extra,
             description="tenant session, a user's first page of 10,000 notifications "
                         "with the unread count, one statement"),
]
