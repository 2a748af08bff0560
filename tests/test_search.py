"""Search: prefix matching, ranking, snippets, kinds, the trigram fallback (present and
absent), safe query building, and tenancy under a SECURITY DEFINER function: another tenant,
no context, private workflows, shares and notification recipients, plus EXPLAIN as the
run-time role showing that the GIN indexes serve it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from datalayer import Context, DataLayer, Settings, ValidationError
from datalayer.core import migrations
from datalayer.core.resources import resource_dir
from tests.conftest import (
    RUN_ID,
    MemberFactory,
    Tenant,
    TenantFactory,
    create_database,
    drop_database,
    make_layer,
    make_settings,
    nested_plans,
    plan_nodes,
)


@dataclass(frozen=True)
class World:
    a: Tenant
    b: Tenant
    member: Context  # a member of A
    other: Context  # another member of A
    slack: uuid.UUID  # A, organization-visible
    private: uuid.UUID  # A, private to the owner
    template: uuid.UUID  # A, a template
    secret_b: uuid.UUID  # B
    failed: uuid.UUID  # A, an execution that failed
    note: uuid.UUID  # A, a notification for `member`


@pytest.fixture(scope="module")
async def world(dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory) -> World:
    a, b = await make_tenant("Search A"), await make_tenant("Search B")
    member, other = await add_member(a, "member"), await add_member(a, "member")
    async with dl.session(a.owner) as db:
        slack = (await db.workflows.create(
            "Slack notification sender", description="Posts build results to a channel",
            tags=["chat", "ops"])).id
        for k in range(5):  # noise that matches "slack" weakly (description only)
            await db.workflows.create(f"Helper {k}", description="mentions slack once")
        private = (await db.workflows.create("Invoice reconciliation", visibility="private",
                                             description="ledger magic")).id
        template = (await db.workflows.create("Daily report template", is_template=True,
                                              description="summarize the day")).id
        wf = await db.workflows.create("Gateway caller", nodes=[{"id": "a", "type": "code"}])
        await db.executions.enqueue(wf.id)
        note = (await db.notifications.create(member.user_id, "budget",  # type: ignore[arg-type]
                                              "Quarterly budget approved",
                                              message="the finance team signed off")).id
    async with dl.session(a.owner) as db:  # a tenant worker claims only its own queue
        (ex,) = await db.executions.claim("search-test", limit=1)
        await db.executions.fail(ex, error="upstream gateway refused the connection")
    async with dl.session(b.owner) as db:
        secret_b = (await db.workflows.create("Slack secret escalation",
                                              description="gateway budget invoice")).id
        await db.notifications.create(b.owner_id, "budget", "Quarterly budget of B")
    return World(a, b, member, other, slack, private, template, secret_b, ex.id, note)


async def search(dl: DataLayer, ctx: Context, text: str, **kw: Any) -> list[Any]:
    async with dl.session(ctx, readonly=True) as db:
        return await db.search.query(text, **kw)


async def test_prefix_match_ranks_names_first_with_snippets(dl: DataLayer, world: World) -> None:
    hits = await search(dl, world.member, "sla notif")
    assert [h.id for h in hits] == [world.slack]
    assert hits[0].kind == "workflow" and not hits[0].fuzzy
    assert "<b>Slack</b>" in hits[0].snippet and "<b>notification</b>" in hits[0].snippet
    hits = await search(dl, world.member, "slack")
    assert hits[0].id == world.slack  # the name (weight A) outranks descriptions (B)
    assert len(hits) == 6
    assert hits == sorted(hits, key=lambda h: -h.rank)
    assert len(await search(dl, world.member, "slack", limit=2)) == 2


async def test_kinds_templates_execution_errors_and_notifications(dl: DataLayer,
                                                                  world: World) -> None:
    hits = await search(dl, world.member, "report", kinds=["template"])
    assert [(h.kind, h.id) for h in hits] == [("template", world.template)]
    assert await search(dl, world.member, "report", kinds=["workflow"]) == []
    hits = await search(dl, world.member, "gateway refused")
    assert [(h.kind, h.id) for h in hits] == [("execution", world.failed)]
    assert "<b>gateway</b>" in hits[0].snippet
    hits = await search(dl, world.member, "budget")
    assert [(h.kind, h.id) for h in hits] == [("notification", world.note)]
    # Only the recipient finds a notification: not the owner who sent it, not a colleague.
    assert await search(dl, world.a.owner, "budget", kinds=["notification"]) == []
    assert await search(dl, world.other, "budget") == []
    with pytest.raises(ValidationError):
        await search(dl, world.member, "x", kinds=["audits"])
    with pytest.raises(ValidationError):
        await search(dl, world.member, "x", limit=0)


async def test_other_tenant_and_no_context_see_nothing(dl: DataLayer, world: World) -> None:
    b_ctx = world.b.owner
    assert {h.id for h in await search(dl, b_ctx, "slack")} == {world.secret_b}
    assert world.secret_b not in {h.id for h in await search(dl, world.a.owner, "secret")}
    assert await search(dl, world.a.owner, "escalation") == []
    assert await search(dl, b_ctx, "gateway", kinds=["execution"]) == []
    assert await search(dl, b_ctx, "reconciliation") == []
    for ctx in (Context(None), Context(None, user_id=world.member.user_id)):
        assert await search(dl, ctx, "slack") == []
        assert await search(dl, ctx, "budget") == []
    async with dl.system() as db:  # no tenant context: nothing either
        assert await db.search.query("slack") == []
    # Calling the function directly with B's ids as text changes nothing.
    async with dl.session(world.a.owner, readonly=True) as db:
        assert await db.search.query(str(world.secret_b)) == []


async def test_private_workflows_follow_visibility_and_shares(dl: DataLayer,
                                                              world: World) -> None:
    assert await search(dl, world.member, "invoice") == []
    assert [h.id for h in await search(dl, world.a.owner, "invoice")] == [world.private]
    async with dl.session(world.a.owner) as db:
        share = await db.workflows.share(world.private, user_id=world.member.user_id)
    try:
        assert [h.id for h in await search(dl, world.member, "invoice")] == [world.private]
        assert await search(dl, world.other, "invoice") == []
        # The fuzzy path applies the same rule.
        assert [h.id for h in await search(dl, world.member, "invoce reconcilation",
                                           fuzzy=True)] == [world.private]
        assert await search(dl, world.other, "invoce reconcilation", fuzzy=True) == []
    finally:
        async with dl.session(world.a.owner) as db:
            await db.workflows.unshare(share.id)


async def test_hostile_text_is_never_tsquery_syntax(dl: DataLayer, world: World) -> None:
    async with dl.session(world.member, readonly=True) as db:
        assert await db.search.tsquery("a & b | !c <-> (d") == "'a':* & 'b':* & 'c':* & 'd':*"
        assert await db.search.tsquery("it's \\ 'x':*") == "'it':* & 's':* & 'x':*"
        assert await db.search.tsquery("  !!! ") is None
        for text in ("", "   ", "&|!", "':*", "\\", "(((", "slack:*A", "'; DROP TABLE x; --"):
            await db.search.query(text)


@given(text=st.text(max_size=300))
@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
async def test_any_text_searches_without_error(dl: DataLayer, world: World, text: str) -> None:
    if "\x00" in text:
        text = text.replace("\x00", "")
    await search(dl, world.member, text)


async def test_fuzzy_fallback_when_nothing_matches(dl: DataLayer, settings: Settings,
                                                   world: World) -> None:
    assert dl.search_fuzzy  # pg_trgm is installed on the test server
    hits = await search(dl, world.member, "slak notifcation")
    assert [h.id for h in hits][:1] == [world.slack] and hits[0].fuzzy
    assert await search(dl, world.member, "slak notifcation", fuzzy=False) == []
    assert world.secret_b not in {h.id for h in await search(dl, world.member, "slak secrt")}
    # Turned off by the setting: the same search degrades to "no match".
    async with make_layer(dataclasses.replace(settings, search_fuzzy=False,
                                              migrate_on_start=False)) as off:
        assert not off.search_fuzzy
        assert await search(off, world.member, "slak notifcation") == []
        assert [h.id for h in await search(off, world.member, "slack notif")] == [world.slack]


@pytest.fixture(scope="module")
async def no_trgm_url() -> AsyncIterator[str]:
    """A database of its own, migrated, then without pg_trgm (as if it were unavailable)."""
    name = f"dl_test_{RUN_ID}_notrgm"
    url = await asyncio.to_thread(create_database, name)
    try:
        await asyncio.to_thread(migrations.apply, make_settings(url), resource_dir("schema"))
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("DROP EXTENSION pg_trgm CASCADE")
        finally:
            await conn.close()
        yield url
    finally:
        await asyncio.to_thread(drop_database, name)


async def test_without_pg_trgm_search_degrades_cleanly(no_trgm_url: str) -> None:
    async with make_layer(make_settings(no_trgm_url, migrate_on_start=False)) as dl:
        assert not dl.search_fuzzy
        org, owner = uuid.uuid4(), uuid.uuid4()
        ctx = Context(org, user_id=owner, role="owner")
        async with dl.session(ctx) as db:
            await db.orgs.create(slug=f"nt-{org.hex[:12]}", name="No trigram")
            await db.users.create(email=f"nt-{owner.hex[:12]}@example.test")
            await db.memberships.add(owner, "owner")
            wf = await db.workflows.create("Slack notification sender")
        assert [h.id for h in await search(dl, ctx, "slack not")] == [wf.id]
        assert await search(dl, ctx, "slak notifcation") == []
        assert await search(dl, ctx, "slak notifcation", fuzzy=True) == []


# -- plans: as datalayer_app, the statements inside app.search use the GIN indexes ----------

async def test_explain_as_app_role_uses_the_gin_indexes(dl: DataLayer, world: World,
                                                        admin_conn: asyncpg.Connection) -> None:
    # Enough rows in A that a sequential scan would be the plan without the index.
    await admin_conn.execute("""
      INSERT INTO workflows (org_id, name, description, owner_id, content_hash)
      SELECT $1, 'bulk ' || g || ' ' || md5(g::text), 'filler text ' || g, $2, '\\x00'
      FROM generate_series(1, 3000) g""", world.a.org_id, world.a.owner_id)
    wf = await admin_conn.fetchval("SELECT workflow_id FROM executions WHERE org_id = $1 "
                                   "AND id = $2", world.a.org_id, world.failed)
    # Waiting executions: never claimed by other tests' workers, no statistics to record.
    await admin_conn.execute(
        "INSERT INTO executions (org_id, workflow_id, workflow_version, status) "
        "SELECT $1, $2, 1, 'waiting' FROM generate_series(1, 20000) g", world.a.org_id, wf)
    await admin_conn.execute(
        "INSERT INTO notifications (org_id, user_id, type, title) "
        "SELECT $1, $2, 'bulk', 'bulk note ' || md5(g::text) FROM generate_series(1, 20000) g",
        world.a.org_id, world.member.user_id)
    await admin_conn.execute("ANALYZE workflows; ANALYZE notifications; ANALYZE executions")
    q = dl.registry["search.query"]
    # Notifications: 20,000 of one user's, where a sequential scan or the user's list index
    # is as cheap; with sequential scans off, an index of the recipient's rows is enough
    # (a user's notifications are bounded by expiry; the GIN index serves larger sets).
    for text, kinds, indexes, no_seqscan in (
            ("slack notif", ["workflow"], ("workflows_search_idx",), False),
            ("gateway", ["execution"], ("executions_error_search_idx",), False),
            ("budget", ["notification"], ("notifications_",), True),
            ("slak notifcation", ["workflow"], ("workflows_name_trgm_idx",), False)):
        args = q.bind({"text": text, "kinds": kinds, "limit": 10, "fuzzy": True})
        plans = await nested_plans(dl.settings.database_url, world.member, q.sql, args,
                                   analyze=True, no_seqscan=no_seqscan)
        used = {n.get("Index Name") for p in plans for n in plan_nodes(p)}
        assert any(str(u).startswith(indexes) for u in used), (text, used)
        scanned = {n.get("Relation Name") for p in plans for n in plan_nodes(p)
                   if n["Node Type"] == "Seq Scan"}
        assert not scanned & {"workflows", "executions", "notifications"}, (text, scanned)


async def test_plain_rls_query_cannot_use_the_index(dl: DataLayer, world: World) -> None:
    """The problem app.search solves: the same match as a tenant query under RLS is a
    filter over the organization's rows, never an index condition, even when told to."""
    conn = await asyncpg.connect(dl.settings.database_url)
    try:
        await conn.execute("SET enable_seqscan = off")
        await conn.execute(world.member.session_sql)
        raw = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) SELECT id FROM workflows WHERE org_id = app.org_id() "
            "AND search @@ app.search_tsquery('slack')")
    finally:
        await conn.close()
    plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
    conds = " ".join(str(n.get("Index Cond", "")) for n in plan_nodes(plan))
    assert "@@" not in conds


