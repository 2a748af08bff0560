"""Web sessions in Redis and in the PostgreSQL fallback: the same behaviour from both.

Sliding expiry, the absolute lifetime, revoke, revoke all of a user's, and what a copy of
either store holds: the sha256 of each token, never the token.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from datalayer import Context, DataLayer, PermissionDenied, ValidationError
from datalayer.web_sessions import WebSessions, hash_token
from tests.conftest import email_for

STORES = ("redis", "postgres")


@pytest.fixture(params=STORES)
async def sessions(request: pytest.FixtureRequest, dl: DataLayer, redis_prefix: str
                   ) -> AsyncIterator[WebSessions]:
    """Each store in turn; Redis keys under the test's prefix, removed afterwards."""
    if request.param == "postgres":
        yield WebSessions(dl, store="postgres")
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    try:
        yield WebSessions(dl, store="redis", redis=client, prefix=redis_prefix)
    finally:
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def new_user(dl: DataLayer) -> uuid.UUID:
    user_id = uuid.uuid4()
    async with dl.session(Context(None, user_id=user_id)) as db:
        await db.users.create(email=email_for(user_id))
    return user_id


async def test_create_and_get(dl: DataLayer, sessions: WebSessions) -> None:
    user = await new_user(dl)
    new = await sessions.create(user, {"org": "acme", "csrf": "t0k"})
    assert new.token not in repr(new)
    assert len(new.token) == 43  # 256 bits, URL-safe base64
    got = await sessions.get(new.token)
    assert got is not None
    assert (got.user_id, got.data) == (user, {"org": "acme", "csrf": "t0k"})
    assert got.created_at == new.session.created_at
    assert got.max_expires_at - got.created_at == timedelta(days=7)
    # get() slid the expiry: 30 minutes from now, not from creation
    assert timedelta(minutes=30) <= got.expires_at - got.created_at < timedelta(minutes=31)
    other = await sessions.create(user)
    assert other.token != new.token and (await sessions.get(other.token)) is not None


async def test_expiry_slides_with_use_and_ends_when_idle(dl: DataLayer,
                                                         sessions: WebSessions) -> None:
    user = await new_user(dl)
    new = await sessions.create(user, idle_timeout_s=0.6)
    await asyncio.sleep(0.35)
    looked = await sessions.get(new.token, touch=False)  # a look does not slide it
    assert looked is not None and looked.expires_at == new.session.expires_at
    expires = await sessions.touch(new.token)
    assert expires is not None and expires > new.session.expires_at
    await asyncio.sleep(0.35)  # past the first expiry: alive because it was touched
    assert await sessions.get(new.token) is not None
    await asyncio.sleep(0.7)  # idle longer than the timeout
    assert await sessions.get(new.token) is None
    assert await sessions.touch(new.token) is None


async def test_touching_never_passes_the_absolute_lifetime(dl: DataLayer,
                                                           sessions: WebSessions) -> None:
    user = await new_user(dl)
    new = await sessions.create(user, idle_timeout_s=0.5, max_age_s=0.8)
    for _ in range(3):
        await asyncio.sleep(0.3)
        got = await sessions.get(new.token)
        if got is not None:
            assert got.expires_at <= got.max_expires_at
    assert await sessions.get(new.token) is None  # 0.9 s: touched, but past max age


async def test_revoke_ends_one_session(dl: DataLayer, sessions: WebSessions) -> None:
    user = await new_user(dl)
    a, b = await sessions.create(user), await sessions.create(user)
    assert await sessions.revoke(a.token) is True
    assert await sessions.get(a.token) is None
    assert await sessions.revoke(a.token) is False
    assert await sessions.get(b.token) is not None


async def test_revoke_all_ends_every_session_of_that_user_only(
    dl: DataLayer, sessions: WebSessions,
) -> None:
    user, other = await new_user(dl), await new_user(dl)
    mine = [await sessions.create(user) for _ in range(3)]
    theirs = await sessions.create(other)
    await sessions.revoke(mine[0].token)
    assert await sessions.revoke_all_for_user(user) == 2
    assert [await sessions.get(s.token) for s in mine] == [None, None, None]
    assert await sessions.get(theirs.token) is not None
    assert await sessions.revoke_all_for_user(user) == 0
    fresh = await sessions.create(user)  # signing in again works
    assert await sessions.get(fresh.token) is not None


