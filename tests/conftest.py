"""Fixtures: a throwaway database per run (migrated once), a started DataLayer, tenants, Redis.

The admin URL is ``DATALAYER_TEST_DATABASE_URL`` (default: postgres on 127.0.0.1:5432);
Redis is ``DATALAYER_TEST_REDIS_URL``. Under ``CI=true`` a missing service fails the run;
elsewhere the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg
import pytest
import redis.asyncio as aioredis

from datalayer import Context, DataLayer, Settings
from datalayer.core import migrations
from datalayer.core.context import Role
from datalayer.core.resources import resource_dir
from datalayer.security import PasswordHasher, PasswordPolicy

ADMIN_URL = os.environ.get("DATALAYER_TEST_DATABASE_URL",
                           "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DATALAYER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
RUN_ID = uuid.uuid4().hex[:10]


def url_for(db: str, base: str = ADMIN_URL, user: str | None = None) -> str:
    """``base`` pointed at database ``db`` (and login ``user``)."""
    parts = urlsplit(base)
    netloc = parts.netloc
    if user is not None:
        netloc = f"{user}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(path=f"/{db}", netloc=netloc))


def _reachable(url: str) -> str | None:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2):
            return None
    except OSError as exc:
        return f"{parts.hostname}:{parts.port}: {exc}"


def _require(service: str, problem: str | None) -> None:
    if problem is None:
        return
    if IN_CI:
        pytest.exit(f"{service} is required under CI=true but unreachable ({problem})",
                    returncode=3)
    pytest.skip(f"{service} unreachable ({problem})")


def create_database(name: str) -> str:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url_for(name)


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


TEST_KEYS = "test1:" + base64.b64encode(b"k" * 32).decode()
# Argon2id below the production policy so that tests registering many users stay fast;
# tests of the policy itself use the default.
FAST_PASSWORDS = PasswordPolicy(memory_kib=1024, iterations=1)


def make_layer(settings: Settings, **kwargs: Any) -> DataLayer:
    """A DataLayer with the fast password policy."""
    return DataLayer(settings, passwords=PasswordHasher(FAST_PASSWORDS), **kwargs)


def make_settings(url: str, **overrides: object) -> Settings:
    kwargs: dict[str, object] = {
        "keys": TEST_KEYS,
        "database_url": url,
        "env": "testing",
        "pool_min_size": 1,
        "pool_max_size": 8,
        "statement_timeout_ms": 10_000,
        "connect_timeout_s": 5.0,
    }
    kwargs.update(overrides)
    return Settings(**kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database for this run, migrated; dropped at the end."""
    _require("PostgreSQL", _reachable(ADMIN_URL))
    name = f"dl_test_{RUN_ID}"
    url = create_database(name)
    try:
        migrations.apply(make_settings(url), resource_dir("schema"))
        yield url
    finally:
        drop_database(name)


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture(scope="session")
async def dl(settings: Settings) -> AsyncIterator[DataLayer]:
    """The session-wide DataLayer (context mode ``session``)."""
    async with make_layer(settings) as layer:
        yield layer


@pytest.fixture(scope="session")
async def dl_modes(settings: Settings) -> AsyncIterator[dict[str, DataLayer]]:
    """One DataLayer per context mode, sharing the run's database."""
    layers = {m: make_layer(make_settings(settings.database_url, context_mode=m,
                                          migrate_on_start=False))
              for m in ("session", "transaction")}
    for layer in layers.values():
        await layer.start()
    yield layers
    for layer in layers.values():
        await layer.close()


@dataclass(frozen=True)
class Tenant:
    """An organization whose owner is a registered user with an owner membership."""

    org_id: uuid.UUID
    slug: str
    owner: Context

    @property
    def owner_id(self) -> uuid.UUID:
        assert self.owner.user_id is not None
        return self.owner.user_id

    def ctx(self, role: Role = "member", **kw: Any) -> Context:
        return Context(self.org_id, role=role, **kw)


TenantFactory = Callable[..., Awaitable[Tenant]]
MemberFactory = Callable[..., Awaitable[Context]]


def email_for(user_id: uuid.UUID) -> str:
    return f"u-{user_id.hex[:12]}@example.test"


