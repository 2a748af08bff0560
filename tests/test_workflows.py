"""Workflows: versions, visibility and shares (RLS), templates, tags, search, stats, export."""

from __future__ import annotations

import asyncio
import io
import json
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from datalayer import (
    Conflict,
    Context,
    DataLayer,
    NotFound,
    PermissionDenied,
    Session,
    ValidationError,
)
from datalayer.core import migrations
from datalayer.core.errors import translate
from datalayer.core.resources import resource_dir
from datalayer.repos._base import LAST
from datalayer.repos.workflow_format import FORMAT, parse_document
from datalayer.repos.workflows import Workflow
from datalayer.seed import SeedPlan, seed, user_id
from tests.conftest import (
    RUN_ID,
    MemberFactory,
    Tenant,
    TenantFactory,
    create_database,
    drop_database,
    make_settings,
    plan_nodes,
)

NODES = [
    {"id": "start", "type": "trigger", "position": {"x": 0, "y": 0}, "data": {"label": "Start"}},
    {"id": "llm", "type": "llm", "position": {"x": 200, "y": 0},
     "data": {"model": "gpt", "temperature": 0.2}},
    {"id": "end", "type": "output", "position": {"x": 400.5, "y": -10}, "data": {}},
]
EDGES = [{"id": "e1", "source": "start", "target": "llm"},
         {"id": "e2", "source": "llm", "target": "end"}]


async def _raw(db: Session, sql: str, *args: object) -> str:
    """A raw statement on the session's connection, errors mapped like the registry's."""
    try:
        status: str = await db.connection.execute(sql, *args)
    except asyncpg.PostgresError as exc:
        err = translate(exc)
        assert err is not None
        raise err from exc
    return status


async def _record(db: Session, wf: Workflow, status: str, duration_ms: int | None) -> None:
    """What the executions trigger does when an execution finishes."""
    await _raw(db, "SELECT app.workflow_stats_record($1, $2, $3, $4)", wf.org_id, wf.id,
               status, duration_ms)


# -- versions ------------------------------------------------------------------------------