@pytest.mark.parametrize("token", ["", "short", "x" * 43 + "=", "a" * 42 + "!", "é" * 43])
async def test_malformed_tokens_find_nothing(sessions: WebSessions, token: str) -> None:
    assert await sessions.get(token) is None
    assert await sessions.revoke(token) is False


async def test_arguments_are_checked_before_any_round_trip(sessions: WebSessions) -> None:
    with pytest.raises(ValidationError, match="user_id must be a UUID"):
        await sessions.create("not-a-uuid")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="JSON-serializable"):
        await sessions.create(uuid.uuid4(), {"x": object()})
    with pytest.raises(ValidationError, match="over 16384 bytes"):
        await sessions.create(uuid.uuid4(), {"x": "y" * 20_000})
    with pytest.raises(ValidationError, match="idle_timeout_s"):
        await sessions.create(uuid.uuid4(), idle_timeout_s=10, max_age_s=5)


async def test_postgres_stores_only_the_token_hash(
    dl: DataLayer, admin_conn: asyncpg.Connection,
) -> None:
    sessions = WebSessions(dl, store="postgres")
    user = await new_user(dl)
    new = await sessions.create(user, {"k": "v"})
    row = await admin_conn.fetchrow("SELECT to_jsonb(s)::text AS whole, id_hash "
                                    "FROM web_sessions s WHERE user_id = $1", user)
    assert row is not None
    assert row["id_hash"] == hashlib.sha256(new.token.encode()).digest() == \
        hash_token(new.token)
    assert new.token not in row["whole"]


async def test_redis_stores_only_the_token_hash(
    dl: DataLayer, redis_client: aioredis.Redis, redis_prefix: str,
) -> None:
    sessions = WebSessions(dl, store="redis", redis=redis_client, prefix=redis_prefix)
    user = uuid.uuid4()  # Redis does not know the users table
    new = await sessions.create(user, {"k": "v"})
    key = f"{redis_prefix}session:{hash_token(new.token).hex()}"
    fields = await redis_client.hgetall(key)
    assert fields[b"u"] == str(user).encode() and orjson.loads(fields[b"d"]) == {"k": "v"}
    everything = [key.encode(), *fields.values(),
                  *await redis_client.smembers(f"{redis_prefix}session_user:{user}")]
    assert not any(new.token.encode() in blob for blob in everything)
    assert 0 < await redis_client.pttl(key) <= 30 * 60 * 1000


async def test_redis_user_set_forgets_expired_sessions(
    dl: DataLayer, redis_client: aioredis.Redis, redis_prefix: str,
) -> None:
    sessions = WebSessions(dl, store="redis", redis=redis_client, prefix=redis_prefix)
    user = uuid.uuid4()
    await sessions.create(user, idle_timeout_s=0.05)
    await asyncio.sleep(0.1)
    await sessions.create(user)
    assert await redis_client.scard(f"{redis_prefix}session_user:{user}") == 1


async def test_postgres_store_refuses_unknown_users_and_tenant_sessions(
    dl: DataLayer,
) -> None:
    sessions = WebSessions(dl, store="postgres")
    with pytest.raises(ValidationError, match="references a missing row"):
        await sessions.create(uuid.uuid4())
    async with dl.session(Context(uuid.uuid4(), role="owner")) as db:
        with pytest.raises(PermissionDenied, match="without an organization context"):
            async with db.savepoint():
                await db.scalar("web_sessions.revoke_user", user_id=uuid.uuid4())


async def test_sweep_deletes_expired_postgres_sessions(
    dl: DataLayer, admin_conn: asyncpg.Connection,
) -> None:
    sessions = WebSessions(dl, store="postgres")
    user = await new_user(dl)
    await sessions.create(user, idle_timeout_s=0.05)
    live = await sessions.create(user)
    await asyncio.sleep(0.1)
    assert await sessions.sweep() >= 1
    left = await admin_conn.fetch("SELECT id_hash FROM web_sessions WHERE user_id = $1", user)
    assert [r["id_hash"] for r in left] == [hash_token(live.token)]


async def test_store_follows_the_configuration(dl: DataLayer) -> None:
    assert dl.settings.redis_url is None and dl.web_sessions.store == "postgres"
    with pytest.raises(ValidationError, match="needs REDIS_URL or a client"):
        WebSessions(dl, store="redis")