async def test_audit_events_are_a_kind_for_those_who_may_read_the_trail(
    dl: DataLayer, world: World,
) -> None:
    """An audit event is found by its action, resource and details by the roles that may read
    the audit trail (not viewers), in its own organization only; personal values are never
    indexed."""
    tag = uuid.uuid4().hex[:10]
    async with dl.session(world.a.owner) as db:
        ev = await db.audit.record("data.export", resource_type="report",
                                   resource_id=f"ledger-{tag}",
                                   details={"format": f"csv{tag}"},
                                   personal={"recipient": f"alice-{tag}@example.test"})
    hits = await search(dl, world.a.owner, f"ledger-{tag}", kinds=["audit"])
    assert [(h.kind, h.id) for h in hits] == [("audit", ev.id)]
    assert "export" in hits[0].snippet
    assert [h.id for h in await search(dl, world.a.owner, f"csv{tag}")] == [ev.id]
    assert [h.id for h in await search(dl, world.member, "data export", kinds=["audit"])]
    assert await search(dl, world.a.ctx("viewer", user_id=uuid.uuid4()), f"csv{tag}") == []
    assert await search(dl, world.b.owner, f"csv{tag}") == []  # another tenant
    assert await search(dl, world.a.owner, f"alice-{tag}") == []  # personal: not indexed
