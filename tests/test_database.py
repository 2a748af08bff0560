"""Sessions and tenant context: the security- and performance-critical core.

Every leak test runs in both context modes on a pool of ONE connection, so the next
session is guaranteed to get the connection the previous one used.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from datalayer import (
    Conflict,
    Context,
    DataLayer,
    DataLayerError,
    PermissionDenied,
    SerializationFailure,
    Session,
    Settings,
    Timeout,
    TransactionAborted,
    Unavailable,
    ValidationError,
)
from tests.conftest import Tenant, TenantFactory, make_settings

TEST_QUERIES = Path(__file__).parent / "queries"


@pytest.fixture(params=["session", "transaction"])
async def single(request: pytest.FixtureRequest, settings: Settings
                 ) -> AsyncIterator[DataLayer]:
    """A DataLayer with exactly one pooled connection, in each context mode."""
    s = make_settings(settings.database_url, context_mode=request.param, pool_min_size=1,
                      pool_max_size=1, migrate_on_start=False, statement_timeout_ms=500,
                      acquire_timeout_s=2.0)
    async with DataLayer(s, extra_queries=[TEST_QUERIES]) as layer:
        yield layer


async def whoami(db: Session) -> asyncpg.Record:
    row = await db.one("testing.whoami")
    assert row is not None
    return row


async def assert_clean_for(dl: DataLayer, ctx: Context, foreign: Tenant) -> None:
    """The next session on the connection carries exactly ``ctx`` and sees nothing of
    ``foreign``."""
    async with dl.session(ctx, readonly=True) as db:
        me = await whoami(db)
        assert me["role"] == "datalayer_app"
        assert me["org_id"] == (str(ctx.org_id) if ctx.org_id else "")
        assert me["user_id"] == (str(ctx.user_id) if ctx.user_id else "")
        assert me["request_id"] == (ctx.request_id or "")
        # a read-only session opens a transaction only where the context needs one
        txn_mode = dl.settings.context_mode == "transaction"
        assert db.connection.is_in_transaction() == txn_mode
        assert await db.orgs.get(foreign.org_id) is None
        assert await db.orgs.get_by_slug(foreign.slug) is None
    async with dl.session(ctx) as db:  # and read-write starts a fresh transaction
        assert await db.orgs.get(foreign.org_id) is None


# -- who the session runs as ------------------------------------------------------------------
async def test_session_runs_as_app_role_even_when_login_is_superuser(
    dl_modes: dict[str, DataLayer], make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    for dl in dl_modes.values():
        async with dl.session(t.owner) as db:
            row = await db.connection.fetchrow(
                "SELECT r.rolsuper, r.rolbypassrls, session_user AS login, "
                "(SELECT count(*) FROM pg_class WHERE relowner = r.oid) "
                "+ (SELECT count(*) FROM pg_proc WHERE proowner = r.oid) "
                "+ (SELECT count(*) FROM pg_namespace WHERE nspowner = r.oid) AS owned "
                "FROM pg_roles r WHERE r.rolname = current_user")
            login_super = await db.connection.fetchval(
                "SELECT rolsuper FROM pg_roles WHERE rolname = session_user")
        assert row is not None
        assert login_super, "this test is meant to run with a superuser DATABASE_URL"
        assert (row["rolsuper"], row["rolbypassrls"], row["owned"]) == (False, False, 0)


async def test_no_org_context_sees_nothing_and_cannot_write(
    dl_modes: dict[str, DataLayer], make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    for dl in dl_modes.values():
        async with dl.session(Context(None), readonly=True) as db:
            assert await db.scalar("orgs.count_all") == 0
            assert await db.orgs.get(t.org_id) is None
        with pytest.raises(PermissionDenied):
            async with dl.session(Context(None, role="owner")) as db:
                await db.orgs.create(slug=f"x-{uuid.uuid4().hex[:8]}", name="No tenant")
        async with dl.session(Context(None, role="owner")) as db:
            assert await db.execrows("orgs.soft_delete", id=t.org_id) == 0


# -- no leaks between sessions on one connection ------------------------------------------------
@pytest.mark.parametrize("ending", ["commit", "exception", "cancel", "statement_timeout"])
async def test_context_never_survives_into_next_session(
    single: DataLayer, make_tenant: TenantFactory, ending: str,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    ctx_a = a.owner.with_(request_id="req-a")

    async def use_a() -> None:
        async with single.session(ctx_a) as db:
            assert (await whoami(db))["org_id"] == str(a.org_id)
            if ending == "exception":
                raise RuntimeError("boom")
            if ending in ("cancel", "statement_timeout"):
                await db.scalar("testing.sleep", seconds=5)

    if ending == "commit":
        await use_a()
    elif ending == "exception":
        with pytest.raises(RuntimeError):
            await use_a()
    elif ending == "cancel":
        task = asyncio.create_task(use_a())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with pytest.raises(Timeout, match=r"testing\.sleep"):
            await use_a()
    await assert_clean_for(single, Context(b.org_id, role="viewer"), a)
    await assert_clean_for(single, Context(None), a)
    # and the original tenant still works on the same connection afterwards
    async with single.session(ctx_a, readonly=True) as db:
        assert (await db.orgs.get(a.org_id)) is not None


async def test_switching_back_and_forth_applies_each_context(
    single: DataLayer, make_tenant: TenantFactory,
) -> None:
    tenants = [await make_tenant() for _ in range(3)]
    for i in range(9):
        t = tenants[i % 3]
        readonly = i % 2 == 0
        async with single.session(t.ctx("member"), readonly=readonly) as db:
            visible = await db.orgs.list_visible()
            assert [o.id for o in visible] == [t.org_id]


async def test_failed_apply_inside_rolled_back_transaction_is_reapplied(
    single: DataLayer, make_tenant: TenantFactory,
) -> None:
    """In session mode a context applied inside a transaction that rolls back is undone by
    PostgreSQL; the remembered key must not claim otherwise."""
    a, b = await make_tenant(), await make_tenant()
    async with single.session(a.owner, readonly=True) as db:
        await db.orgs.get(a.org_id)  # connection now carries A
    with pytest.raises(RuntimeError):
        async with single.session(b.owner) as db:  # applies B inside BEGIN … then fails
            raise RuntimeError("roll back")
    await assert_clean_for(single, b.owner, a)  # B must be applied afresh, not assumed
    await assert_clean_for(single, a.owner, b)


async def test_transaction_mode_leaves_nothing_on_the_connection(
    settings: Settings, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    s = make_settings(settings.database_url, context_mode="transaction", pool_min_size=1,
                      pool_max_size=1, migrate_on_start=False)
    async with DataLayer(s) as dl:
        async with dl.session(t.owner) as db:
            await db.orgs.get(t.org_id)
        async with dl.pool.acquire() as conn:  # the very same connection, outside a session
            row = await conn.fetchrow(
                "SELECT current_user = session_user AS own_role, "
                "coalesce(current_setting('app.org_id', true), '') AS org")
            assert row is not None
            assert (row["own_role"], row["org"]) == (True, "")
            assert not conn.is_in_transaction()


async def test_concurrent_sessions_across_tenants_each_see_only_their_own(
    settings: Settings, make_tenant: TenantFactory,
) -> None:
    tenants = [await make_tenant() for _ in range(8)]
    s = make_settings(settings.database_url, pool_min_size=3, pool_max_size=3,
                      migrate_on_start=False)
    async with DataLayer(s, extra_queries=[TEST_QUERIES]) as dl:

        async def one(i: int) -> None:
            t = tenants[i % len(tenants)]
            async with dl.session(t.ctx("member"), readonly=bool(i % 2)) as db:
                me = await whoami(db)
                await asyncio.sleep(0)  # let other sessions interleave on the pool
                assert me["org_id"] == str(t.org_id)
                assert [o.id for o in await db.orgs.list_visible()] == [t.org_id]

        await asyncio.gather(*(one(i) for i in range(120)))


# -- read-only, roles, savepoints ---------------------------------------------------------------
async def test_readonly_session_cannot_write_even_as_owner(
    dl_modes: dict[str, DataLayer], make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    for dl in dl_modes.values():
        with pytest.raises(PermissionDenied, match="read-only"):
            async with dl.session(t.owner, readonly=True) as db:
                await db.orgs.update(t.org_id, name="nope")
        with pytest.raises(PermissionDenied, match="read-only"):
            async with dl.session(t.owner.with_(read_only=True)) as db:
                await db.orgs.update(t.org_id, name="nope")


async def test_repeatable_read_readonly_session_sees_one_snapshot(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant("Before")
    async with dl.session(t.owner, readonly=True, isolation="repeatable_read") as db:
        first = await db.orgs.get(t.org_id)
        async with dl.session(t.owner) as writer:
            await writer.orgs.update(t.org_id, name="After")
        again = await db.orgs.get(t.org_id)
    assert first is not None and again is not None
    assert (first.name, again.name) == ("Before", "Before")


async def test_savepoint_rolls_back_only_the_inner_block(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant("Outer")
    async with dl.session(t.owner) as db:
        await db.orgs.update(t.org_id, name="Kept")
        with pytest.raises(ValidationError):
            async with db.savepoint():
                await db.orgs.update(t.org_id, name="")  # CHECK violation
        async with db.savepoint():
            await db.orgs.update(t.org_id, plan="pro")
    async with dl.session(t.owner, readonly=True) as db:
        org = await db.orgs.get(t.org_id)
    assert org is not None and (org.name, org.plan) == ("Kept", "pro")


async def test_savepoint_needs_a_transaction(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner, readonly=True) as db:
        with pytest.raises(ValidationError, match="savepoint"):
            async with db.savepoint():
                pass


async def test_exception_rolls_back_the_whole_session(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant("Original")
    with pytest.raises(RuntimeError):
        async with dl.session(t.owner) as db:
            await db.orgs.update(t.org_id, name="Changed")
            raise RuntimeError("after the write")
    async with dl.session(t.owner, readonly=True) as db:
        org = await db.orgs.get(t.org_id)
    assert org is not None and org.name == "Original"


# -- retries --------------------------------------------------------------------------------------
async def test_run_in_session_retries_a_real_serialization_failure(
    settings: Settings, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    s = make_settings(settings.database_url, migrate_on_start=False)
    async with DataLayer(s, extra_queries=[TEST_QUERIES]) as dl:
        both_read = asyncio.Barrier(2)
        attempts: list[int] = []

        async def increment(db: Session) -> None:
            attempts.append(1)
            current = await db.scalar("testing.settings_of", id=t.org_id)
            if len(attempts) <= 2:
                await both_read.wait()  # the first two attempts overlap for sure
            n = current.get("n", 0) + 1
            await db.execrows("testing.set_settings", id=t.org_id, settings={"n": n})

        await asyncio.gather(*(dl.run_in_session(t.owner, increment,
                                                 isolation="repeatable_read")
                               for _ in range(2)))
        async with dl.session(t.owner, readonly=True) as db:
            final = await db.scalar("testing.settings_of", id=t.org_id)
    assert final == {"n": 2}, "a lost update means the conflict was not detected"
    assert len(attempts) == 3, "exactly one of the two must have been re-run"


async def test_run_in_session_gives_up_after_retries(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    calls = 0

    async def always_conflicts(db: Session) -> None:
        nonlocal calls
        calls += 1
        raise SerializationFailure("simulated conflict")

    with pytest.raises(SerializationFailure):
        await dl.run_in_session(t.owner, always_conflicts, retries=2)
    assert calls == 3


# -- failures: killed connections, exhausted pool, database down --------------------------------
async def test_killed_connection_raises_unavailable_and_pool_recovers(
    single: DataLayer, make_tenant: TenantFactory, admin_conn: asyncpg.Connection,
) -> None:
    t = await make_tenant()
    with pytest.raises(Unavailable):
        async with single.session(t.owner) as db:
            pid = (await whoami(db))["pid"]
            await admin_conn.execute("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep(0.1)
            await db.orgs.get(t.org_id)
    async with single.session(t.owner, readonly=True) as db:
        assert (await whoami(db))["pid"] != pid
        assert await db.orgs.get(t.org_id) is not None


async def test_exhausted_pool_raises_timeout(settings: Settings,
                                             make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    s = make_settings(settings.database_url, pool_min_size=1, pool_max_size=1,
                      acquire_timeout_s=0.2, migrate_on_start=False)
    async with DataLayer(s) as dl, dl.session(t.owner):
        with pytest.raises(Timeout, match="no database connection became free"):
            async with dl.session(t.owner):
                pass


async def test_unreachable_database_fails_after_the_retry_budget() -> None:
    s = Settings(database_url="postgresql://postgres@127.0.0.1:1/none", env="testing",
                 connect_timeout_s=0.3)
    with pytest.raises(Unavailable, match=r"did not answer within 0\.3s"):
        await DataLayer(s).start()


# -- arguments, names, error mapping --------------------------------------------------------------
async def test_unknown_query_and_wrong_shape_fail_before_any_round_trip(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    async with dl.session(t.owner, readonly=True) as db:
        with pytest.raises(ValidationError, match=r"unknown query 'orgs\.gett'.*orgs\.get"):
            await db.run("orgs.gett", id=t.org_id)
        with pytest.raises(ValidationError, match="is a :one query, not :many"):
            await db.many("orgs.get", id=t.org_id)
        with pytest.raises(ValidationError, match="missing id"):
            await db.run("orgs.get")
        with pytest.raises(ValidationError, match="unexpected org"):
            await db.run("orgs.get", id=t.org_id, org=1)
        row = await db.run("orgs.get", id=t.org_id)
        assert row is not None and row["id"] == t.org_id


async def test_errors_name_the_constraint_but_never_the_value(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    secret_slug = t.slug
    with pytest.raises(Conflict) as conflict:
        async with dl.session(Context(uuid.uuid4(), role="owner")) as db:
            await db.orgs.create(slug=secret_slug, name="Copycat")
    assert conflict.value.constraint == "organizations_slug_key"
    assert secret_slug not in str(conflict.value)
    bad = "Not A Slug!"
    with pytest.raises(ValidationError) as invalid:
        async with dl.session(Context(uuid.uuid4(), role="owner")) as db:
            await db.orgs.create(slug=bad, name="Bad")
    assert invalid.value.constraint == "organizations_slug_format"
    assert bad not in str(invalid.value)
    with pytest.raises(ValidationError) as typed:
        async with dl.session(t.owner, readonly=True) as db:
            await db.run("orgs.get", id="not-a-uuid")
    assert "not-a-uuid" not in str(typed.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"org_id": "nope"}, "org_id must be a UUID"),
        ({"org_id": None, "user_id": 5}, "user_id must be a UUID"),
        ({"org_id": None, "role": "root"}, "role must be one of"),
        ({"org_id": None, "request_id": "x'; RESET ROLE; --"}, "request_id must be"),
        ({"org_id": None, "ip": "10.0.0.1'--"}, "ip must be"),
        ({"org_id": None, "ip": "fe80::1%eth0"}, "scope id"),
        ({"org_id": None, "read_only": "yes"}, "read_only must be a bool"),
    ],
)
def test_context_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Context(**kwargs)  # type: ignore[arg-type]


def test_context_normalizes_and_compares() -> None:
    org = uuid.uuid4()
    a = Context(str(org), ip="2001:DB8:0::1")  # type: ignore[arg-type]
    assert a.org_id == org and a.ip == "2001:db8::1"
    assert a == Context(org, ip="2001:db8::1")
    assert a.with_(role="viewer").role == "viewer"
    assert "session_sql" not in repr(a)


async def test_session_requires_a_context(dl: DataLayer) -> None:
    with pytest.raises(ValidationError, match="needs a Context"):
        dl.session(None)  # type: ignore[arg-type]


async def test_session_used_after_its_block_says_so(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    async with dl.session(t.owner, readonly=True) as db:
        pass
    with pytest.raises(DataLayerError, match="session is closed"):
        await db.orgs.get(t.org_id)


async def test_provenance_comment_reaches_the_server_and_statements_are_prepared_once(
    single: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    async with single.session(t.owner, readonly=True) as db:
        for _ in range(5):
            await db.orgs.get(t.org_id)
        rows = await db.connection.fetch(
            "SELECT statement FROM pg_prepared_statements WHERE statement LIKE $1",
            "/* datalayer:orgs.get */%")
    assert len(rows) == 1, "asyncpg should prepare the statement once and reuse it"


async def test_cancellation_inside_a_savepoint_propagates_and_rolls_back(
    single: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant("Before")

    async def work() -> None:
        async with single.session(t.owner) as db:
            await db.orgs.update(t.org_id, name="During")
            async with db.savepoint():
                await db.scalar("testing.sleep", seconds=5)

    task = asyncio.create_task(work())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with single.session(t.owner, readonly=True) as db:
        org = await db.orgs.get(t.org_id)
    assert org is not None and org.name == "Before"


async def test_swallowed_error_inside_a_session_is_not_a_silent_rollback(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    """PostgreSQL answers COMMIT of a failed transaction with ROLLBACK; the session says so."""
    t = await make_tenant("Kept")
    with pytest.raises(TransactionAborted, match="nothing was written"):
        async with dl.session(t.owner) as db:
            await db.orgs.update(t.org_id, name="Lost")
            with contextlib.suppress(ValidationError):  # a CHECK violation, ignored
                await db.orgs.update(t.org_id, name="")
    async with dl.session(t.owner, readonly=True) as db:
        org = await db.orgs.get(t.org_id)
    assert org is not None and org.name == "Kept"
    async with dl.session(t.owner) as db:  # the connection is fine afterwards
        assert (await db.orgs.update(t.org_id, name="Next")).name == "Next"


async def test_guarded_driver_calls_raise_typed_errors(dl: DataLayer) -> None:
    """SQL outside the registry (generated statements, dedicated connections) fails as a
    DataLayerError naming what ran, like a registry query."""
    from datalayer.core.session import guarded

    conn = await dl.connect_dedicated("test", "for a test")
    try:
        name = await conn.fetchval("SELECT current_setting('application_name')")
        assert name == f"{dl.settings.application_name}-test"
        with pytest.raises(DataLayerError, match=r"^test\.divide: ") as err:
            await guarded(conn.fetchval("SELECT 1 / 0"), "test.divide")
        assert err.value.sqlstate == "22012"
        with pytest.raises(ValidationError, match=r"test\.cast"):
            await guarded(conn.fetchval("SELECT 'x'::int"), "test.cast")
    finally:
        await conn.close()
    with pytest.raises(Unavailable, match="lost"):
        await guarded(conn.fetchval("SELECT 1"), "test.closed")


async def test_dedicated_connection_refused_is_unavailable() -> None:
    s = Settings(database_url="postgresql://postgres@127.0.0.1:1/none", env="testing",
                 connect_timeout_s=1)
    with pytest.raises(Unavailable, match="for a test"):
        await DataLayer(s).connect_dedicated("test", "for a test")
