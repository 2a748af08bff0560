"""Notifications: per-user rows (RLS), fan-out, list with unread count, push."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from datalayer import Context, DataLayer, PermissionDenied, ValidationError
from datalayer.repos.notifications import NotificationFeed
from tests.conftest import MemberFactory, Tenant, TenantFactory, make_layer, make_settings


def uid(ctx: Context) -> uuid.UUID:
    assert ctx.user_id is not None
    return ctx.user_id


class _Counting:
    """Stands in for a session's connection and counts the statements sent."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name in ("fetch", "fetchrow", "fetchval", "execute", "executemany"):
            self.calls += 1
        return attr


async def _world(make_tenant: TenantFactory, add_member: MemberFactory,
                 dl: DataLayer) -> tuple[Tenant, Context, Context, Context, uuid.UUID]:
    t = await make_tenant("Notify")
    m1, m2 = await add_member(t, "member"), await add_member(t, "member")
    viewer = await add_member(t, "viewer")
    async with dl.session(t.owner) as db:
        team = await db.teams.create("Alerts")
        await db.teams.add_member(team.id, uid(m1))
        await db.teams.add_member(team.id, uid(m2))
    return t, m1, m2, viewer, team.id


async def test_create_and_fan_out_to_team_and_org(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    t, m1, m2, viewer, team = await _world(make_tenant, add_member, dl)
    async with dl.session(m1) as db:  # any writer notifies any member
        one = await db.notifications.create(uid(m2), "comment.added", "New comment",
                                            message="on Nightly export", data={"n": 1},
                                            priority="high")
        counting = _Counting(db._conn)
        db._conn = counting
        by_team = await db.notifications.fan_out_team(team, "team.alert", "Disk full")
        by_org = await db.notifications.fan_out_org("org.announcement", "Maintenance tonight",
                                                    priority="low")
        assert counting.calls == 2  # one statement per fan-out
    assert one.user_id == uid(m2) and one.org_id == t.org_id and one.priority == "high"
    assert {e.user_id for e in by_team} == {uid(m1), uid(m2)}
    assert {e.user_id for e in by_org} == {t.owner_id, uid(m1), uid(m2), uid(viewer)}
    rows = await admin_conn.fetch(
        "SELECT type, count(*) FROM notifications WHERE org_id = $1 GROUP BY type", t.org_id)
    counts = {r["type"]: r["count"] for r in rows}
    assert counts == {"comment.added": 1, "team.alert": 2, "org.announcement": 4}
    with pytest.raises(PermissionDenied):  # viewers do not notify
        async with dl.session(viewer) as db:
            await db.notifications.create(uid(m1), "x", "from a viewer")
    outsider = await make_tenant("Outside")
    with pytest.raises(ValidationError):  # only members of the organization
        async with dl.session(t.owner) as db:
            await db.notifications.create(outsider.owner_id, "x", "to a stranger")
    with pytest.raises(ValidationError):
        async with dl.session(t.owner) as db:
            await db.notifications.create(uid(m1), "x", "t", priority="whenever")
    with pytest.raises(PermissionDenied):  # nobody writes into another organization
        async with dl.session(outsider.owner) as db:
            await db.notifications.create(uid(m1), "x", "spoof", org_id=t.org_id)
    async with dl.session(outsider.owner) as db:  # fan-out sees no other org's team/members
        assert await db.notifications.fan_out_team(team, "x", "spoof", org_id=t.org_id) == []
        assert await db.notifications.fan_out_org("x", "spoof", org_id=t.org_id) == []
    async with dl.system() as db:  # maintenance notifies in any organization
        sys_event = await db.notifications.create(uid(m1), "system.notice", "From the system",
                                                  org_id=t.org_id)
    assert sys_event.org_id == t.org_id


async def test_list_with_unread_count_in_one_round_trip_and_marking_read(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t, m1, _, _, _ = await _world(make_tenant, add_member, dl)
    async with dl.session(t.owner) as db:  # one transaction: still in creation order
        created = [await db.notifications.create(uid(m1), "n", f"#{i}") for i in range(5)]
    async with dl.session(m1, readonly=True) as db:
        counting = _Counting(db._conn)
        db._conn = counting
        page = await db.notifications.list(limit=2)
        assert counting.calls == 1
    assert page.unread == 5 and len(page.items) == 2 and page.next is not None
    assert [n.title for n in page.items] == ["#4", "#3"]  # newest first
    titles = [n.title for n in page.items]
    async with dl.session(m1, readonly=True) as db:
        while page.next is not None:
            page = await db.notifications.list(before=page.next, limit=2)
            titles += [n.title for n in page.items]
            assert page.unread == 5
    assert titles == ["#4", "#3", "#2", "#1", "#0"]
    async with dl.session(m1) as db:
        assert await db.notifications.mark_read([created[0].id, created[1].id]) == 2
        assert await db.notifications.mark_read([created[0].id]) == 0  # already read
        assert await db.notifications.unread_count() == 3
        unread = await db.notifications.list(unread_only=True)
        assert {n.id for n in unread.items} == {e.id for e in created[2:]}
        assert await db.notifications.mark_all_read() == 3
        page = await db.notifications.list()
        assert page.unread == 0 and len(page.items) == 5 and page.next is None
        assert all(n.read_at is not None for n in page.items)
        assert await db.notifications.delete(created[0].id)
    async with dl.session(t.owner) as db:
        fresh = await db.notifications.create(uid(m1), "n", "fresh")
    async with dl.session(m1.with_(role="viewer")) as db:  # marking read is self-service
        assert await db.notifications.mark_read([fresh.id]) == 1
    with pytest.raises(PermissionDenied):  # but not in a read-only context
        async with dl.session(m1.with_(read_only=True)) as db:
            await db.notifications.mark_all_read()
    async with dl.session(t.owner, readonly=True) as db:  # empty list still counts
        empty = await db.notifications.list()
        assert empty.items == [] and empty.unread == 0 and empty.next is None


async def test_expired_notifications_are_hidden_and_deleted_in_batches(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    t, m1, _, _, _ = await _world(make_tenant, add_member, dl)
    past = datetime.now(UTC) - timedelta(minutes=1)
    async with dl.session(t.owner) as db:
        for i in range(5):
            await db.notifications.create(uid(m1), "n", f"old {i}", expires_at=past)
        keep = await db.notifications.create(uid(m1), "n", "fresh",
                                             expires_at=past + timedelta(days=1))
    async with dl.session(m1, readonly=True) as db:
        page = await db.notifications.list()
    assert [n.id for n in page.items] == [keep.id] and page.unread == 1
    async with dl.system() as db:
        assert await db.notifications.delete_expired(batch=2, max_batches=1) == 2
        assert await db.notifications.delete_expired(batch=2) >= 3  # other tests' too
    left = await admin_conn.fetch("SELECT id FROM notifications WHERE org_id = $1", t.org_id)
    assert [r["id"] for r in left] == [keep.id]


async def test_a_user_reads_and_marks_only_their_own(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    t, m1, m2, _, _ = await _world(make_tenant, add_member, dl)
    async with dl.session(t.owner) as db:
        mine = await db.notifications.create(uid(m1), "n", "for m1 only")
        # the sender cannot read back what it sent to someone else
        assert (await db.notifications.list()).items == []
    async with dl.session(m2) as db:  # same organization, another member
        page = await db.notifications.list()
        assert page.items == [] and page.unread == 0
        assert await db.notifications.mark_read([mine.id]) == 0
        assert await db.notifications.mark_all_read() == 0
        assert not await db.notifications.delete(mine.id)
    other = await make_tenant("Elsewhere")
    async with dl.session(other.owner) as db:
        assert (await db.notifications.list()).items == []
        assert await db.notifications.mark_read([mine.id]) == 0
        assert await db.connection.fetchval("SELECT count(*) FROM notifications") == 0
    # m1 in another organization's context sees nothing of this one
    async with dl.session(Context(other.org_id, user_id=uid(m1), role="member"),
                          readonly=True) as db:
        assert await db.connection.fetchval("SELECT count(*) FROM notifications") == 0
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # only the read state changes
        async with dl.session(m1) as db:
            await db.connection.execute("UPDATE notifications SET title = 'x' WHERE id = $1",
                                        mine.id)
    assert await admin_conn.fetchval(
        "SELECT read_at IS NULL FROM notifications WHERE org_id = $1 AND id = $2",
        t.org_id, mine.id)
    async with dl.session(m1) as db:
        page = await db.notifications.list()
        assert [n.id for n in page.items] == [mine.id] and page.unread == 1
        assert page.items[0].message == "" and page.items[0].data == {}
        assert await db.notifications.get(mine.id) == page.items[0]
    async with dl.session(m2, readonly=True) as db:
        assert await db.notifications.get(mine.id) is None


async def test_push_through_notify_without_redis(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    assert dl.redis is None
    t, m1, m2, _, team = await _world(make_tenant, add_member, dl)
    feed = NotificationFeed(dl)
    async with await feed.subscribe(uid(m1)) as sub:
        with pytest.raises(RuntimeError):  # rolled back: nothing is announced
            async with dl.session(t.owner) as db:
                await db.notifications.create(uid(m1), "n", "never")
                raise RuntimeError
        async with dl.session(t.owner) as db:
            await db.notifications.create(uid(m2), "n", "not for m1")
            sent = await db.notifications.create(uid(m1), "build.failed", "Build failed",
                                                 priority="urgent")
            fanned = await db.notifications.fan_out_team(team, "team.alert", "Team")
        got = [await sub.get(timeout_s=5) for _ in range(2)]
        assert await sub.get(timeout_s=0.2) is None
    assert got[0] == sent
    assert got[1] == next(e for e in fanned if e.user_id == uid(m1))


@pytest.fixture
async def redis_dl(dl: DataLayer, redis_url: str,
                   redis_prefix: str) -> AsyncIterator[DataLayer]:
    layer = make_layer(make_settings(dl.settings.database_url, redis_url=redis_url,
                                     pool_max_size=2, migrate_on_start=False,
                                     channel_prefix=redis_prefix))
    await layer.start()
    yield layer
    await layer.close()


async def test_push_through_redis(
    redis_dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    redis_client: aioredis.Redis, redis_prefix: str,
) -> None:
    t, m1, m2, _, _ = await _world(make_tenant, add_member, redis_dl)
    feed = NotificationFeed(redis_dl)
    assert feed.channel(uid(m1)) == f"{redis_prefix}notifications:{uid(m1)}"
    # A listener on the raw channel sees the same message.
    raw = redis_client.pubsub()
    await raw.subscribe(feed.channel(uid(m1)))
    async with await feed.subscribe(uid(m1)) as sub:
        with pytest.raises(RuntimeError):
            async with redis_dl.session(t.owner) as db:
                await db.notifications.create(uid(m1), "n", "never")
                raise RuntimeError
        async with redis_dl.session(t.owner) as db:
            await db.notifications.create(uid(m2), "n", "not for m1")
            by_org = await db.notifications.fan_out_org("org.news", "News")
        event = await sub.get(timeout_s=5)
        assert event == next(e for e in by_org if e.user_id == uid(m1))
        assert await sub.get(timeout_s=0.2) is None
    message = None
    for _ in range(20):
        message = await raw.get_message(ignore_subscribe_messages=True, timeout=0.25)
        if message is not None:
            break
    await raw.aclose()  # type: ignore[no-untyped-call]
    assert message is not None and b'"title"' not in message["data"]