@pytest.fixture(scope="session")
def make_tenant(dl: DataLayer) -> TenantFactory:
    """Create an organization, its owner's account and owner membership."""

    async def make(name: str = "Tenant", plan: str = "free") -> Tenant:
        org_id, owner_id = uuid.uuid4(), uuid.uuid4()
        slug = f"t-{org_id.hex[:12]}"
        owner = Context(org_id, user_id=owner_id, role="owner")
        async with dl.session(owner) as db:
            await db.orgs.create(slug=slug, name=name, plan=plan)
            await db.users.create(email=email_for(owner_id), display_name=f"{name} owner")
            await db.memberships.add(owner_id, "owner")
        return Tenant(org_id, slug, owner)

    return make


@pytest.fixture(scope="session")
def add_member(dl: DataLayer) -> MemberFactory:
    """Register a user and bring it into ``tenant`` with ``role`` the way a service does:
    the owner invites, the user accepts. Returns the member's context."""

    async def add(tenant: Tenant, role: Role = "member", *, password: str | None = None,
                  email: str | None = None) -> Context:
        user_id = uuid.uuid4()
        email = email or email_for(user_id)
        alone = Context(None, user_id=user_id)
        async with dl.session(alone) as db:
            if password is None:
                await db.users.create(email=email)
            else:
                await db.auth.register(email=email, password=password)
        async with dl.session(tenant.owner) as db:
            token = await db.auth.invite(email, "admin" if role == "owner" else role)
        async with dl.session(alone) as db:
            assert await db.auth.consume_token("invitation", token) is not None
        if role == "owner":
            async with dl.session(tenant.owner) as db:
                await db.memberships.set_role(user_id, "owner")
        return Context(tenant.org_id, user_id=user_id, role=role)

    return add


@pytest.fixture
async def admin_conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the run's database (bypasses RLS: for set-up and checks)."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    parts = urlsplit(REDIS_URL)
    problem = None
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 2):
            pass
    except OSError as exc:
        problem = str(exc)
    _require("Redis", problem)
    return REDIS_URL


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A Redis client; every key a test writes must start with ``redis_prefix``."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"dltest:{RUN_ID}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def redis_prefix() -> str:
    return f"dltest:{RUN_ID}:{uuid.uuid4().hex[:6]}:"



# -- plans ----------------------------------------------------------------------------------
def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, depth first. With ANALYZE, branches that
    never ran (``Actual Loops`` 0: gated off by a one-time filter) are left out."""
    if plan.get("Actual Loops") == 0:
        return []
    out = [plan]
    for child in plan.get("Plans", []):
        out += plan_nodes(child)
    return out


async def nested_plans(url: str, ctx: Context, sql: str, args: list[object], *,
                       analyze: bool = False, no_seqscan: bool = False,
                       ) -> list[dict[str, Any]]:
    """The plans of ``sql`` and of every statement it runs inside functions (definer
    functions included), executed under ``ctx`` as a session (the app role and the context)
    in a transaction that is rolled back; auto_explain reports them as notices."""
    conn = await asyncpg.connect(url)
    notes: list[str] = []
    conn.add_log_listener(lambda _c, msg: notes.append(str(msg.message)))
    try:
        await conn.execute(
            "LOAD 'auto_explain'; SET auto_explain.log_min_duration = 0; "
            "SET auto_explain.log_nested_statements = on; SET auto_explain.log_format = json; "
            "SET auto_explain.log_level = notice; SET client_min_messages = notice")
        if analyze:
            await conn.execute("SET auto_explain.log_analyze = on; "
                               "SET auto_explain.log_timing = off")
        if no_seqscan:
            await conn.execute("SET enable_seqscan = off")
        await conn.execute(ctx.session_sql)
        assert await conn.fetchval("SELECT current_user") == "datalayer_app"
        await conn.execute("BEGIN READ WRITE")
        await conn.fetch(sql, *args)
        await conn.execute("ROLLBACK")
        await asyncio.sleep(0.1)  # log listeners are called soon, not at once
    finally:
        await conn.close()
    plans = [json.loads(n[n.index("{"):])["Plan"] for n in notes if "plan:" in n and "{" in n]
    assert plans, f"auto_explain reported no plans: {notes}"
    return plans