async def test_create_records_version_one(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        wf = await db.workflows.create("Triage", description="sorts tickets", nodes=NODES,
                                       edges=EDGES, settings={"timeout_s": 30},
                                       tags=["Support", "llm"])
        v1 = await db.workflows.get_version(wf.id, 1)
    assert (wf.org_id, wf.owner_id, wf.current_version) == (t.org_id, t.owner_id, 1)
    assert (wf.nodes, wf.edges, wf.settings) == (NODES, EDGES, {"timeout_s": 30})
    assert wf.tags == ["support", "llm"]  # normalized
    assert (wf.status, wf.visibility, wf.is_template, wf.team_id) == (
        "draft", "organization", False, None)
    assert v1 is not None
    assert (v1.nodes, v1.edges, v1.settings, v1.created_by) == (NODES, EDGES,
                                                                 {"timeout_s": 30}, t.owner_id)
    assert v1.content_hash == wf.content_hash and len(wf.content_hash) == 32


async def test_content_changes_make_versions_and_metadata_does_not(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    """Nodes, edges or settings: a new version; name, description, status, tags: none; the
    same content again: none; restore: a new version equal to the old one."""
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        wf = await db.workflows.create("Flow", nodes=NODES[:1])
        wf = await db.workflows.update(wf.id, name="Renamed", description="d", status="active",
                                       tags=["x"])
        assert wf.current_version == 1
        wf = await db.workflows.update(wf.id, nodes=NODES, edges=EDGES)
        assert wf.current_version == 2
        same = await db.workflows.update(wf.id, nodes=NODES, edges=EDGES, settings={})
        assert (same.current_version, same.content_hash) == (2, wf.content_hash)
        wf = await db.workflows.update(wf.id, settings={"retries": 3})
        assert wf.current_version == 3
        v2_before = await db.workflows.get_version(wf.id, 2)
        restored = await db.workflows.restore(wf.id, 1)
        assert restored.current_version == 4
        assert (restored.nodes, restored.edges, restored.settings) == (NODES[:1], [], {})
        again = await db.workflows.restore(wf.id, 4)  # already current: no new version
        assert again.current_version == 4
        page = await db.workflows.versions(wf.id)
        v1, v2, v4 = [await db.workflows.get_version(wf.id, n) for n in (1, 2, 4)]
        with pytest.raises(NotFound, match="version 9"):
            await db.workflows.restore(wf.id, 9)
    assert [v.version for v in page.items] == [4, 3, 2, 1]
    assert v1 is not None and v4 is not None and v2 == v2_before
    assert (v4.nodes, v4.edges, v4.settings, v4.content_hash) == (
        v1.nodes, v1.edges, v1.settings, v1.content_hash)


async def test_versions_page_by_version(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        wf = await db.workflows.create("Many")
        for i in range(6):
            await db.workflows.update(wf.id, settings={"i": i})
        first = await db.workflows.versions(wf.id, limit=4)
        assert first.next == (4,)
        rest = await db.workflows.versions(wf.id, after=first.next[0], limit=4)
    assert [v.version for v in first.items + rest.items] == [7, 6, 5, 4, 3, 2, 1]
    assert rest.next is None


async def test_optimistic_concurrency_with_expected_version(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        wf = await db.workflows.create("Opt")
        await db.workflows.update(wf.id, settings={"a": 1}, expected_version=1)
    with pytest.raises(Conflict, match="version 2, not 1"):
        async with dl.session(t.owner) as db:
            await db.workflows.update(wf.id, settings={"a": 2}, expected_version=1)
    async with dl.session(t.owner) as db:
        missing = uuid.uuid4()
        with pytest.raises(NotFound):
            await db.workflows.update(missing, name="x")


@pytest.mark.parametrize("writers", [2, 8])
async def test_concurrent_saves_make_consecutive_versions(
    dl: DataLayer, make_tenant: TenantFactory, admin_conn: asyncpg.Connection, writers: int,
) -> None:
    """Saves of one workflow from concurrent transactions queue on its row lock: version
    numbers 2..N+1, no gap, no duplicate, each save's content in exactly one version."""
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        wf = await db.workflows.create("Hot")
    holding = asyncio.Event()
    release = asyncio.Event()

    async def save(i: int) -> int:
        async with dl.session(t.owner) as db:
            if i == 0:  # hold the row lock until the others are waiting on it
                saved = await db.workflows.update(wf.id, settings={"writer": i})
                holding.set()
                await release.wait()
                return saved.current_version
            await holding.wait()
            return (await db.workflows.update(wf.id, settings={"writer": i})).current_version

    tasks = [asyncio.create_task(save(i)) for i in range(writers)]
    await holding.wait()
    for _ in range(200):  # until every other writer is blocked on the lock
        waiting = await admin_conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")
        if waiting >= writers - 1:
            break
        await asyncio.sleep(0.01)
    assert waiting >= writers - 1, "the concurrent saves never overlapped"
    release.set()
    numbers = await asyncio.gather(*tasks)
    assert sorted(numbers) == list(range(2, writers + 2))
    rows = await admin_conn.fetch(
        "SELECT version, settings FROM workflow_versions WHERE org_id = $1 "
        "AND workflow_id = $2 ORDER BY version", t.org_id, wf.id)
    assert [r["version"] for r in rows] == list(range(1, writers + 2))
    writers_seen = sorted(json.loads(r["settings"])["writer"] for r in rows[1:])
    assert writers_seen == list(range(writers))
    assert await admin_conn.fetchval(
        "SELECT current_version FROM workflows WHERE org_id = $1 AND id = $2",
        t.org_id, wf.id) == writers + 1


async def test_versions_are_immutable_even_with_raw_sql(
    dl: DataLayer, make_tenant: TenantFactory, admin_conn: asyncpg.Connection,
) -> None:
    """The run-time role has no write privilege on workflow_versions; even a superuser
    cannot UPDATE a version, nor DELETE one while its workflow exists."""
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        wf = await db.workflows.create("Immutable", nodes=NODES[:1])
        await db.workflows.update(wf.id, settings={"v": 2})
    statements = [
        ("UPDATE workflow_versions SET settings = '{}' WHERE workflow_id = $1", (wf.id,)),
        ("DELETE FROM workflow_versions WHERE workflow_id = $1", (wf.id,)),
        ("INSERT INTO workflow_versions (org_id, workflow_id, version, nodes, edges, settings,"
         " content_hash) VALUES ($1, $2, 3, '[]', '[]', '{}', '\\x00')", (t.org_id, wf.id)),
        ("UPDATE workflows SET current_version = 1 WHERE id = $1", (wf.id,)),
    ]
    for sql, args in statements:
        with pytest.raises(PermissionDenied):
            async with dl.session(t.owner) as db:
                await _raw(db, sql, *args)
    for sql, args in statements[:3]:
        with pytest.raises(PermissionDenied):
            async with dl.system() as db:  # the maintenance role neither
                await _raw(db, sql, *args)
    async with dl.system() as db:  # the trigger owns current_version
        assert await _raw(db, statements[3][0], wf.id) == "UPDATE 1"
    for sql in statements[0][0], statements[1][0]:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="versions"):
            await admin_conn.execute(sql, wf.id)
    before = await admin_conn.fetch(
        "SELECT version, settings, content_hash FROM workflow_versions WHERE workflow_id = $1 "
        "ORDER BY version", wf.id)
    assert [r["version"] for r in before] == [1, 2]
    assert await admin_conn.fetchval("SELECT current_version FROM workflows WHERE id = $1",
                                     wf.id) == 2
    async with dl.session(t.owner) as db:
        assert await db.workflows.delete(wf.id, hard=True)
    assert await admin_conn.fetchval(
        "SELECT count(*) FROM workflow_versions WHERE workflow_id = $1", wf.id) == 0


# -- visibility and shares (RLS) ------------------------------------------------------------------

@dataclass
class Org:
    t: Tenant
    alice: Context  # member, in the team, owns the workflows
    bob: Context  # member, in the team
    carol: Context  # member, not in the team
    vic: Context  # viewer, not in the team
    admin: Context
    team: uuid.UUID


async def _org(dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory) -> Org:
    t = await make_tenant()
    alice, bob, carol = [await add_member(t, "member") for _ in range(3)]
    vic, admin = await add_member(t, "viewer"), await add_member(t, "admin")
    async with dl.session(t.owner) as db:
        team = await db.teams.create(f"Team {uuid.uuid4().hex[:6]}")
        for m in (alice, bob):
            assert m.user_id is not None
            await db.teams.add_member(team.id, m.user_id)
    return Org(t, alice, bob, carol, vic, admin, team.id)


async def test_visibility_matrix(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    """private / team / organization / public template, seen by: owner, team member, other
    member, viewer, admin, another organization."""
    o = await _org(dl, make_tenant, add_member)
    other = await make_tenant()
    ids: dict[str, uuid.UUID] = {}
    async with dl.session(o.alice) as db:
        for vis in ("private", "team", "organization"):
            ids[vis] = (await db.workflows.create(
                f"{vis} flow", visibility=vis, team_id=o.team if vis == "team" else None)).id
    async with dl.session(o.admin) as db:  # publishing is for admins; the owner is alice
        ids["public"] = (await db.workflows.create(
            "public template", visibility="public", is_template=True,
            owner_id=o.alice.user_id)).id
    expected = {
        "alice": {"private", "team", "organization", "public"},
        "bob": {"team", "organization", "public"},
        "carol": {"organization", "public"},
        "vic": {"organization", "public"},
        "admin": {"private", "team", "organization", "public"},
        "other": set(),  # reads public templates from the catalog only (below)
    }
    contexts = {"alice": o.alice, "bob": o.bob, "carol": o.carol, "vic": o.vic,
                "admin": o.admin, "other": other.owner}
    for who, ctx in contexts.items():
        async with dl.session(ctx, readonly=True) as db:
            seen = {vis for vis, wid in ids.items()
                    if await db.connection.fetchval("SELECT count(*) FROM workflows WHERE id = $1",
                                                    wid) == 1}
            listed = {w.id for w in (await db.workflows.list(limit=1000)).items}
            got = {vis for vis, wid in ids.items() if await db.workflows.get(wid) is not None}
            templates = {vis for vis, wid in ids.items()
                         if await db.workflows.get_template(wid) is not None}
        assert seen == got == expected[who], who
        assert listed == {ids[v] for v in expected[who]}, who
        assert templates == {"public"}, who


async def test_public_templates_are_readable_never_writable_across_orgs(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    async with dl.session(a.owner) as db:
        tpl = await db.workflows.create("Shared template", nodes=NODES, edges=EDGES,
                                        tags=["starter"], is_template=True,
                                        visibility="public")
        private_tpl = await db.workflows.create("Own template", is_template=True)
        await _record(db, tpl, "succeeded", 10)
    async with dl.session(b.owner) as db:
        seen = await db.workflows.get_template(tpl.id)
        assert seen is not None
        assert (seen.org_id, seen.id, seen.name, seen.nodes, seen.edges, seen.tags) == (
            a.org_id, tpl.id, tpl.name, NODES, EDGES, ["starter"])
        assert await db.workflows.get_template(private_tpl.id) is None
        assert await db.workflows.get(tpl.id) is None  # not a workflow of B's
        assert tpl.id in {w.id for w in (await db.workflows.public_templates(limit=1000)).items}
        copy = await db.workflows.instantiate(tpl.id, name="Mine now")
        assert (await db.workflows.versions(tpl.id)).items == []
        assert await db.workflows.stats(tpl.id) is None
        assert await db.workflows.export(copy.id, history=False)
        with pytest.raises(NotFound):
            async with db.savepoint():
                await db.workflows.instantiate(private_tpl.id)
        for sql in ("UPDATE workflows SET name = 'hijacked' WHERE id = $1",
                    "UPDATE workflows SET nodes = '[]' WHERE id = $1",
                    "DELETE FROM workflows WHERE id = $1"):
            assert await db.connection.execute(sql, tpl.id) in ("UPDATE 0", "DELETE 0")
        for table, col in (("workflows", "id"), ("workflow_versions", "workflow_id"),
                           ("workflow_stats", "workflow_id"), ("workflow_shares", "workflow_id")):
            assert await db.connection.fetchval(
                f"SELECT count(*) FROM {table} WHERE {col} = $1", tpl.id) == 0
        with pytest.raises(PermissionDenied):  # nobody writes the catalog
            async with db.savepoint():
                await _raw(db, "UPDATE workflow_public_templates SET name = 'x' "
                           "WHERE workflow_id = $1", tpl.id)
    assert (copy.org_id, copy.owner_id, copy.is_template, copy.status) == (
        b.org_id, b.owner_id, False, "draft")
    assert (copy.nodes, copy.edges, copy.tags, copy.current_version) == (
        NODES, EDGES, ["starter"], 1)
    row = await admin_conn.fetchrow("SELECT name, current_version FROM workflows WHERE id = $1",
                                    tpl.id)
    assert row is not None and tuple(row) == ("Shared template", 1)  # B changed nothing
    async with dl.session(Context(None), readonly=True) as db:
        assert await db.connection.fetchval("SELECT count(*) FROM workflows") == 0
        assert await db.connection.fetchval("SELECT count(*) FROM workflow_public_templates") == 0
    async with dl.session(a.owner) as db:  # the catalog follows the template's content
        await db.workflows.update(tpl.id, name="Shared template v2", settings={"v": 2})
    async with dl.session(b.owner, readonly=True) as db:
        seen = await db.workflows.get_template(tpl.id)
    assert seen is not None and (seen.name, seen.settings, seen.current_version) == (
        "Shared template v2", {"v": 2}, 2)
    async with dl.session(a.owner) as db:
        await db.workflows.update(tpl.id, name="Shared template")
    member = await add_member(a, "member")
    with pytest.raises(PermissionDenied, match="admin may publish"):  # publishing: admins
        async with dl.session(member) as db:
            await db.workflows.create("leak", is_template=True, visibility="public")
    async with dl.session(a.owner) as db:
        assert await db.workflows.delete(tpl.id)
    async with dl.session(b.owner) as db:  # a deleted template is gone everywhere else
        assert await db.workflows.get_template(tpl.id) is None


async def test_shares_grant_view_or_edit(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    o = await _org(dl, make_tenant, add_member)
    assert o.carol.user_id and o.vic.user_id and o.bob.user_id
    async with dl.session(o.alice) as db:
        wf = await db.workflows.create("Secret", visibility="private", nodes=NODES[:1])
        view = await db.workflows.share(wf.id, user_id=o.carol.user_id)
        await db.workflows.share(wf.id, user_id=o.vic.user_id, permission="edit")
    async with dl.session(o.carol, readonly=True) as db:
        assert await db.workflows.get(wf.id) is not None
        assert [s.id for s in await db.workflows.shares(wf.id)] == [view.id]  # only hers
    with pytest.raises(PermissionDenied, match="may read"):
        async with dl.session(o.carol) as db:
            await db.workflows.update(wf.id, name="nope")
    with pytest.raises(PermissionDenied):  # only the owner and admins share
        async with dl.session(o.carol) as db:
            await db.workflows.share(wf.id, user_id=o.bob.user_id)
    async with dl.session(o.vic, readonly=True) as db:
        assert await db.workflows.get(wf.id) is not None
    with pytest.raises(PermissionDenied):  # an edit share does not make a viewer a writer
        async with dl.session(o.vic) as db:
            await db.workflows.update(wf.id, name="nope")
    async with dl.session(o.alice) as db:
        await db.workflows.share(wf.id, user_id=o.carol.user_id, permission="edit")
        await db.workflows.share(wf.id, team_id=o.team, permission="edit")
        assert len(await db.workflows.shares(wf.id)) == 3
    async with dl.session(o.carol) as db:
        edited = await db.workflows.update(wf.id, nodes=NODES, edges=EDGES)
        assert edited.current_version == 2
        v2 = await db.workflows.get_version(wf.id, 2)
        assert v2 is not None and v2.created_by == o.carol.user_id
        assert not await db.workflows.delete(wf.id, hard=True)  # DELETE policy: owner, admins
    with pytest.raises(PermissionDenied, match="only the owner"):  # an editor's soft delete
        async with dl.session(o.carol) as db:
            await db.workflows.delete(wf.id)
    for change in ({"visibility": "organization"}, {"is_template": True}):
        with pytest.raises(PermissionDenied, match="only the owner"):
            async with dl.session(o.carol) as db:
                await db.workflows.update(wf.id, **change)
    with pytest.raises(PermissionDenied, match="only the owner"):
        async with dl.session(o.carol) as db:
            await db.workflows.transfer(wf.id, o.carol.user_id)
    async with dl.session(o.bob) as db:  # through the team's edit share
        assert (await db.workflows.update(wf.id, settings={"by": "bob"})).current_version == 3
    async with dl.session(o.alice) as db:
        assert await db.workflows.unshare(view.id)
        await db.workflows.set_team(wf.id, None)
        for s in await db.workflows.shares(wf.id):
            if s.team_id is not None:
                assert await db.workflows.unshare(s.id)
    async with dl.session(o.bob, readonly=True) as db:
        assert await db.workflows.get(wf.id) is None
    with pytest.raises(PermissionDenied):  # she would lose sight of her private workflow
        async with dl.session(o.alice) as db:
            await db.workflows.transfer(wf.id, o.carol.user_id)
    async with dl.session(o.alice) as db:
        assert o.alice.user_id is not None
        await db.workflows.share(wf.id, user_id=o.alice.user_id, permission="edit")
        await db.workflows.transfer(wf.id, o.carol.user_id)
        assert await db.workflows.get(wf.id) is not None  # through her share
    async with dl.session(o.carol, readonly=True) as db:
        moved = await db.workflows.get(wf.id)
        assert moved is not None and moved.owner_id == o.carol.user_id
    with pytest.raises(ValidationError, match="member of its organization"):
        async with dl.session(o.carol) as db:
            await db.workflows.transfer(wf.id, uuid.uuid4())


async def test_team_assignment_needs_team_membership(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    o = await _org(dl, make_tenant, add_member)
    with pytest.raises(PermissionDenied, match="members of a team"):
        async with dl.session(o.carol) as db:
            await db.workflows.create("x", team_id=o.team, visibility="team")
    async with dl.session(o.bob) as db:
        wf = await db.workflows.create("y", team_id=o.team, visibility="team")
    async with dl.session(o.t.owner) as db:  # deleting the team leaves the workflow teamless
        assert await db.teams.delete(o.team)
    async with dl.session(o.bob, readonly=True) as db:
        after = await db.workflows.get(wf.id)
    assert after is not None and after.team_id is None and after.visibility == "team"
    async with dl.session(o.carol, readonly=True) as db:
        assert await db.workflows.get(wf.id) is None


async def test_viewer_and_read_only_cannot_write(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    viewer = await add_member(t, "viewer")
    with pytest.raises(PermissionDenied):
        async with dl.session(viewer) as db:
            await db.workflows.create("nope")
    async with dl.session(t.owner) as db:
        wf = await db.workflows.create("Org flow")
    for ctx in (viewer, t.owner.with_(read_only=True)):
        with pytest.raises(PermissionDenied):
            async with dl.session(ctx) as db:
                await db.workflows.update(wf.id, name="nope")
    async with dl.session(viewer) as db:  # RLS: nothing to delete
        assert not await db.workflows.delete(wf.id)
    with pytest.raises(PermissionDenied, match="read-only"):
        async with dl.session(t.owner.with_(read_only=True)) as db:
            await db.workflows.delete(wf.id)


# -- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"nodes": {"id": "a"}}, r"^nodes: must be a list"),
    ({"nodes": [{"type": "x"}]}, r"^nodes\[0\]\.id: must be a non-empty string"),
    ({"nodes": [{"id": "a", "type": "x"}, {"id": "a", "type": "y"}]},
     r"^nodes\[1\]\.id: duplicate node id 'a'"),
    ({"nodes": [{"id": "a", "type": ""}]}, r"^nodes\[0\]\.type: must be a non-empty string"),
    ({"nodes": [{"id": "a", "type": "x", "position": {"x": "1", "y": 2}}]},
     r"^nodes\[0\]\.position\.x: must be a finite number"),
    ({"nodes": [{"id": "a", "type": "x", "data": {"v": math.nan}}]},
     r"^nodes\[0\]\.data\.v: numbers must be finite"),
    ({"nodes": [{"id": "a", "type": "x", "data": {"s": "a\x00b"}}]}, r"NUL"),
    ({"nodes": [{"id": "a", "type": "x"}], "edges": [{"source": "a", "target": "b"}]},
     r"^edges\[0\]\.target: no node has id 'b'"),
    ({"edges": [{"source": "a"}]}, r"^edges\[0\]\.source: no node has id 'a'"),
    ({"settings": {"big": 2**70}}, r"^settings\.big: integers must be between"),
    ({"tags": ["ok", "Not OK"]}, r"^tags\[1\]: 'Not OK' must be 1-50 characters"),
    ({"tags": "abc"}, r"^tags: must be a list"),
    ({"status": "running"}, r"^status: must be one of draft"),
    ({"visibility": "public"}, r"only templates can be public"),
    ({"visibility": "team"}, r"'team' needs a team_id"),
    ({"name": ""}, r"^name: must be 1-200"),
])
async def test_create_refuses_bad_content_naming_the_field(
    dl: DataLayer, make_tenant: TenantFactory, kwargs: dict[str, Any], message: str,
) -> None:
    t = await make_tenant()
    args = {"name": "Bad"} | kwargs
    with pytest.raises(ValidationError, match=message):
        async with dl.session(t.owner) as db:
            await db.workflows.create(**args)


async def test_database_checks_graph_and_tags_too(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    """Raw SQL skips the Python checks; the CHECK constraints still refuse."""
    t = await make_tenant()
    cases = {
        "workflows_graph_valid": ('[{"id": "a", "type": "x"}]',
                                  '[{"source": "a", "target": "zz"}]', "{}"),
        "workflows_tags_valid": ("[]", "[]", "{}"),
        "workflows_settings_object": ("[]", "[]", "[]"),
    }
    for constraint, (nodes, edges, settings) in cases.items():
        tags = ["Upper Case"] if constraint == "workflows_tags_valid" else []
        with pytest.raises(ValidationError) as err:
            async with dl.session(t.owner) as db:
                await _raw(
                    db,
                    "INSERT INTO workflows (org_id, name, owner_id, nodes, edges, settings, tags)"
                    " VALUES ($1, 'raw', $2, $3::text::jsonb, $4::text::jsonb, $5::text::jsonb,"
                    " $6)", t.org_id, t.owner_id, nodes, edges, settings, tags)
        assert err.value.constraint == constraint
    async with dl.session(t.owner) as db:
        wf = await db.workflows.create("ok", nodes=NODES, edges=EDGES)
    with pytest.raises(ValidationError) as verr:  # edges left pointing at removed nodes
        async with dl.session(t.owner) as db:
            await db.workflows.update(wf.id, nodes=NODES[:1])
    assert verr.value.constraint == "workflows_graph_valid"


# -- lists, tags, search ---------------------------------------------------------------------

async def test_list_keyset_pagination_and_filters(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    member = await add_member(t, "member")
    async with dl.session(t.owner) as db:
        team = await db.teams.create("Ops")
    made = []
    for i in range(7):  # one transaction each: distinct updated_at
        async with dl.session(t.owner) as db:
            made.append(await db.workflows.create(
                f"w{i}", status="active" if i % 2 else "draft",
                team_id=team.id if i % 3 == 0 else None, is_template=i == 4))
    async with dl.session(t.owner) as db:
        gone = await db.workflows.create("deleted")
        assert await db.workflows.delete(gone.id)
    async with dl.session(member) as db:
        mine = await db.workflows.create("member's")
    async with dl.session(t.owner, readonly=True) as db:
        pages, after = [], None
        while True:
            page = await db.workflows.list(after=after, limit=3)
            pages.append([w.id for w in page.items])
            if page.next is None:
                break
            after = page.next
        active = await db.workflows.list(status="active")
        teamed = await db.workflows.list(team_id=team.id)
        by_member = await db.workflows.list(owner_id=member.user_id)
        templates = await db.workflows.list(is_template=True)
    newest_first = [mine.id] + [w.id for w in reversed(made)]
    assert [len(p) for p in pages] == [3, 3, 2]
    assert [i for p in pages for i in p] == newest_first
    assert {w.id for w in active.items} == {made[i].id for i in (1, 3, 5)}
    assert {w.id for w in teamed.items} == {made[i].id for i in (0, 3, 6)}
    assert [w.id for w in by_member.items] == [mine.id]
    assert [w.id for w in templates.items] == [made[4].id]
    with pytest.raises(ValidationError, match="limit"):
        async with dl.session(t.owner, readonly=True) as db:
            await db.workflows.list(limit=0)


async def test_find_by_any_or_all_tags(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        ab = await db.workflows.create("ab", tags=["a", "b"])
        bc = await db.workflows.create("bc", tags=["b", "c"])
        c = await db.workflows.create("c", tags=["C "])
        await db.workflows.create("none")
        any_ac = await db.workflows.find_by_tags(["a", "c"])
        all_bc = await db.workflows.find_by_tags(["b", "c"], match="all")
        one_b = await db.workflows.list(tag="B")
        b_and_status = await db.workflows.list(tag="b", tags_any=["c", "zzz"])
        with pytest.raises(ValidationError, match="at least one tag"):
            await db.workflows.find_by_tags([])
    assert {w.id for w in any_ac.items} == {ab.id, bc.id, c.id}
    assert [w.id for w in all_bc.items] == [bc.id]
    assert {w.id for w in one_b.items} == {ab.id, bc.id}
    assert [w.id for w in b_and_status.items] == [bc.id]


async def test_search_ranks_name_over_description_over_tags(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t, other = await make_tenant(), await make_tenant()
    member = await add_member(t, "member")
    async with dl.session(t.owner) as db:
        by_tag = await db.workflows.create("Ledger sync", tags=["invoice"])
        by_name = await db.workflows.create("Invoice approval", description="approves spend")
        by_desc = await db.workflows.create("Month end", description="sends each invoice out")
        both = await db.workflows.create("Invoice reminders",
                                         description="reminds about an overdue invoice")
        refund = await db.workflows.create("Invoice refunds", description="refund flow")
        await db.workflows.create("Unrelated", description="nothing here")
        hidden = await db.workflows.create("Invoice private", visibility="private")
    async with dl.session(other.owner) as db:
        await db.workflows.create("Invoice elsewhere")
    async with dl.session(member, readonly=True) as db:
        hits = await db.workflows.search("invoice", limit=100)
        first = await db.workflows.search("invoice", limit=2)
        rest = await db.workflows.search("invoice", after=first.next, limit=100)
        not_refund = await db.workflows.search("invoice -refunds", limit=100)
        phrase = await db.workflows.search('"invoice approval"', limit=100)
        with pytest.raises(ValidationError, match="query"):
            await db.workflows.search("  ")
    ranked = [h.id for h in hits.items]
    assert set(ranked) == {by_tag.id, by_name.id, by_desc.id, both.id, refund.id}
    assert hidden.id not in ranked  # private: RLS
    assert ranked[0] == both.id  # A and B
    assert ranked.index(by_name.id) < ranked.index(by_desc.id) < ranked.index(by_tag.id)
    assert all(x.rank >= y.rank for x, y in zip(hits.items, hits.items[1:], strict=False))
    assert [h.id for h in first.items + rest.items] == ranked
    assert refund.id not in {h.id for h in not_refund.items}
    assert [h.id for h in phrase.items] == [by_name.id]


# -- statistics ------------------------------------------------------------------------------

def _nearest_rank(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


async def test_stats_from_running_totals(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant()
    viewer, member = await add_member(t, "viewer"), await add_member(t, "member")
    durations = [10 * i for i in range(1, 101)]  # 10 .. 1000 ms
    async with dl.session(t.owner) as db:
        wf = await db.workflows.create("Measured", visibility="private")
        empty = await db.workflows.stats(wf.id)
        for i, d in enumerate(durations):
            await _record(db, wf, "succeeded" if i % 4 else "failed", d)
        await _record(db, wf, "timed_out", None)
        await _record(db, wf, "cancelled", None)
        with pytest.raises(ValidationError, match="status must be"):
            async with db.savepoint():
                await _record(db, wf, "running", 5)
        stats = await db.workflows.stats(wf.id)
    assert empty is not None and (empty.executions, empty.success_rate,
                                  empty.p95_duration_ms) == (0, None, None)
    assert stats is not None
    assert (stats.executions, stats.successes, stats.failures, stats.cancellations) == (
        102, 75, 26, 1)
    assert stats.success_rate == pytest.approx(75 / 101)
    assert stats.avg_duration_ms == pytest.approx(sum(durations) / 100)
    assert (stats.min_duration_ms, stats.max_duration_ms) == (10, 1000)
    exact = _nearest_rank(durations, 0.95)
    assert stats.p95_duration_ms is not None
    assert abs(stats.p95_duration_ms - exact) <= 0.19 * exact, (stats.p95_duration_ms, exact)
    assert stats.last_execution_at is not None
    with pytest.raises(PermissionDenied):  # viewers execute nothing
        async with dl.session(viewer) as db:
            await _record(db, wf, "succeeded", 1)
    async with dl.session(member, readonly=True) as db:  # private workflow, private stats
        assert await db.workflows.stats(wf.id) is None
        assert await db.connection.fetchval("SELECT count(*) FROM workflow_stats "
                                            "WHERE workflow_id = $1", wf.id) == 0


@hsettings(max_examples=60, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(durations=st.lists(st.one_of(st.integers(0, 5), st.integers(0, 2**27 - 1)),
                          min_size=1, max_size=300),
       q=st.sampled_from([0.5, 0.9, 0.95, 0.99]))
async def test_histogram_quantile_within_one_bucket(
    admin_conn: asyncpg.Connection, durations: list[int], q: float,
) -> None:
    """The histogram's quantile is within 19% of the exact nearest-rank value (1 ms below
    1 ms), whatever the distribution of durations under 2^27 ms (37 h; longer ones share
    the last bucket, which is bounded by the maximum only)."""
    est = await admin_conn.fetchval(
        """SELECT app.workflow_stats_quantile(
                    (SELECT array_agg(coalesce(c, 0) ORDER BY b)
                     FROM generate_series(1, 110) b
                     LEFT JOIN (SELECT app.workflow_duration_bucket(d) AS k, count(*) AS c
                                FROM unnest($1::bigint[]) d GROUP BY 1) h ON h.k = b),
                    $2, (SELECT min(d) FROM unnest($1::bigint[]) d),
                    (SELECT max(d) FROM unnest($1::bigint[]) d))""", durations, q)
    exact = _nearest_rank(durations, q)
    assert abs(est - exact) <= max(0.19 * exact, 1.0), (est, exact)


# -- export / import ------------------------------------------------------------------------

async def test_export_document_shape(dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        wf = await db.workflows.create("Doc", nodes=NODES, edges=EDGES, tags=["x"])
        await db.workflows.update(wf.id, settings={"a": 1})
        doc = await db.workflows.export(wf.id)
        bare = await db.workflows.export(wf.id, history=False)
        raw = await db.workflows.export_json(wf.id)
    assert doc["format"] == FORMAT and doc["version"] == 1
    assert doc["workflow"]["id"] == str(wf.id) and doc["workflow"]["current_version"] == 2
    assert [v["version"] for v in doc["versions"]] == [1, 2]
    assert "versions" not in bare
    assert orjson.loads(raw) == doc


def _without_ids(doc: dict[str, Any]) -> dict[str, Any]:
    return doc | {"workflow": {k: v for k, v in doc["workflow"].items() if k != "id"}}


async def test_export_import_export_is_identical_up_to_ids(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    a, b = await make_tenant(), await make_tenant()
    async with dl.session(b.owner) as db:
        team = await db.teams.create("Importers")
        await db.teams.add_member(team.id, b.owner_id)
    async with dl.session(a.owner) as db:
        t = await db.teams.create("Exporters")
        wf = await db.workflows.create("Round trip", description="é ünïcode ✓", nodes=NODES,
                                       edges=EDGES, tags=["a", "b"], status="active",
                                       visibility="team", team_id=t.id,
                                       settings={"n": 1.5, "deep": {"x": [1, None, True]}})
        await db.workflows.update(wf.id, nodes=NODES[:2], edges=EDGES[:1])
        await db.workflows.update(wf.id, settings={"n": 2})
        await db.workflows.restore(wf.id, 1)
        first = await db.workflows.export_json(wf.id)
    with pytest.raises(ValidationError, match="needs team_id"):
        async with dl.session(b.owner) as db:
            await db.workflows.import_(first)
    async with dl.session(b.owner) as db:
        imported = await db.workflows.import_(first, team_id=team.id)
        second = await db.workflows.export_json(imported.id)
        versions = await db.workflows.versions(imported.id)
    assert imported.id != wf.id and imported.org_id == b.org_id
    assert (imported.owner_id, imported.team_id) == (b.owner_id, team.id)
    assert [v.created_by for v in versions.items] == [b.owner_id] * 4
    d1, d2 = orjson.loads(first), orjson.loads(second)
    assert d2["workflow"]["id"] == str(imported.id)
    assert _without_ids(d1) == _without_ids(d2)


_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(exclude_characters="\x00", codec="utf-8"), max_size=20))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.text(st.characters(exclude_characters="\x00", codec="utf-8"),
                            max_size=8), inner, max_size=4)), max_leaves=12)
_node_ids = st.lists(st.text("abcdefgh123", min_size=1, max_size=6), min_size=0, max_size=6,
                     unique=True)


@st.composite
def _content(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                       dict[str, Any]]:
    ids = draw(_node_ids)
    nodes = [{"id": i, "type": draw(st.sampled_from(["llm", "http", "if"])),
              "position": {"x": draw(st.integers(-500, 500)),
                           "y": draw(st.floats(-1e6, 1e6))},
              "data": draw(st.dictionaries(st.text("xyz", min_size=1, max_size=3), _json,
                                           max_size=3))} for i in ids]
    edges = [{"id": f"e{k}", "source": draw(st.sampled_from(ids)),
              "target": draw(st.sampled_from(ids))}
             for k in range(draw(st.integers(0, 4)))] if ids else []
    settings = draw(st.dictionaries(st.text("abc", min_size=1, max_size=4), _json, max_size=3))
    return nodes, edges, settings


_PAIR: list[tuple[Tenant, Tenant]] = []


@hsettings(max_examples=25, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(contents=st.lists(_content(), min_size=1, max_size=4),
       name=st.text(st.characters(exclude_characters="\x00", codec="utf-8"), min_size=1,
                    max_size=40),
       tags=st.lists(st.from_regex(r"[a-z0-9][a-z0-9._:-]{0,8}", fullmatch=True), max_size=4),
       status=st.sampled_from(["draft", "active", "paused", "archived"]),
       visibility=st.sampled_from(["private", "organization", "public"]),
       history=st.booleans())
async def test_export_import_round_trip_property(
    dl: DataLayer, make_tenant: TenantFactory, contents: list[Any], name: str,
    tags: list[str], status: str, visibility: str, history: bool,
) -> None:
    """For any content history: export → import into another organization → export gives
    the same document but for the workflow id; the import creates a new id."""
    if not _PAIR:
        _PAIR.append((await make_tenant(), await make_tenant()))
    a, b = _PAIR[0]
    async with dl.session(a.owner) as db:
        nodes, edges, settings = contents[0]
        wf = await db.workflows.create(name, nodes=nodes, edges=edges, settings=settings,
                                       tags=tags, status=status, visibility=visibility,
                                       is_template=visibility == "public")
        for nodes, edges, settings in contents[1:]:
            await db.workflows.update(wf.id, nodes=nodes, edges=edges, settings=settings)
        first = await db.workflows.export(wf.id, history=history)
    async with dl.session(b.owner) as db:
        imported = await db.workflows.import_(orjson.dumps(first))
        second = await db.workflows.export(imported.id, history=history)
    assert imported.id != wf.id
    assert _without_ids(first) == _without_ids(second)
    assert orjson.dumps(_without_ids(first), option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        _without_ids(second), option=orjson.OPT_SORT_KEYS)


def _doc(**changes: Any) -> dict[str, Any]:
    wf = {"id": str(uuid.uuid4()), "name": "Imported", "description": "", "nodes": NODES,
          "edges": EDGES, "settings": {}, "status": "draft", "tags": [], "is_template": False,
          "visibility": "organization", "current_version": 2}
    doc: dict[str, Any] = {"format": FORMAT, "version": 1, "workflow": wf,
                           "versions": [{"version": 1, "nodes": [], "edges": [], "settings": {}},
                                        {"version": 2, "nodes": NODES, "edges": EDGES,
                                         "settings": {}}]}
    for path, value in changes.items():
        target: Any = doc
        keys = path.split("__")
        for k in keys[:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = keys[-1]
        if value is _DROP:
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return doc


_DROP = object()


@pytest.mark.parametrize(("document", "message"), [
    (b"{not json", r"^document: not valid JSON"),
    (b"[1, 2]", r"^document: must be a JSON object"),
    (_doc(format="n8n.workflow"), r"^format: must be 'datalayer.workflow', got 'n8n"),
    (_doc(version=2), r"^version: format version 2 is newer than this datalayer reads \(1\)"),
    (_doc(version="1"), r"^version: must be an integer"),
    (_doc(extra=1), r"^extra: unknown field"),
    (_doc(workflow__owner_id="x"), r"^workflow\.owner_id: unknown field"),
    (_doc(workflow__name=_DROP), r"^workflow\.name: missing"),
    (_doc(workflow__status="running"), r"^workflow\.status: must be one of"),
    (_doc(workflow__nodes=[{"id": "a"}]), r"^workflow\.nodes\[0\]\.type: must be a non-empty"),
    (_doc(workflow__edges=[{"source": "start", "target": "gone"}]),
     r"^workflow\.edges\[0\]\.target: no node has id 'gone'"),
    (_doc(workflow__visibility="public"), r"^workflow\.visibility: only templates"),
    (_doc(workflow__current_version=0), r"^workflow\.current_version: must be a positive"),
    (_doc(versions=[]), r"^versions: must be a non-empty list"),
    (_doc(versions__0__version=0), r"^versions\[0\]\.version: must be a positive"),
    (_doc(versions__1__version=3), r"^versions\[1\]\.version: must be 2"),
    (_doc(versions__1__settings={"x": 1}), r"^versions\[1\]: content differs from the workflow"),
    (_doc(versions__0__nodes=NODES, versions__0__edges=EDGES),
     r"^versions\[1\]: same content as version 1"),
    (_doc(versions__0__nodes=[{"id": "a", "type": "x"}, {"id": "a", "type": "x"}]),
     r"^versions\[0\]\.nodes\[1\]\.id: duplicate node id"),
    (_doc(versions__1__comment="x"), r"^versions\[1\]\.comment: unknown field"),
])
async def test_import_refuses_bad_documents_and_writes_nothing(
    dl: DataLayer, make_tenant: TenantFactory, admin_conn: asyncpg.Connection,
    document: bytes | dict[str, Any], message: str,
) -> None:
    t = await make_tenant()
    with pytest.raises(ValidationError, match=message):
        parse_document(document)
    async with dl.session(t.owner) as db:
        with pytest.raises(ValidationError, match=message):
            await db.workflows.import_(document)
        await db.teams.create("still usable")  # the session goes on
    assert await admin_conn.fetchval("SELECT count(*) FROM workflows WHERE org_id = $1",
                                     t.org_id) == 0


async def test_import_failing_in_the_database_leaves_nothing(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    """A document that passes the checks but that the database refuses halfway (here: a
    member may not publish) rolls back to the savepoint; the session goes on."""
    t = await make_tenant()
    member = await add_member(t, "member")
    doc = _doc(workflow__is_template=True, workflow__visibility="public")
    async with dl.session(member) as db:
        with pytest.raises(PermissionDenied):
            await db.workflows.import_(doc)
        kept = await db.workflows.create("after the failed import")
    rows = await admin_conn.fetch("SELECT id FROM workflows WHERE org_id = $1", t.org_id)
    assert [r["id"] for r in rows] == [kept.id]
    async with dl.session(t.owner) as db:  # an admin may import it
        ok = await db.workflows.import_(doc)
        assert (ok.current_version, ok.visibility) == (2, "public")


async def test_import_keeps_the_documents_version_numbers(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    """A history that starts after version 1 (or no history at version 7) keeps its
    numbering, so a second export is the same document."""
    t = await make_tenant()
    doc = _doc(workflow__current_version=6, versions__0__version=5, versions__1__version=6)
    bare = _doc(workflow__current_version=7, versions=_DROP)
    async with dl.session(t.owner) as db:
        a = await db.workflows.import_(doc)
        b = await db.workflows.import_(bare)
        assert [v.version for v in (await db.workflows.versions(a.id)).items] == [6, 5]
        assert [v.version for v in (await db.workflows.versions(b.id)).items] == [7]
        again = await db.workflows.export(a.id)
    assert _without_ids(again) == _without_ids(doc)


# -- seeding ---------------------------------------------------------------------------------

async def test_seeded_workflows_belong_to_their_organizations(dl: DataLayer) -> None:
    run_id = uuid.uuid4().hex[:8]
    counts = await seed(dl, profile="dev", scale=1, out=io.StringIO(), run_id=run_id)
    plan = SeedPlan("dev", 1, run_id)
    assert counts["workflows"] == plan.rows("workflows") == 12
    for k, org in enumerate(plan.org_ids):
        owner = Context(org, user_id=user_id(plan, k), role="owner")  # user k owns org k
        async with dl.session(owner, readonly=True) as db:
            page = await db.workflows.list(limit=1000)
            assert len(page.items) == 4 and {w.org_id for w in page.items} == {org}
            for w in page.items:
                assert [v.version for v in (await db.workflows.versions(w.id)).items] == [1]


# -- plans -----------------------------------------------------------------------------------

PLAN_ORGS, PLAN_ROWS = 40, 500


@pytest.fixture(scope="module")
async def plan_db(database_url: str) -> AsyncIterator[tuple[DataLayer, list[uuid.UUID],
                                                            list[uuid.UUID]]]:
    """A database of its own: 40 organizations with 500 workflows each (20,000, rows of
    the organizations interleaved as they are over time), analyzed."""
    name = f"dl_test_{RUN_ID}_wfplans"
    url = await asyncio.to_thread(create_database, name)
    try:
        await asyncio.to_thread(migrations.apply, make_settings(url), resource_dir("schema"))
        orgs = [uuid.uuid4() for _ in range(PLAN_ORGS)]
        owners = [uuid.uuid4() for _ in orgs]
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "INSERT INTO organizations (id, slug, name) "
                "SELECT o, 'plan-' || i, 'Plan org' FROM unnest($1::uuid[]) WITH ORDINALITY "
                "AS x(o, i)", orgs)
            await conn.execute("INSERT INTO users (id, email) SELECT u, 'plan-' || u || "
                               "'@example.test' FROM unnest($1::uuid[]) u", owners)
            await conn.execute("INSERT INTO memberships (org_id, user_id, role) SELECT o, u, "
                               "'owner' FROM unnest($1::uuid[], $2::uuid[]) AS x(o, u)",
                               orgs, owners)
            await conn.execute(
                "INSERT INTO workflows (org_id, name, description, owner_id, tags, "
                "                       updated_at) "
                "SELECT o, 'flow ' || g || CASE WHEN g % 10 = 0 THEN ' invoice' ELSE '' END, "
                "       'does thing ' || (g % 37), u, ARRAY['t' || (g % 5)], "
                "       now() - g * interval '1 minute' "
                "FROM generate_series(1, $3::int) g, unnest($1::uuid[], $2::uuid[]) AS x(o, u)",
                orgs, owners, PLAN_ROWS)
            await conn.execute("ANALYZE")
        finally:
            await conn.close()
        async with DataLayer(make_settings(url, migrate_on_start=False)) as layer:
            yield layer, orgs, owners
    finally:
        await asyncio.to_thread(drop_database, name)


async def _plans(dl: DataLayer, ctx: Context,
                 cases: dict[str, dict[str, object]]) -> dict[str, list[dict[str, Any]]]:
    plans = {}
    async with dl.session(ctx, readonly=True) as db:
        for label, params in cases.items():
            q = dl.registry[label.partition(" ")[0]]
            raw = await db.connection.fetchval("EXPLAIN (FORMAT JSON) " + q.sql,
                                               *q.bind(params))
            plans[label] = plan_nodes((json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"])
    return plans


_LIST_ARGS: dict[str, object] = {
    "before_updated_at": LAST[0], "before_id": LAST[1], "status": None, "owner_id": None,
    "team_id": None, "is_template": None, "tags_any": None, "tags_all": None, "limit": 50}


@pytest.mark.slow
async def test_list_and_search_plans_use_the_org_index(
    plan_db: tuple[DataLayer, list[uuid.UUID], list[uuid.UUID]],
) -> None:
    """In a tenant session over 20,000 analyzed workflows: a list page is an index scan of
    workflows_list_idx in order, no sort; a tag filter and search read the organization's
    rows through an org_id index qual and filter && / @@ (the GIN indexes cannot serve
    them under RLS: those operators are not leakproof)."""
    dl, orgs, owners = plan_db
    ctx = Context(orgs[3], user_id=owners[3], role="member")
    plans = await _plans(dl, ctx, {
        "workflows.list": _LIST_ARGS,
        "workflows.list by tag": _LIST_ARGS | {"tags_any": ["t1"]},
        "workflows.search": {"query": "invoice", "status": None, "after_rank": math.inf,
                             "after_id": uuid.UUID(int=0), "limit": 20},
    })
    async with dl.session(ctx, readonly=True) as db:
        page = await db.workflows.list(limit=50)
        hits = await db.workflows.search("invoice", limit=100)
    assert len(page.items) == 50 and len(hits.items) == PLAN_ROWS // 10
    listing = plans["workflows.list"]
    scans = [n for n in listing if n.get("Relation Name") == "workflows"]
    assert not [n for n in listing if n["Node Type"] == "Sort"], listing
    assert [n["Index Name"] for n in scans] == ["workflows_list_idx"], listing
    assert "org_id" in scans[0]["Index Cond"]
    # A filter (tag, or the text match) leaves the order to the planner: for a small
    # organization reading all its rows and sorting them is as cheap. Either way its rows
    # are found by an org_id index qual, never a scan of the table or of the GIN indexes.
    for label in ("workflows.list by tag", "workflows.search"):
        nodes = plans[label]
        scans = [n for n in nodes if n.get("Relation Name") == "workflows"]
        assert [n["Node Type"] for n in scans] in (["Index Scan"], ["Bitmap Heap Scan"]), nodes
        assert "_tags_idx" not in json.dumps(nodes) and "_search_idx" not in json.dumps(nodes)
        assert "org_id" in " ".join(str(n.get("Index Cond", "")) for n in nodes), nodes

