"""Plugins: catalog visibility (adversarial), versions and immutability, search (ranked,
filtered, keyset, typo-tolerant, index-backed), dependency resolution, governance (approval
stages, policies, exemptions, advisories), installations with deployments and rollback,
usage analytics and the quality job."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from datalayer import Context, DataLayer, NotFound, PermissionDenied, ValidationError
from datalayer.repos.plugins import (
    Plugin,
    PluginVersion,
    UsageEvent,
    plugin_quality_refresh,
    plugin_usage_rollup,
)
from datalayer.resolver import ResolutionConflict
from tests.conftest import MemberFactory, Tenant, TenantFactory, nested_plans

CHECKSUM = "sha256:" + "ab" * 32


def manifest(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name, "entry_point": "plug.main:run", "permissions": ["workflows.read"],
        "config_schema": {
            "type": "object",
            "properties": {"url": {"type": "string", "pattern": "^https://"},
                           "retries": {"type": "integer", "minimum": 0, "maximum": 5},
                           "token": {"type": "string", "secret": True}},
            "required": ["url"], "additionalProperties": False},
        **extra}


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def publish(dl: DataLayer, ctx: Context, name: str,
                  versions: Mapping[str, Mapping[uuid.UUID, str]], *, public: bool = True,
                  approve: bool = True, **meta: Any) -> tuple[Plugin, dict[str, PluginVersion]]:
    """A plugin with approved versions (and dependencies), listed when ``public``."""
    out: dict[str, PluginVersion] = {}
    async with dl.session(ctx) as db:
        p = await db.plugins.create(name, visibility="public" if public else "private", **meta)
        for text, deps in versions.items():
            v = await db.plugins.publish_version(p.id, text, manifest(name), checksum=CHECKSUM,
                                                 size_bytes=100, dependencies=deps)
            out[text] = await db.plugins.approve_version(v.id) if approve else v
        if approve:
            await db.plugins.set_status(p.id, "in_review")
            p = await db.plugins.set_status(p.id, "approved")
    return p, out


@pytest.fixture
async def pub(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant("Publisher")


@pytest.fixture
async def con(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant("Consumer")


# -- catalog and visibility -----------------------------------------------------------------

async def test_private_plugin_is_invisible_to_other_organizations(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    name = uniq("secretplug")
    p, vs = await publish(dl, pub.owner, name, {"1.0.0": {}}, public=False,
                          summary="private zebra tool")
    v = vs["1.0.0"]
    async with dl.session(pub.owner) as db:
        await db.plugins.add_advisory(p.id, "CVE-2026-0001", "low", "<2.0.0")
    _, dvs = await publish(dl, pub.owner, uniq("dependent"), {"1.0.0": {p.id: "^1.0.0"}},
                           public=False)
    async with dl.session(con.owner, readonly=True) as db:
        assert await db.plugins.get(p.id) is None
        assert await db.plugins.get_version(v.id) is None
        assert (await db.plugins.search("zebra")).items == []
        assert await db.plugins.graph([p.id]) == []
        assert await db.plugins.dependents(p.id) == []
        assert await db.plugins.advisories(p.id) == []
        checks = await db.plugins.policy_check(p.id, v.id, "development")
        assert [c.policy for c in checks] == ["installable"]
    with pytest.raises(ResolutionConflict, match="no installable version"):
        async with dl.session(con.owner, readonly=True) as db:
            await db.plugins.resolve({p.id: "*"})
    with pytest.raises(asyncpg.RaiseError, match="plugin policy installable"):
        async with dl.session(con.owner) as db:
            await db.connection.execute(
                "INSERT INTO plugin_installations (org_id, plugin_id, environment, version_id,"
                " version, publisher_org_id) VALUES ($1, $2, 'development', $3, '', $1)",
                con.org_id, p.id, v.id)
    # No context: nothing at all, even for the publisher's rows.
    async with dl.session(Context(None), readonly=True) as db:
        assert await db.plugins.get(p.id) is None
        assert (await db.plugins.search("zebra")).items == []
    # The publisher sees its own private plugin everywhere.
    async with dl.session(pub.owner, readonly=True) as db:
        assert (await db.plugins.get(p.id)) is not None
        assert [h.id for h in (await db.plugins.search("zebra")).items] == [p.id]
        assert len(await db.plugins.dependents(p.id)) == 1
        assert dvs


async def test_public_plugin_is_readable_but_only_its_publisher_writes_it(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    p, vs = await publish(dl, pub.owner, uniq("shared"), {"1.0.0": {}})
    async with dl.session(con.owner, readonly=True) as db:
        got = await db.plugins.get(p.id)
        assert got is not None and got.publisher == "Publisher"
        assert (await db.plugins.get_version(vs["1.0.0"].id)) is not None
    with pytest.raises(NotFound):
        async with dl.session(con.owner) as db:
            await db.plugins.update(p.id, summary="defaced")
    with pytest.raises(NotFound):
        async with dl.session(con.owner) as db:
            await db.plugins.yank(vs["1.0.0"].id, "hostile")
    async with dl.session(con.owner) as db:
        for sql in ("UPDATE plugins SET summary = 'x' WHERE id = $1",
                    "DELETE FROM plugins WHERE id = $1",
                    "UPDATE plugin_versions SET status = 'yanked' WHERE plugin_id = $1"):
            assert (await db.connection.execute(sql, p.id)).endswith(" 0")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with dl.session(con.owner) as db:
            await db.connection.execute(
                "INSERT INTO plugin_versions (org_id, id, plugin_id, version, manifest, checksum,"
                " size_bytes) VALUES ($1, $2, $3, '9.9.9', $4, $5, 1)",
                pub.org_id, uuid.uuid4(), p.id, manifest("x"), CHECKSUM)


async def test_public_plugin_enters_the_catalog_only_when_approved(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    p, _ = await publish(dl, pub.owner, uniq("unreviewed"), {"1.0.0": {}}, approve=False)
    async with dl.session(con.owner, readonly=True) as db:
        assert await db.plugins.get(p.id) is None
    async with dl.session(pub.owner) as db:
        await db.plugins.set_status(p.id, "in_review")
        await db.plugins.set_status(p.id, "approved")
    async with dl.session(con.owner, readonly=True) as db:
        assert await db.plugins.get(p.id) is not None


async def test_plugin_writes_follow_roles(
    dl: DataLayer, pub: Tenant, add_member: MemberFactory,
) -> None:
    viewer = await add_member(pub, "viewer")
    member = await add_member(pub, "member")
    with pytest.raises(PermissionDenied):
        async with dl.session(viewer) as db:
            await db.plugins.create(uniq("viewer"))
    async with dl.session(member) as db:
        p = await db.plugins.create(uniq("member"))
        v = await db.plugins.publish_version(p.id, "1.0.0", manifest(p.name), checksum=CHECKSUM,
                                             size_bytes=1)
        assert v.status == "in_review"
    with pytest.raises(PermissionDenied, match="only owners and admins"):
        async with dl.session(member) as db:
            await db.plugins.approve_version(v.id)
    async with dl.session(pub.owner) as db:
        assert (await db.plugins.approve_version(v.id)).status == "approved"


# -- versions -------------------------------------------------------------------------------

async def test_versions_are_ordered_by_semver_in_sql(dl: DataLayer, pub: Tenant) -> None:
    texts = ["1.0.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta.11", "1.0.0-beta.2",
             "1.0.0-rc.1", "1.10.0", "1.2.0", "0.9.0", "1.0.0-alpha.beta"]
    async with dl.session(pub.owner) as db:
        p = await db.plugins.create(uniq("ordered"))
        for t in texts:
            await db.plugins.publish_version(p.id, t, manifest(p.name), checksum=CHECKSUM,
                                             size_bytes=1, submit=False)
        got = [v.version for v in await db.plugins.versions(p.id)]
    assert got == ["1.10.0", "1.2.0", "1.0.0", "1.0.0-rc.1", "1.0.0-beta.11", "1.0.0-beta.2",
                   "1.0.0-alpha.beta", "1.0.0-alpha.1", "1.0.0-alpha", "0.9.0"]
    with pytest.raises(ValidationError, match="semantic version"):
        async with dl.session(pub.owner) as db:
            await db.plugins.publish_version(p.id, "1.0", manifest(p.name), checksum=CHECKSUM,
                                             size_bytes=1)


async def test_published_version_is_immutable(dl: DataLayer, pub: Tenant) -> None:
    _, vs = await publish(dl, pub.owner, uniq("frozen"), {"1.0.0": {}})
    v = vs["1.0.0"]
    with pytest.raises(ValidationError, match="published and immutable"):
        async with dl.session(pub.owner) as db:
            await db.plugins.update_draft(v.id, manifest("frozen", entry_point="evil:run"))
    with pytest.raises(asyncpg.RaiseError, match="cannot be deleted"):
        async with dl.session(pub.owner) as db:
            await db.connection.execute("DELETE FROM plugin_versions WHERE id = $1", v.id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # a trigger's reverse index
        async with dl.session(pub.owner) as db:
            await db.connection.execute(
                "INSERT INTO plugin_dependencies (org_id, version_id, dep_plugin_id, range) "
                "VALUES ($1, $2, $3, '*')", pub.org_id, v.id, uuid.uuid4())
    with pytest.raises(ValidationError, match="cannot change from approved to in_review"):
        async with dl.session(pub.owner) as db:
            await db.plugins.set_version_status(v.id, "in_review")
    async with dl.session(pub.owner) as db:  # the lifecycle still moves on
        assert (await db.plugins.set_version_status(v.id, "deprecated")).status == "deprecated"
        y = await db.plugins.yank(v.id, "broken build")
        assert (y.status, y.status_reason) == ("yanked", "broken build")


@pytest.mark.parametrize(("patch", "message"), [
    ({"name": "Bad Name"}, "manifest.name"),
    ({"entry_point": "no-colon"}, "manifest.entry_point"),
    ({"permissions": "all"}, "manifest.permissions must be a list"),
    ({"permissions": ["DROP TABLE"]}, r"manifest.permissions\[0\]"),
    ({"config_schema": {"type": "object", "oneOf": []}}, "unsupported keyword"),
    ({"config_schema": {"type": "array"}}, "must describe an object"),
    ({"test_coverage": 2}, "test_coverage"),
])
async def test_manifest_errors_name_the_field(
    dl: DataLayer, pub: Tenant, patch: dict[str, Any], message: str,
) -> None:
    async with dl.session(pub.owner) as db:
        p = await db.plugins.create(uniq("manifest"))
    with pytest.raises(ValidationError, match=message):
        async with dl.session(pub.owner) as db:
            await db.plugins.publish_version(p.id, "1.0.0", {**manifest(p.name), **patch},
                                             checksum=CHECKSUM, size_bytes=1)


# -- search ---------------------------------------------------------------------------------

async def test_search_ranks_filters_and_paginates(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    word = "q" + uuid.uuid4().hex[:8]
    by_name, _ = await publish(dl, pub.owner, f"{word}-export", {"1.0.0": {}},
                               summary="exports rows", categories=["data"], compat=["v2"])
    by_desc, _ = await publish(dl, pub.owner, uniq("other"), {"1.0.0": {}},
                               description=f"mentions {word} in passing", categories=["ops"])
    for i in range(5):
        await publish(dl, pub.owner, uniq("many"), {"1.0.0": {}}, tags=[word, f"t{i}"],
                      categories=["data"])
    async with dl.session(con.owner, readonly=True) as db:
        page = await db.plugins.search(word, limit=10)
        ids = [h.id for h in page.items]
        assert ids[0] == by_name.id and ids[-1] == by_desc.id and len(ids) == 7
        assert [h.id for h in (await db.plugins.search(word, category="ops")).items] == \
            [by_desc.id]
        assert [h.id for h in (await db.plugins.search(word, compat="v2")).items] == \
            [by_name.id]
        assert len((await db.plugins.search(word, publisher=pub.org_id)).items) == 7
        assert (await db.plugins.search(word, publisher=con.org_id)).items == []
        seen: list[uuid.UUID] = []
        after = None
        while True:
            pg = await db.plugins.search(word, limit=3, after=after)
            seen += [h.id for h in pg.items]
            if pg.next is None:
                break
            after = pg.next
        assert seen == ids


async def test_search_is_typo_tolerant(dl: DataLayer, pub: Tenant, con: Tenant) -> None:
    p, _ = await publish(dl, pub.owner, "spreadsheet-sync-" + uuid.uuid4().hex[:4],
                         {"1.0.0": {}})
    async with dl.session(con.owner, readonly=True) as db:
        hits = (await db.plugins.search("spredsheet-sinc")).items
        assert p.id in [h.id for h in hits]
        assert (await db.plugins.search("spredsheet-sinc", typo_tolerant=False)).items == []


async def test_search_uses_the_catalog_gin_index(
    dl: DataLayer, pub: Tenant, con: Tenant, admin_conn: asyncpg.Connection,
) -> None:
    """Inside the definer function no policy stands between @@ and the partial GIN index
    (with enough listed rows for the planner to prefer it)."""
    await admin_conn.execute(
        "INSERT INTO plugins (org_id, id, name, display_name, summary, visibility, status) "
        "SELECT $1, gen_random_uuid(), 'filler-' || g || '-' || $2, 'Filler ' || g, "
        "       'bulk filler number ' || g, 'public', 'approved' "
        "FROM generate_series(1, 3000) g", pub.org_id, uuid.uuid4().hex[:6])
    await admin_conn.execute("ANALYZE plugins")
    sql = dl.registry["plugins.search"].sql
    args: list[object] = ["export", None, None, None, None, 0.0, None, 10, False]
    plans = await nested_plans(dl.settings.database_url, con.owner, sql, args, no_seqscan=True)
    text = json.dumps(plans)
    assert "plugins_public_search_idx" in text, [
        (n.get("Node Type"), n.get("Index Name"), n.get("Filter")) for n in _walk(plans)]


def _walk(plans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    todo = list(plans)
    while todo:
        n = todo.pop()
        out.append(n)
        todo += n.get("Plans", [])
    return out


# -- dependencies ---------------------------------------------------------------------------

async def test_resolve_picks_the_highest_versions_satisfying_every_constraint(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    core, _ = await publish(dl, pub.owner, uniq("core"),
                            {"1.0.0": {}, "1.4.0": {}, "1.9.0": {}, "2.0.0": {}})
    util, _ = await publish(dl, pub.owner, uniq("util"),
                            {"1.0.0": {core.id: "^2.0.0"}, "1.1.0": {core.id: "~1.4"}})
    app, _ = await publish(dl, pub.owner, uniq("app"), {"3.0.0": {util.id: "^1.0.0",
                                                                   core.id: ">=1.2 <2.0"}})
    async with dl.session(con.owner, readonly=True) as db:
        res = await db.plugins.resolve({app.id: "^3"})
    assert res.version_of(app.id) == "3.0.0"
    assert res.version_of(util.id) == "1.1.0"
    assert res.version_of(core.id) == "1.4.0"  # ~1.4 from util 1.1.0 beats 1.9.0
    order = [r.plugin_id for r in res.installs]
    assert order.index(core.id) < order.index(util.id) < order.index(app.id)


async def test_resolve_backtracks_to_a_lower_version(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    core, _ = await publish(dl, pub.owner, uniq("core"), {"1.0.0": {}, "2.0.0": {}})
    lib, _ = await publish(dl, pub.owner, uniq("lib"),
                           {"1.0.0": {core.id: "^1.0.0"}, "2.0.0": {core.id: "^2.0.0"}})
    async with dl.session(con.owner, readonly=True) as db:
        res = await db.plugins.resolve({lib.id: "*", core.id: "<2"})
    assert (res.version_of(lib.id), res.version_of(core.id)) == ("1.0.0", "1.0.0")


async def test_resolve_conflict_names_the_constraints_and_who_imposed_them(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    core, _ = await publish(dl, pub.owner, uniq("core"), {"1.0.0": {}, "2.0.0": {}})
    a, _ = await publish(dl, pub.owner, uniq("a"), {"1.0.0": {core.id: "^1.0.0"}})
    b, _ = await publish(dl, pub.owner, uniq("b"), {"1.0.0": {core.id: "^2.0.0"}})
    with pytest.raises(ResolutionConflict) as info:
        async with dl.session(con.owner, readonly=True) as db:
            await db.plugins.resolve({a.id: "*", b.id: "*"})
    err = info.value
    assert {(c.range, c.required_by) for c in err.constraints} == {
        (">=1.0.0 <2.0.0-0", f"{a.name}@1.0.0"), (">=2.0.0 <3.0.0-0", f"{b.name}@1.0.0")}
    assert core.name in str(err) and a.name in str(err) and b.name in str(err)


async def test_resolve_detects_cycles(dl: DataLayer, pub: Tenant, con: Tenant) -> None:
    x, _ = await publish(dl, pub.owner, uniq("x"), {"1.0.0": {}})
    y, _ = await publish(dl, pub.owner, uniq("y"), {"1.0.0": {x.id: "^1.0.0"}})
    async with dl.session(pub.owner) as db:  # x 1.1.0 depends back on y
        v = await db.plugins.publish_version(x.id, "1.1.0", manifest(x.name), checksum=CHECKSUM,
                                             size_bytes=1, dependencies={y.id: "^1"})
        await db.plugins.approve_version(v.id)
    with pytest.raises(ResolutionConflict, match="dependency cycle") as info:
        async with dl.session(con.owner, readonly=True) as db:
            await db.plugins.resolve({y.id: "*"})
    assert set(info.value.cycle) == {x.name, y.name}


async def test_resolve_skips_yanked_and_prereleases_unless_asked(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    p, vs = await publish(dl, pub.owner, uniq("pre"), {"1.0.0": {}, "1.1.0": {},
                                                        "1.2.0-beta.1": {}})
    async with dl.session(pub.owner) as db:
        await db.plugins.yank(vs["1.1.0"].id, "bad")
    async with dl.session(con.owner, readonly=True) as db:
        assert (await db.plugins.resolve({p.id: "^1"})).version_of(p.id) == "1.0.0"
        assert (await db.plugins.resolve({p.id: "^1"}, prerelease=True)).version_of(p.id) == \
            "1.2.0-beta.1"
        assert (await db.plugins.resolve({p.id: ">=1.2.0-beta.0"})).version_of(p.id) == \
            "1.2.0-beta.1"
    with pytest.raises(ResolutionConflict, match="no version satisfies"):
        async with dl.session(con.owner, readonly=True) as db:
            await db.plugins.resolve({p.id: "=1.1.0"})


async def test_packed_graph_matches_the_graph_and_hides_private_plugins(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    """The resolver reads app.plugin_graph_packed (one row per plugin, versions packed in a
    text): it holds exactly what app.plugin_graph holds, in the same order, and a private
    plugin of another organization reaches neither."""
    hidden, _ = await publish(dl, pub.owner, uniq("hidden"), {"1.0.0": {}}, public=False)
    core, _ = await publish(dl, pub.owner, uniq("core"),
                            {"1.0.0": {}, "1.2.0-rc.1": {}, "2.0.0+build.7": {}})
    app, _ = await publish(dl, pub.owner, uniq("app"), {
        "1.0.0": {core.id: "^1.0.0 || >=2.0.0 <3"}, "1.1.0": {hidden.id: "*"}})
    async with dl.session(con.owner, readonly=True) as db:
        graph = await db.plugins.graph([app.id])
        packed = await db.many("plugins.graph_packed", roots=[app.id])
        res = await db.plugins.resolve({app.id: "1.0.0", core.id: "^2"})
        assert (await db.plugins.resolve({app.id: "^1"})).version_of(app.id) == "1.0.0"
    assert hidden.id not in {g.plugin_id for g in graph}
    assert [r["plugin_id"] for r in packed] == sorted({g.plugin_id for g in graph})
    for row in packed:
        lines = [line.split("\t") for line in row["versions"].split("\n")]
        mine = [g for g in graph if g.plugin_id == row["plugin_id"]]
        assert [(uuid.UUID(x[0]), x[1], x[2]) for x in lines] == \
            [(g.version_id, g.version, g.vkey) for g in mine]
        assert [([uuid.UUID(i) for i in x[3].split(",")] if x[3] else [], x[4:])
                for x in lines] == [(g.dep_plugin_ids, g.dep_ranges) for g in mine]
    assert res.version_of(core.id) == "2.0.0+build.7"
    with pytest.raises(ResolutionConflict, match="no installable version"):
        async with dl.session(con.owner, readonly=True) as db:
            await db.plugins.resolve({app.id: "1.1.0"})  # needs the hidden plugin


async def test_dependents_answer_what_breaks_if_yanked(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    core, _ = await publish(dl, pub.owner, uniq("core"), {"1.0.0": {}, "2.0.0": {}})
    a, _ = await publish(dl, pub.owner, uniq("a"), {"1.0.0": {core.id: "^1.0.0"},
                                                     "2.0.0": {core.id: "^2.0.0"}})
    async with dl.session(con.owner, readonly=True) as db:
        assert len(await db.plugins.dependents(core.id)) == 2
        hit = await db.plugins.dependents(core.id, version="1.0.0")
    assert [(d.plugin_id, d.version) for d in hit] == [(a.id, "1.0.0")]


# -- governance -----------------------------------------------------------------------------

async def test_approval_workflow_runs_in_order_by_role_and_rejection_ends_it(
    dl: DataLayer, pub: Tenant, con: Tenant, add_member: MemberFactory,
) -> None:
    p, vs = await publish(dl, pub.owner, uniq("gov"), {"1.0.0": {}, "1.1.0": {}})
    member = await add_member(con, "member")
    async with dl.session(con.owner) as db:
        sec = await db.plugins.add_stage(1, "security review", required_role="member",
                                         environments=["staging", "production"])
        arch = await db.plugins.add_stage(2, "architecture", required_role="admin",
                                          environments=["production"])
        v = vs["1.0.0"]
        assert [c.policy for c in await db.plugins.policy_check(p.id, v.id, "staging")] == \
            ["approval_workflow"]
        assert await db.plugins.policy_check(p.id, v.id, "development") == []
    with pytest.raises(ValidationError, match="waits for the earlier stages"):
        async with dl.session(con.owner) as db:
            await db.plugins.decide(p.id, v.id, arch.id, "approved")
    async with dl.session(member) as db:
        await db.plugins.decide(p.id, v.id, sec.id, "approved")
    with pytest.raises(PermissionDenied, match="requires the admin role"):
        async with dl.session(member) as db:
            await db.plugins.decide(p.id, v.id, arch.id, "approved")
    async with dl.session(con.owner) as db:
        assert await db.plugins.policy_check(p.id, v.id, "staging") == []
        assert [c.message for c in await db.plugins.policy_check(p.id, v.id, "production")] \
            == ['approval stage "architecture" has not approved this version for production']
        await db.plugins.decide(p.id, v.id, arch.id, "approved")
        assert await db.plugins.policy_check(p.id, v.id, "production") == []
        assert len(await db.plugins.decisions(v.id)) == 2
        await db.plugins.decide(p.id, vs["1.1.0"].id, sec.id, "rejected",
                                reason="phones home")
    with pytest.raises(ValidationError, match="ended with a rejection"):
        async with dl.session(con.owner) as db:
            await db.plugins.decide(p.id, vs["1.1.0"].id, arch.id, "approved")
    with pytest.raises(ValidationError, match="approval_workflow"):
        async with dl.session(con.owner) as db:
            await db.plugins.install(p.id, vs["1.1.0"].id, "staging",
                                     config={"url": "https://x"})


async def test_policies_block_installs_and_exemptions_expire_by_themselves(
    dl: DataLayer, pub: Tenant, con: Tenant, admin_conn: asyncpg.Connection,
) -> None:
    p, vs = await publish(dl, pub.owner, uniq("pol"), {"1.0.0": {}}, license="GPL-3.0")
    v = vs["1.0.0"]
    async with dl.session(con.owner) as db:
        await db.plugins.set_policy("license_allowlist", licenses=["MIT", "Apache-2.0"])
        await db.plugins.set_policy("approved_publishers_only")
        got = await db.plugins.policy_check(p.id, v.id, "development")
    assert sorted(c.policy for c in got) == ["approved_publishers_only", "license_allowlist"]
    with pytest.raises(ValidationError, match=r"plugin policy (approved_publishers_only|"
                                              r"license_allowlist) refused the install"):
        async with dl.session(con.owner) as db:
            await db.plugins.install(p.id, v.id, "development", config={"url": "https://x"})
    async with dl.session(con.owner) as db:
        assert await db.plugins.approve_publisher(pub.org_id)
        ex = await db.plugins.grant_exemption(p.id, "license_allowlist",
                                              "legal approved GPL for internal use",
                                              ttl=timedelta(hours=1))
        assert ex.active and ex.approved_by == con.owner_id
        inst = await db.plugins.install(p.id, v.id, "development", config={"url": "https://x"})
        assert inst.version == "1.0.0" and inst.publisher_org_id == pub.org_id
    # Expire it (as time would): the policy applies again, no job involved.
    await admin_conn.execute(
        "UPDATE plugin_exemptions SET created_at = now() - interval '2 hours', "
        "expires_at = now() - interval '1 second' WHERE id = $1", ex.id)
    async with dl.session(con.owner) as db:
        assert [c.policy for c in await db.plugins.policy_check(p.id, v.id, "staging")] == \
            ["license_allowlist"]
        assert (await db.plugins.exemptions(p.id))[0].active is False
    with pytest.raises(PermissionDenied):
        async with dl.session(con.ctx("member")) as db:
            await db.plugins.set_policy("approved_publishers_only", enabled=False)


async def test_critical_advisory_blocks_installs_and_alerts_installed_versions(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    p, vs = await publish(dl, pub.owner, uniq("vuln"), {"1.0.0": {}, "1.2.0": {}, "1.3.0": {}})
    async with dl.session(con.owner) as db:
        await db.plugins.set_policy("no_critical_vulnerability")
        await db.plugins.install(p.id, vs["1.0.0"].id, "production",
                                 config={"url": "https://x"})
        await db.plugins.install(p.id, vs["1.2.0"].id, "staging", config={"url": "https://x"})
        assert await db.plugins.alerts() == []
    async with dl.session(pub.owner) as db:
        adv = await db.plugins.add_advisory(p.id, "GHSA-aaaa-bbbb", "critical",
                                            ">=1.1.0 <1.3.0", summary="RCE")
        assert adv.fixed_in == "1.3.0"
        await db.plugins.add_advisory(p.id, "CVE-2026-1", "low", "<1.1.0")
    async with dl.session(con.owner) as db:
        alerts = await db.plugins.alerts()
        assert [(a.environment, a.identifier, a.severity) for a in alerts] == [
            ("staging", "GHSA-aaaa-bbbb", "critical"), ("production", "CVE-2026-1", "low")]
        assert len(await db.plugins.advisories(p.id)) == 2
        assert await db.plugins.policy_check(p.id, vs["1.3.0"].id, "staging") == []
        bad = await db.plugins.policy_check(p.id, vs["1.2.0"].id, "development")
        assert [c.policy for c in bad] == ["no_critical_vulnerability"]
        assert "GHSA-aaaa-bbbb" in bad[0].message
    with pytest.raises(ValidationError, match="no_critical_vulnerability"):
        async with dl.session(con.owner) as db:
            await db.plugins.install(p.id, vs["1.2.0"].id, "development",
                                     config={"url": "https://x"})
    with pytest.raises(ValidationError, match="one interval"):
        async with dl.session(pub.owner) as db:
            await db.plugins.add_advisory(p.id, "X-1", "high", "^1 || ^2")


# -- installations --------------------------------------------------------------------------

async def test_install_validates_config_and_encrypts_secrets(
    dl: DataLayer, pub: Tenant, con: Tenant, admin_conn: asyncpg.Connection,
) -> None:
    p, vs = await publish(dl, pub.owner, uniq("cfg"), {"1.0.0": {}})
    v = vs["1.0.0"]
    cases: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({}, {}, "config.url is required"),
        ({"url": "http://plain"}, {}, "config.url does not match"),
        ({"url": "https://x", "retries": 9}, {}, "config.retries must be at most 5"),
        ({"url": "https://x", "extra": 1}, {}, "config.extra is not an allowed property"),
        ({"url": "https://x", "token": "t"}, {}, "is a secret: pass it in secrets"),
        ({"url": "https://x"}, {"password": "p"}, "secrets.password is not a secret"),
    ]
    for cfg, secrets, message in cases:
        with pytest.raises(ValidationError, match=message):
            async with dl.session(con.owner) as db:
                await db.plugins.install(p.id, v.id, "development", config=cfg,
                                         secrets=secrets)
    async with dl.session(con.owner) as db:
        inst = await db.plugins.install(p.id, v.id, "development",
                                        config={"url": "https://x", "retries": 2},
                                        secrets={"token": "s3cr3t-value"})
        assert await db.plugins.secrets(inst) == {"token": "s3cr3t-value"}
    raw = await admin_conn.fetchval("SELECT secret FROM plugin_secrets WHERE id = $1",
                                    inst.secret_id)
    assert b"s3cr3t-value" not in raw
    assert await admin_conn.fetchval(
        "SELECT count(*) FROM app.encrypted_columns WHERE table_name = 'plugin_secrets'") == 1
    async with dl.session(pub.owner, readonly=True) as db:  # the publisher sees nothing
        assert await db.connection.fetchval(
            "SELECT count(*) FROM plugin_installations WHERE org_id = $1", con.org_id) == 0


async def test_every_change_is_a_deployment_and_rollback_restores_the_previous(
    dl: DataLayer, pub: Tenant, con: Tenant,
) -> None:
    p, vs = await publish(dl, pub.owner, uniq("dep"), {"1.0.0": {}, "2.0.0": {}})
    async with dl.session(con.owner) as db:
        await db.plugins.install(p.id, vs["1.0.0"].id, "staging", config={"url": "https://a"},
                                 secrets={"token": "one"})
        await db.plugins.install(p.id, vs["2.0.0"].id, "staging", config={"url": "https://b"},
                                 secrets={"token": "two"})
        await db.plugins.set_enabled(p.id, "staging", False)
        back = await db.plugins.rollback(p.id, "staging")
        assert (back.version, back.enabled, back.config) == ("2.0.0", True,
                                                              {"url": "https://b"})
        await db.plugins.install(p.id, vs["2.0.0"].id, "staging", config={"url": "https://c"})
        back = await db.plugins.rollback(p.id, "staging")
        assert back.config == {"url": "https://b"}
        assert await db.plugins.secrets(back) == {"token": "two"}
        history = await db.plugins.deployments(p.id, "staging")
        assert [d.action for d in history] == ["rollback", "configure", "rollback", "disable",
                                               "upgrade", "install"]
        assert await db.plugins.uninstall(p.id, "staging")
        assert await db.plugins.installation(p.id, "staging") is None
        # Rolling back an uninstall reinstalls what was there.
        again = await db.plugins.rollback(p.id, "staging")
        assert (again.version, again.config) == ("2.0.0", {"url": "https://b"})
        await db.plugins.install(p.id, vs["1.0.0"].id, "production",
                                 config={"url": "https://p"})
    with pytest.raises(NotFound, match="no earlier deployment"):
        async with dl.session(con.owner) as db:
            await db.plugins.rollback(p.id, "production")


# -- usage ----------------------------------------------------------------------------------

async def test_usage_is_rolled_up_idempotently_and_read_per_org(
    dl: DataLayer, pub: Tenant, con: Tenant, make_tenant: TenantFactory,
) -> None:
    p, _ = await publish(dl, pub.owner, uniq("usage"), {"1.0.0": {}}, sla_p95_ms=100)
    other = await make_tenant("Other consumer")
    now = datetime.now(UTC)
    events = [UsageEvent(p.id, "invocation", float(i % 100), now) for i in range(200)]
    events += [UsageEvent(p.id, "error", 500.0, now) for _ in range(4)]
    events += [UsageEvent(p.id, "install", None, now - timedelta(days=1))]
    async with dl.session(con.owner) as db:
        assert await db.plugins.ingest_usage(events) == len(events)
    async with dl.session(other.owner) as db:
        assert await db.plugins.ingest_usage([UsageEvent(p.id, "invocation", 10.0)]) == 1
    first = await plugin_usage_rollup(dl)
    second = await plugin_usage_rollup(dl)
    assert first == second and first["days_rows"] >= 3
    async with dl.session(con.owner, readonly=True) as db:
        days = await db.plugins.usage_daily(p.id)
        today = days[-1]
        assert (today.invocations, today.errors, today.latency_n) == (200, 4, 204)
        assert today.p95_ms is not None and 90 <= today.p95_ms <= 500
        assert await db.plugins.adoption(p.id) == []  # not the publisher: nothing
        assert await db.plugins.sla(p.id) is None
    async with dl.session(other.owner, readonly=True) as db:
        assert [d.invocations for d in await db.plugins.usage_daily(p.id)] == [1]
    async with dl.session(pub.owner, readonly=True) as db:
        adoption = await db.plugins.adoption(p.id)
        assert adoption[-1].active_orgs == 2 and adoption[-1].invocations == 201
        sla = await db.plugins.sla(p.id)
        assert sla is not None and sla.errors == 4 and sla.compliant is False


async def test_raw_usage_events_are_purged_after_the_retention(
    dl: DataLayer, pub: Tenant, con: Tenant, admin_conn: asyncpg.Connection,
) -> None:
    """plugins.usage_purge deletes the raw events older than 30 days and nothing newer; the
    roll-ups stay."""
    from datalayer.maintenance import PLUGIN_USAGE_RETENTION

    p, _ = await publish(dl, pub.owner, uniq("purge"), {"1.0.0": {}})
    now = datetime.now(UTC)
    old = now - PLUGIN_USAGE_RETENTION - timedelta(hours=1)
    young = now - PLUGIN_USAGE_RETENTION + timedelta(hours=1)
    async with dl.session(con.owner) as db:
        await db.plugins.ingest_usage([UsageEvent(p.id, "invocation", 1.0, old)] * 3
                                      + [UsageEvent(p.id, "invocation", 1.0, young)])
    await plugin_usage_rollup(dl, days=40)
    daily = "SELECT count(*) FROM plugin_usage_daily WHERE plugin_id = $1"
    rolled = await admin_conn.fetchval(daily, p.id)
    (result,) = await dl.maintain(["plugins.usage_purge"])
    assert result.status == "ok" and result.counts["deleted"] >= 3
    left = await admin_conn.fetch(
        "SELECT occurred_at FROM plugin_usage_events WHERE plugin_id = $1", p.id)
    assert [r["occurred_at"] for r in left] == [young]
    assert rolled >= 1 and await admin_conn.fetchval(daily, p.id) == rolled


async def test_quality_refresh_scores_published_versions(
    dl: DataLayer, pub: Tenant,
) -> None:
    p, vs = await publish(dl, pub.owner, uniq("quality"), {"1.0.0": {}})
    async with dl.session(pub.owner) as db:
        v = await db.plugins.publish_version(p.id, "1.1.0", manifest(p.name, test_coverage=1.0),
                                             checksum=CHECKSUM, size_bytes=1)
        await db.plugins.approve_version(v.id)
        await db.plugins.add_advisory(p.id, "CVE-2026-9", "critical", "<1.1.0")
    out = await plugin_quality_refresh(dl)
    assert out["versions"] >= 2
    again = await plugin_quality_refresh(dl)
    assert again["versions"] == 0 or again["versions"] < out["versions"]
    async with dl.session(pub.owner, readonly=True) as db:
        scores = {x.version: x.quality_score for x in await db.plugins.versions(p.id)}
        plugin = await db.plugins.get(p.id)
    assert scores["1.1.0"] is not None and scores["1.0.0"] is not None
    assert scores["1.1.0"] > scores["1.0.0"] + 40  # tests + no critical advisory
    assert plugin is not None and plugin.quality_score == scores["1.1.0"]
    assert vs
