"""Conversations: sessions with metrics kept current by turns, a session with its last turns
in one round trip, keyset pagination, statistics, the monthly turn limit under concurrency,
partitions with RLS, and privacy (other members, admins, other tenants, no context)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from datalayer import (
    Context,
    DataLayer,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    ValidationError,
)
from datalayer.repos.conversations import Turn
from tests.conftest import MemberFactory, Tenant, TenantFactory


@pytest.fixture
async def tenant(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant("Talk")


async def test_turns_keep_session_metrics_current(dl: DataLayer, tenant: Tenant) -> None:
    async with dl.session(tenant.owner) as db:
        s = await db.conversations.start(channel="voice", title="hello")
        assert (s.status, s.turn_count, s.avg_latency_ms, s.p95_latency_ms) == (
            "active", 0, None, None)
        for i in range(1, 21):
            t = await db.conversations.append_turn(
                s.id, input_text=f"q{i}", response_text=f"a{i}", asr_ms=50, retrieval_ms=10,
                llm_ms=40 + 10 * i, tts_ms=0, tokens_in=3, tokens_out=5,
                source_chunk_ids=[i])
        assert t.total_ms == 300 and t.source_chunk_ids == [20]
        s2 = await db.conversations.get(s.id)
    assert s2 is not None
    # latencies 110..300 step 10: mean 205, p95 = the bucket [250, 300) capped at the max
    assert (s2.turn_count, s2.avg_latency_ms, s2.p95_latency_ms, s2.latency_max_ms) == (
        20, 205.0, 300, 300)
    assert (s2.tokens_in, s2.tokens_out) == (60, 100)
    assert s2.last_turn_at is not None and s2.last_turn_at >= s2.started_at


async def test_p95_tracks_a_slow_tail(dl: DataLayer, tenant: Tenant) -> None:
    async with dl.session(tenant.owner) as db:
        s = await db.conversations.start()
        for i in range(100):
            await db.conversations.append_turn(s.id, input_text="q", response_text="a",
                                               total_ms=4000 if i % 10 == 0 else 120)
        got = await db.conversations.get(s.id)
    assert got is not None and got.p95_latency_ms == 4000 and got.latency_max_ms == 4000
    exact = sorted([4000] * 10 + [120] * 90)[94]
    assert exact == 4000


async def test_session_with_last_turns_in_one_round_trip(dl: DataLayer, tenant: Tenant) -> None:
    async with dl.session(tenant.owner) as db:
        s = await db.conversations.start()
        for i in range(12):
            await db.conversations.append_turn(s.id, input_text=f"q{i}", response_text=f"a{i}",
                                               total_ms=100 + i, llm_ms=90)
        got = await db.conversations.with_turns(s.id, turns=5)
        empty = await db.conversations.start()
        none = await db.conversations.with_turns(empty.id)
        assert await db.conversations.with_turns(uuid.uuid4()) is None
        with pytest.raises(ValidationError):
            await db.conversations.with_turns(s.id, turns=0)
    assert got is not None and got.session.id == s.id and got.session.turn_count == 12
    assert [t.input_text for t in got.turns] == [f"q{i}" for i in range(7, 12)]
    assert all(isinstance(t, Turn) and t.llm_ms == 90 for t in got.turns)
    assert none is not None and none.turns == []


async def test_recent_sessions_keyset_pagination_and_turn_pages(
    dl: DataLayer, tenant: Tenant,
) -> None:
    async with dl.session(tenant.owner) as db:
        ids = [(await db.conversations.start(title=f"s{i}")).id for i in range(7)]
        seen: list[uuid.UUID] = []
        page = await db.conversations.recent(limit=3)
        while True:
            seen += [s.id for s in page.items]
            if page.next is None:
                break
            page = await db.conversations.recent(limit=3, before=page.next)
        for i in range(5):
            await db.conversations.append_turn(ids[0], input_text=f"q{i}", response_text="a",
                                               total_ms=1)
        first = await db.conversations.turns(ids[0], limit=3)
        assert first.next is not None
        rest = await db.conversations.turns(ids[0], limit=3, after=first.next)
    # one transaction: one started_at (now()), so the id breaks the tie
    assert len(seen) == 7 and set(seen) == set(ids) and seen == sorted(seen, reverse=True)
    assert [t.input_text for t in first.items + rest.items] == [f"q{i}" for i in range(5)]


async def test_stats_over_a_period(dl: DataLayer, tenant: Tenant) -> None:
    now = datetime.now(UTC)
    async with dl.session(tenant.owner) as db:
        for ms in (100, 300):
            s = await db.conversations.start()
            await db.conversations.append_turn(s.id, input_text="q", response_text="a",
                                               total_ms=ms, tokens_in=1, tokens_out=2)
            await db.conversations.append_turn(s.id, input_text="q", response_text="a",
                                               total_ms=ms, tokens_in=1, tokens_out=2)
            await db.conversations.end(s.id)
        st = await db.conversations.stats(now - timedelta(minutes=1), now + timedelta(minutes=1))
        before = await db.conversations.stats(now - timedelta(days=2), now - timedelta(days=1))
    assert (st.sessions, st.turns, st.avg_latency_ms, st.tokens_in, st.tokens_out) == (
        2, 4, 200.0, 4, 8)
    assert st.p95_latency_ms == 300
    assert (before.sessions, before.turns, before.avg_latency_ms) == (0, 0, None)


async def test_one_turn_and_batch_paths_keep_the_same_metrics(
    dl: DataLayer, tenant: Tenant, admin_conn: asyncpg.Connection,
) -> None:
    """The trigger's single-row path (every append) and its batch path (grouped per session)
    must agree: the same turns appended one by one and inserted as one statement leave equal
    session metrics, histogram included, and count the same on the meter."""
    latencies = [0, 24, 25, 130, 130, 999, 4100, 60000, 75000, 7]
    async with dl.session(tenant.owner) as db:
        one = await db.conversations.start()
        batch = await db.conversations.start()
        for i, ms in enumerate(latencies):
            await db.conversations.append_turn(one.id, input_text="q", response_text="a",
                                               total_ms=ms, tokens_in=i, tokens_out=2 * i)
        before = await db.models.usage()
        await db.connection.execute(
            "INSERT INTO conversation_turns (org_id, session_id, user_id, input_text, "
            "response_text, total_ms, tokens_in, tokens_out) "
            "SELECT app.org_id(), $1, app.user_id(), 'q', 'a', ms, i - 1, 2 * (i - 1) "
            "FROM unnest($2::int[]) WITH ORDINALITY AS x(ms, i)", batch.id, latencies)
        after = await db.models.usage()
    cols = ("turn_count, latency_total_ms, latency_max_ms, latency_hist, p95_latency_ms, "
            "avg_latency_ms, tokens_in, tokens_out")
    rows = {r["id"]: r for r in await admin_conn.fetch(
        f"SELECT id, {cols}, last_turn_at FROM conversation_sessions WHERE id = ANY($1)",
        [one.id, batch.id])}
    a, b = rows[one.id], rows[batch.id]
    assert [a[c] for c in cols.split(", ")] == [b[c] for c in cols.split(", ")]
    assert a["turn_count"] == 10 and a["latency_max_ms"] == 75000
    assert a["latency_hist"] == await admin_conn.fetchval("SELECT app.latency_hist($1::int[])",
                                                          latencies)
    assert a["last_turn_at"] is not None and b["last_turn_at"] is not None
    assert before is not None and after is not None
    assert before.month_turns == 10 and after.month_turns == 20


async def test_concurrent_appends_keep_metrics_equal_to_the_turns(
    dl: DataLayer, tenant: Tenant, admin_conn: asyncpg.Connection,
) -> None:
    """Twenty appends to one session from concurrent sessions, mixed with a batch: the
    session's metrics equal what its turns add up to (no lost update on the session row or
    the meter)."""
    async with dl.session(tenant.owner) as db:
        s = await db.conversations.start()

    async def append(i: int) -> None:
        async with dl.session(tenant.owner) as db:
            await db.conversations.append_turn(s.id, input_text=f"q{i}", response_text="a",
                                               total_ms=37 * i, tokens_in=i, tokens_out=1)

    async def batch() -> None:
        async with dl.session(tenant.owner) as db:
            await db.connection.execute(
                "INSERT INTO conversation_turns (org_id, session_id, user_id, input_text, "
                "response_text, total_ms, tokens_in, tokens_out) SELECT app.org_id(), $1, "
                "app.user_id(), 'b', 'a', 1000 + g, 1, 1 FROM generate_series(1, 5) g", s.id)

    await asyncio.gather(*(append(i) for i in range(20)), batch())
    got = await admin_conn.fetchrow(
        "SELECT s.turn_count, s.latency_total_ms, s.latency_max_ms, s.latency_hist, "
        "s.tokens_in, s.tokens_out, s.last_turn_at, "
        "(SELECT row(count(*), sum(total_ms), max(total_ms), app.latency_hist(array_agg(total_ms)),"
        " sum(tokens_in), sum(tokens_out), max(created_at)) FROM conversation_turns t "
        " WHERE t.org_id = s.org_id AND t.session_id = s.id) AS actual "
        "FROM conversation_sessions s WHERE s.id = $1", s.id)
    assert got is not None
    actual = got["actual"]
    assert got["turn_count"] == actual[0] == 25
    assert (got["latency_total_ms"], got["latency_max_ms"], got["latency_hist"]) == (
        actual[1], actual[2], actual[3])
    assert (got["tokens_in"], got["tokens_out"], got["last_turn_at"]) == (
        actual[4], actual[5], actual[6])
    async with dl.session(tenant.owner, readonly=True) as db:
        usage = await db.models.usage()
    assert usage is not None and usage.month_turns == 25


async def test_a_new_month_restarts_the_turn_meter(
    dl: DataLayer, tenant: Tenant, add_member: MemberFactory, admin_conn: asyncpg.Connection,
) -> None:
    """A meter last written in an earlier month counts from 1 again (single-row path) and
    from the batch size (batch path); the all-time total keeps counting."""
    me = await add_member(tenant, "member")
    async with dl.session(me) as db:
        s = await db.conversations.start()
        await db.conversations.append_turn(s.id, input_text="q", response_text="a")
    for batch in (1, 3):
        await admin_conn.execute(
            "UPDATE twin_usage SET month = month - interval '1 month', month_turns = 499 "
            "WHERE org_id = $1 AND user_id = $2", tenant.org_id, me.user_id)
        async with dl.session(me) as db:
            await db.connection.execute(
                "INSERT INTO conversation_turns (org_id, session_id, user_id, input_text, "
                "response_text, total_ms) SELECT app.org_id(), $1, app.user_id(), 'q', 'a', 5 "
                "FROM generate_series(1, $2)", s.id, batch)
            usage = await db.models.usage()
        assert usage is not None and usage.month_turns == batch
    assert usage is not None and usage.total_turns == 5


async def test_ended_session_refuses_turns(dl: DataLayer, tenant: Tenant) -> None:
    async with dl.session(tenant.owner) as db:
        s = await db.conversations.start()
        ended = await db.conversations.end(s.id, status="abandoned")
        assert ended.status == "abandoned" and ended.ended_at is not None
        with pytest.raises(NotFound):
            await db.conversations.end(s.id)
    with pytest.raises(ValidationError, match="active conversation session"):
        async with dl.session(tenant.owner) as db:
            await db.conversations.append_turn(s.id, input_text="q", response_text="a")


async def test_monthly_turn_limit_holds_under_concurrency(
    dl: DataLayer, tenant: Tenant, add_member: MemberFactory,
) -> None:
    """A free user has 500 turns a month: after 497 (one batch statement), 6 concurrent
    appends on separate sessions let exactly 3 through."""
    me = await add_member(tenant, "member")
    async with dl.session(me) as db:
        s = await db.conversations.start()
        await db.connection.execute(
            "INSERT INTO conversation_turns (org_id, session_id, user_id, input_text, "
            "response_text, total_ms) SELECT app.org_id(), $1, app.user_id(), 'q', 'a', 10 "
            "FROM generate_series(1, 497)", s.id)

    async def append(i: int) -> Turn | BaseException:
        try:
            async with dl.session(me) as db:
                return await db.conversations.append_turn(s.id, input_text=f"c{i}",
                                                          response_text="a", total_ms=5)
        except LimitExceeded as exc:
            return exc

    out = await asyncio.gather(*(append(i) for i in range(6)))
    assert sum(isinstance(o, Turn) for o in out) == 3
    refused = [o for o in out if isinstance(o, LimitExceeded)]
    assert len(refused) == 3 and refused[0].constraint == "twin_limit_turns"
    assert "500 conversation turns per month" in str(refused[0])
    async with dl.session(me) as db:
        got = await db.conversations.get(s.id)
        usage = await db.models.usage()
    assert got is not None and got.turn_count == 500
    assert usage is not None and usage.month_turns == 500


async def test_turn_partitions_all_force_rls(admin_conn: asyncpg.Connection) -> None:
    rows = await admin_conn.fetch(
        "SELECT c.relname, c.relrowsecurity AS rls, c.relforcerowsecurity AS force, "
        "(SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'conversation_turns'::regclass")
    month = datetime.now(UTC).strftime("%Y%m")
    assert {f"conversation_turns_p{month}", "conversation_turns_default"} <= {
        r["relname"] for r in rows}
    assert all(r["rls"] and r["force"] and r["policies"] == 2 for r in rows), rows


async def test_conversations_private_admins_read_aggregates_only(
    dl: DataLayer, tenant: Tenant, add_member: MemberFactory, make_tenant: TenantFactory,
) -> None:
    me = await add_member(tenant, "member")
    async with dl.session(me) as db:
        s = await db.conversations.start(title="private thoughts")
        await db.conversations.append_turn(s.id, input_text="my secret", response_text="ok",
                                           total_ms=250, tokens_in=4, tokens_out=6)
    other = await add_member(tenant, "member")
    admin = await add_member(tenant, "admin")
    stranger = await make_tenant("Other")
    for ctx in (other, admin, tenant.owner, stranger.owner, Context(None),
                Context(tenant.org_id, role="owner")):
        async with dl.session(ctx) as db:
            assert await db.conversations.get(s.id) is None
            assert await db.conversations.with_turns(s.id) is None
            assert (await db.conversations.recent()).items == []
            assert (await db.conversations.turns(s.id)).items == []
            assert not await db.conversations.delete(s.id)
            n = await db.connection.fetchval("SELECT count(*) FROM conversation_turns")
            assert n == 0
        with pytest.raises(NotFound):
            async with dl.session(ctx) as db:
                await db.conversations.append_turn(s.id, input_text="x", response_text="y")
    now = datetime.now(UTC)
    window = (now - timedelta(hours=1), now + timedelta(hours=1))
    async with dl.session(admin) as db:
        stats = {r.user_id: r for r in await db.conversations.org_stats(*window)}
    assert me.user_id in stats and other.user_id in stats
    mine = stats[me.user_id]
    assert (mine.sessions, mine.turns, mine.avg_latency_ms, mine.tokens_in) == (1, 1, 250.0, 4)
    assert stats[other.user_id].sessions == 0
    for ctx in (me, tenant.ctx("viewer")):
        with pytest.raises(PermissionDenied, match="owners and admins"):
            async with dl.session(ctx) as db:
                await db.conversations.org_stats(*window)
    async with dl.session(stranger.owner) as db:
        theirs = await db.conversations.org_stats(*window)
    assert me.user_id not in {r.user_id for r in theirs}


async def test_seeded_twin_users_see_their_own_data(dl: DataLayer) -> None:
    """``datalayer seed``: DigiTwin users on free and pro tiers with active models, ready
    documents whose chunks are searchable, and sessions whose metrics match their turns."""
    import io

    from datalayer.seed import SeedPlan, seed, user_id

    run_id = uuid.uuid4().hex[:8]
    counts = await seed(dl, profile="dev", scale=1, out=io.StringIO(), run_id=run_id)
    assert counts["digitwin"] == 4 * 3 * 6
    plan = SeedPlan("dev", 1, run_id)
    tiers = []
    for i in range(4):
        ctx = Context(plan.org_ids[i % 3], user_id=user_id(plan, i), role="member")
        async with dl.session(ctx, readonly=True) as db:
            usage = await db.models.usage()
            assert usage is not None and (usage.models, usage.documents) == (2, 3)
            tiers.append(usage.tier)
            assert await db.models.active("voice") is not None
            assert await db.knowledge.search("roadmap OR budget OR hiring")
            page = await db.conversations.recent()
            assert len(page.items) == 3
            s = page.items[0]
            assert s.status == "ended" and s.turn_count == 6 and s.p95_latency_ms is not None
            got = await db.conversations.with_turns(s.id, turns=50)
            assert got is not None and len(got.turns) == 6
    assert tiers == ["free", "pro", "free", "pro"]


async def test_metrics_and_meters_are_not_writable_by_the_app_role(
    dl: DataLayer, tenant: Tenant, add_member: MemberFactory,
) -> None:
    """Session metrics and the usage meter belong to the triggers: the run-time role cannot
    set them, read the meter table, call the limit function, or file a turn as someone else."""
    other = await add_member(tenant, "member")
    async with dl.session(tenant.owner) as db:
        s = await db.conversations.start()
    for sql, args in (
        ("UPDATE conversation_sessions SET turn_count = 0 WHERE id = $1", (s.id,)),
        ("SELECT count(*) FROM twin_usage", ()),
        ("UPDATE twin_usage SET month_turns = 0", ()),
        ("SELECT app.twin_check_limit(app.org_id(), app.user_id(), 'turns', -100)", ()),
        ("SELECT * FROM twin_tier_limits", ()),
        ("INSERT INTO conversation_turns (org_id, session_id, user_id, input_text, "
         "response_text, total_ms) VALUES (app.org_id(), $1, $2, 'q', 'a', 1)",
         (s.id, other.user_id)),
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with dl.session(tenant.owner) as db:
                await db.connection.execute(sql, *args)
    async with dl.session(tenant.owner) as db:
        got = await db.conversations.get(s.id)
    assert got is not None and got.turn_count == 0


def test_histogram_p95_is_the_bucket_bound_capped_by_the_maximum() -> None:
    """The SQL histogram against an exact percentile: the estimate is never below the exact
    value and at most the next bucket bound."""
    import random

    bounds = [0, 25, 50, 75, 100, 150, 200, 250, 300, 400, 500, 600, 700, 800, 900, 1000,
              1250, 1500, 1750, 2000, 2500, 3000, 4000, 5000, 7500, 10000, 15000, 20000,
              30000, 60000]

    def estimate(values: list[int]) -> int:
        hist = [0] * 30
        for v in values:
            hist[max(i for i, b in enumerate(bounds) if v >= b)] += 1
        rank, cum = -(-95 * len(values) // 100), 0
        for i, n in enumerate(hist):
            cum += n
            if cum >= rank:
                return min(bounds[i + 1] if i + 1 < 30 else max(values), max(values))
        return max(values)

    rng = random.Random(5)
    for _ in range(200):
        values = [int(rng.lognormvariate(6, 1)) for _ in range(rng.randint(1, 300))]
        exact = sorted(values)[-(-95 * len(values) // 100) - 1]
        est = estimate(values)
        nxt = next((b for b in bounds if b > exact), max(values))
        assert exact <= est <= max(nxt, exact)


async def test_sql_histogram_matches_the_model(admin_conn: asyncpg.Connection) -> None:
    values = [5, 30, 30, 120, 480, 480, 999, 1000, 4100, 70000]
    hist = await admin_conn.fetchval("SELECT app.latency_hist($1::int[])", values)
    assert sum(hist) == len(values) and len(hist) == 30
    assert (hist[0], hist[1], hist[4], hist[9], hist[14], hist[15], hist[22], hist[29]) == (
        1, 2, 1, 2, 1, 1, 1, 1)
    assert await admin_conn.fetchval("SELECT app.hist_p95($1::int[], 70000)", hist) == 70000
    assert await admin_conn.fetchval("SELECT app.hist_p95(app.latency_hist('{100,100,100}'),"
                                     " 100)") == 100
    assert await admin_conn.fetchval("SELECT app.hist_p95(array_fill(0, ARRAY[30]), NULL)") \
        is None
    merged = await admin_conn.fetchval(
        "SELECT app.hist_sum(h) FROM (VALUES (app.latency_hist('{10}')), "
        "(app.latency_hist('{10,20000}'))) v(h)")
    assert merged[0] == 2 and merged[27] == 1
