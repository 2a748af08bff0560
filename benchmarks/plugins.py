"""Plugin scenarios at 100,000 plugins (1,000,000 versions) across 1,000 publishers.

* ``plugins.search``: ``db.plugins.search(word, limit=20)`` as a member of a consumer
  organization: ranked full-text search of the public catalog plus the organization's own
  plugins (``app.plugin_search``: the partial GIN index over listed plugins is an index qual
  inside the definer function). Words cycle through the seed's 2,000-word vocabulary (each
  matches about 250 plugins, ranked; 20 returned). Target p99 < 5 ms.
* ``plugins.resolve``: ``db.plugins.resolve({root: '^1'})`` over a graph of 50 plugins with
  20 versions each (every version depends on the next two plugins with ``^`` and ``<``
  ranges): one round trip for the candidate graph (recursive CTE; one row per plugin with
  its versions packed in a text, ``plugins.graph_packed``), resolution in process (only the
  versions looked at are parsed). The baseline is that graph query alone.
  Target p99 < 7.5 ms.
* ``plugins.policy_check``: ``db.plugins.policy_check(plugin, version, 'production')``
  with four policies, three approval stages, 100 approved publishers, advisories and
  exemptions in place, over 1,000 (plugin, version) pairs. Target p99 < 2.5 ms.
* ``plugins.usage_ingest``: ``db.plugins.ingest_usage`` of 1,000 events per statement
  (unnest) in a tenant session. ``events_per_s``; target >= 50,000/s.

The baseline runs the same SQL on raw asyncpg in a transaction that first sets the same
context (``Context.local_sql``), since the definer functions read it. The data is seeded
server-side (INSERT ... SELECT generate_series, triggers off while seeding) once per
database; later runs reuse it.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from datalayer import Context
from datalayer.repos.plugins import UsageEvent

from .harness import BenchContext, Scenario, throughput

__all__ = ["SCENARIOS"]

PLUGINS = 100_000
VERSIONS_PER_PLUGIN = 10
PUBLISHERS = 1_000
GRAPH_PLUGINS, GRAPH_VERSIONS = 50, 20
BULK = 1_000
# A 2,000-word vocabulary of pseudo-words (three syllables): each plugin's name, summary,
# tags and description use five of them, so a word matches about 250 plugins, as a
# real catalog's specific words do.
_SYL = ("ka", "lu", "mo", "ri", "ta", "ne", "so", "vi", "po", "de", "xa", "zu", "fi", "go",
        "he", "ji", "qu", "we", "ya", "bo")
WORDS = tuple(a + b + c for a in _SYL for b in _SYL for c in _SYL[:5])
CATEGORIES = ("data", "ai", "communication", "devops", "finance", "sales", "marketing",
              "security", "productivity", "analytics")


_SEED_SQL = """
SET LOCAL session_replication_role = replica;
INSERT INTO organizations (id, slug, name)
SELECT md5('bplugpub' || g)::uuid, 'bplugpub-' || g, 'Publisher ' || g
FROM generate_series(1, {pubs}) g
ON CONFLICT DO NOTHING;
INSERT INTO organizations (id, slug, name)
VALUES (md5('bplugconsumer')::uuid, 'bplugconsumer', 'Plugin consumer'),
       (md5('bpluggraph')::uuid, 'bpluggraph', 'Graph publisher')
ON CONFLICT DO NOTHING;
INSERT INTO plugins (org_id, id, name, display_name, summary, description, tags, categories,
                     compat, license, visibility, status, quality_score, latest_version)
SELECT md5('bplugpub' || (g % {pubs} + 1))::uuid, md5('bplug' || g)::uuid,
       w.a || '-' || w.b || '-' || g, initcap(w.a || ' ' || w.b),
       'Turns ' || w.c || ' into ' || w.d || ' records',
       'A plugin for ' || w.a || ' and ' || w.c || ' workflows; handles ' || w.e || '.',
       ARRAY[w.b, w.d], ARRAY[($2::text[])[1 + g % cardinality($2::text[])]],
       CASE g % 3 WHEN 0 THEN '{{v1}}'::text[] WHEN 1 THEN '{{v1,v2}}' ELSE '{{v2}}' END,
       CASE g % 4 WHEN 0 THEN 'MIT' WHEN 1 THEN 'Apache-2.0' WHEN 2 THEN 'GPL-3.0'
                  ELSE 'BSD-3-Clause' END,
       CASE WHEN g % 10 = 0 THEN 'private' ELSE 'public' END, 'approved',
       (g * 7919 % 10000) / 100.0, '1.{last}.0'
FROM generate_series(1, {plugins}) g,
LATERAL (SELECT ($1::text[])[1 + (g * 7) % cardinality($1::text[])] AS a,
                ($1::text[])[1 + (g * 13 + 5) % cardinality($1::text[])] AS b,
                ($1::text[])[1 + (g * 31 + 11) % cardinality($1::text[])] AS c,
                ($1::text[])[1 + (g * 53 + 17) % cardinality($1::text[])] AS d,
                ($1::text[])[1 + (g * 97 + 23) % cardinality($1::text[])] AS e) w;
INSERT INTO plugin_versions (org_id, id, plugin_id, version, manifest, checksum, size_bytes,
                             status, published_at)
SELECT p.org_id, md5(p.id::text || '/' || k)::uuid, p.id, '1.' || k || '.0',
       '{{"name": "x", "entry_point": "p.m:run", "permissions": [], "config_schema": {{}}}}',
       'sha256:' || repeat('a', 64), 1000, 'approved', now()
FROM plugins p, generate_series(0, {vlast}) k
WHERE p.id = md5('bplug' || split_part(p.name, '-', 3))::uuid;
-- the resolve graph: 50 plugins x 20 versions of one publisher
INSERT INTO plugins (org_id, id, name, display_name, visibility, status, license)
SELECT md5('bpluggraph')::uuid, md5('bgraph' || j)::uuid, 'graph-' || j, 'Graph ' || j,
       'public', 'approved', 'MIT'
FROM generate_series(0, {gp} - 1) j;
INSERT INTO plugin_versions (org_id, id, plugin_id, version, manifest, checksum, size_bytes,
                             status, published_at, dep_plugin_ids, dep_ranges)
SELECT md5('bpluggraph')::uuid, md5('bgraph' || j || '/' || k)::uuid, md5('bgraph' || j)::uuid,
       '1.' || k || '.0',
       '{{"name": "x", "entry_point": "p.m:run", "permissions": [], "config_schema": {{}}}}',
       'sha256:' || repeat('a', 64), 1000, 'approved', now(),
       (ARRAY[md5('bgraph' || (j + 1))::uuid,
              md5('bgraph' || (j + 2))::uuid])[1:least(2, {gp} - 1 - j)],
       (ARRAY['>=1.' || (k / 2) || '.0 <2.0.0-0',
              '>=1.0.0 <1.' || (k + 1) || '.0'])[1:least(2, {gp} - 1 - j)]
FROM generate_series(0, {gp} - 1) j, generate_series(0, {gv} - 1) k;
INSERT INTO plugin_dependencies (org_id, version_id, dep_plugin_id, range)
SELECT v.org_id, v.id, d.p, d.r
FROM plugin_versions v, unnest(v.dep_plugin_ids, v.dep_ranges) AS d(p, r)
WHERE v.org_id = md5('bpluggraph')::uuid;
UPDATE plugins p SET dep_plugin_ids = ARRAY(
  SELECT DISTINCT u FROM plugin_versions v, unnest(v.dep_plugin_ids) u
  WHERE v.org_id = p.org_id AND v.plugin_id = p.id ORDER BY u)
WHERE p.org_id = md5('bpluggraph')::uuid;
-- governance of the consumer
INSERT INTO plugin_policies (org_id, policy, config)
VALUES (md5('bplugconsumer')::uuid, 'no_critical_vulnerability', '{{}}'),
       (md5('bplugconsumer')::uuid, 'approved_publishers_only', '{{}}'),
       (md5('bplugconsumer')::uuid, 'license_allowlist',
        '{{"licenses": ["MIT", "Apache-2.0", "BSD-3-Clause"]}}'),
       (md5('bplugconsumer')::uuid, 'production_approved_only', '{{}}');
INSERT INTO plugin_approved_publishers (org_id, publisher_org_id)
SELECT md5('bplugconsumer')::uuid, md5('bplugpub' || g)::uuid FROM generate_series(1, 100) g;
INSERT INTO plugin_approval_stages (org_id, position, name, required_role, environments)
SELECT md5('bplugconsumer')::uuid, s, 'stage ' || s, 'admin',
       '{{development,staging,production}}'
FROM generate_series(1, 3) s;
INSERT INTO plugin_approvals (org_id, plugin_id, version_id, stage_id, decision)
SELECT md5('bplugconsumer')::uuid, md5('bplug' || g)::uuid,
       md5(md5('bplug' || g)::uuid::text || '/9')::uuid, s.id, 'approved'
FROM generate_series(1, 2000) g, plugin_approval_stages s
WHERE s.org_id = md5('bplugconsumer')::uuid;
INSERT INTO plugin_advisories (org_id, plugin_id, identifier, severity, affected, fixed_in)
SELECT p.org_id, p.id, 'CVE-BENCH-' || g, CASE g % 4 WHEN 0 THEN 'critical' ELSE 'high' END,
       '<1.8.0', '1.8.0'
FROM generate_series(1, 5000) g JOIN plugins p ON p.id = md5('bplug' || (g * 17))::uuid;
INSERT INTO plugin_exemptions (org_id, plugin_id, policy, justification, approved_by,
                               expires_at)
SELECT md5('bplugconsumer')::uuid, md5('bplug' || g)::uuid, 'license_allowlist',
       'benchmark exemption', md5('bench')::uuid, now() + interval '10 years'
FROM generate_series(1, 2000, 7) g;
SET LOCAL session_replication_role = origin;
"""


@dataclass
class PluginsState:
    consumer: uuid.UUID
    ctx: Context
    root: uuid.UUID
    pairs: list[tuple[uuid.UUID, uuid.UUID]]
    sql: dict[str, str]
    params: dict[str, tuple[str, ...]]
    spans: dict[str, list[tuple[float, float, int]]] = field(
        default_factory=lambda: {"candidate": [], "baseline": []})


async def _seed(conn: Any) -> None:
    done = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM organizations WHERE slug = 'bplugconsumer')")
    if done:
        return
    sql = _SEED_SQL.format(pubs=PUBLISHERS, plugins=PLUGINS, vlast=VERSIONS_PER_PLUGIN - 1,
                           last=VERSIONS_PER_PLUGIN - 1, gp=GRAPH_PLUGINS, gv=GRAPH_VERSIONS)
    async with conn.transaction():
        for stmt in [s.strip() for s in sql.split(";\n") if s.strip()]:
            if "$1" in stmt or "$2" in stmt:
                await conn.execute(stmt, list(WORDS), list(CATEGORIES))
            else:
                await conn.execute(stmt)
    await conn.execute("VACUUM ANALYZE plugins")
    await conn.execute("VACUUM ANALYZE plugin_versions")
    for table in ("plugin_dependencies", "plugin_approvals", "plugin_advisories",
                  "plugin_exemptions", "plugin_approved_publishers"):
        await conn.execute(f"VACUUM ANALYZE {table}")


async def _setup(bctx: BenchContext) -> PluginsState:
    cached: PluginsState | None = bctx.cache.get("plugins")
    if cached is not None:
        return cached
    async with bctx.pool.acquire() as conn:
        t0 = time.perf_counter()
        await _seed(conn)
        bctx.cache["plugins_seed_s"] = round(time.perf_counter() - t0, 1)
        consumer = await conn.fetchval("SELECT md5('bplugconsumer')::uuid")
        root = await conn.fetchval("SELECT md5('bgraph0')::uuid")
        rows = await conn.fetch(
            "SELECT p.id, v.id AS vid FROM plugins p JOIN plugin_versions v "
            "ON v.org_id = p.org_id AND v.plugin_id = p.id "
            "WHERE p.id = ANY(SELECT md5('bplug' || g)::uuid FROM generate_series(1, 2000) g)"
            " AND v.version IN ('1.7.0', '1.9.0')")
    ctx = Context(consumer, user_id=uuid.uuid4(), role="admin")
    reg = bctx.dl.registry
    names = ("plugins.search", "plugins.graph_packed", "plugins.policy_check",
             "plugins.ingest_usage")
    state = PluginsState(consumer, ctx, root,
                         [(r["id"], r["vid"]) for r in rows][:1000],
                         {n: reg[n].sql for n in names}, {n: reg[n].params for n in names})
    random.Random(5).shuffle(state.pairs)
    bctx.cache["plugins"] = state
    return state


async def _raw(b: BenchContext, s: PluginsState, name: str, args: dict[str, Any],
               many: bool = True) -> Any:
    async with b.pool.acquire() as conn, conn.transaction():
        await conn.execute(s.ctx.local_sql)
        vals = [args[p] for p in s.params[name]]
        if many:
            return await conn.fetch(s.sql[name], *vals)
        return await conn.execute(s.sql[name], *vals)


# -- search -----------------------------------------------------------------------------------

async def _search(b: BenchContext, s: PluginsState, i: int) -> None:
    async with b.dl.session(s.ctx, readonly=True) as db:
        page = await db.plugins.search(WORDS[(i * 37) % len(WORDS)], limit=20)
    assert page.items


async def _search_raw(b: BenchContext, s: PluginsState, i: int) -> None:
    await _raw(b, s, "plugins.search", {
        "query": WORDS[(i * 37) % len(WORDS)], "category": None, "publisher": None, "compat": None,
        "min_quality": None, "after_rank": 0.0, "after_id": None, "limit": 20, "fuzzy": False})


async def _search_extra(b: BenchContext, s: PluginsState) -> dict[str, Any]:
    return {"p99_target_ms": 5.0, "plugins": PLUGINS, "publishers": PUBLISHERS,
            "seed_s": b.cache.get("plugins_seed_s")}


# -- resolve ----------------------------------------------------------------------------------

async def _resolve(b: BenchContext, s: PluginsState, i: int) -> None:
    async with b.dl.session(s.ctx, readonly=True) as db:
        res = await db.plugins.resolve({s.root: "^1"})
    assert len(res.installs) == GRAPH_PLUGINS


async def _resolve_raw(b: BenchContext, s: PluginsState, i: int) -> None:
    await _raw(b, s, "plugins.graph_packed", {"roots": [s.root]})


async def _resolve_extra(b: BenchContext, s: PluginsState) -> dict[str, Any]:
    return {"p99_target_ms": 7.5, "graph": f"{GRAPH_PLUGINS}x{GRAPH_VERSIONS}",
            "baseline": "the graph query only (no resolution)"}


# -- policy check -----------------------------------------------------------------------------

async def _policy(b: BenchContext, s: PluginsState, i: int) -> None:
    pid, vid = s.pairs[i % len(s.pairs)]
    async with b.dl.session(s.ctx, readonly=True) as db:
        await db.plugins.policy_check(pid, vid, "production")


async def _policy_raw(b: BenchContext, s: PluginsState, i: int) -> None:
    pid, vid = s.pairs[i % len(s.pairs)]
    await _raw(b, s, "plugins.policy_check",
               {"plugin_id": pid, "version_id": vid, "environment": "production"})


async def _policy_extra(b: BenchContext, s: PluginsState) -> dict[str, Any]:
    return {"p99_target_ms": 2.5, "pairs": len(s.pairs)}


# -- usage ingest -----------------------------------------------------------------------------

def _events(s: PluginsState, i: int) -> list[UsageEvent]:
    now = datetime.now(UTC)
    pid = s.pairs[i % len(s.pairs)][0]
    return [UsageEvent(pid, "error" if k % 50 == 0 else "invocation", float(k % 200), now)
            for k in range(BULK)]


async def _ingest(b: BenchContext, s: PluginsState, i: int) -> None:
    events = _events(s, i)
    t0 = time.perf_counter()
    async with b.dl.session(s.ctx) as db:
        await db.plugins.ingest_usage(events)
    s.spans["candidate"].append((t0, time.perf_counter(), len(events)))


async def _ingest_raw(b: BenchContext, s: PluginsState, i: int) -> None:
    events = _events(s, i)
    t0 = time.perf_counter()
    await _raw(b, s, "plugins.ingest_usage", {
        "org_id": None, "plugin_ids": [e.plugin_id for e in events],
        "kinds": [e.kind for e in events], "latencies": [e.latency_ms for e in events],
        "occurred_at": [e.occurred_at for e in events]}, many=False)
    s.spans["baseline"].append((t0, time.perf_counter(), len(events)))


async def _ingest_extra(b: BenchContext, s: PluginsState) -> dict[str, Any]:
    out = {"batch": BULK, "events_per_s": throughput(s.spans["candidate"]),
           "baseline_events_per_s": throughput(s.spans["baseline"]),
           "target_events_per_s": 50_000.0}
    s.spans = {"candidate": [], "baseline": []}
    return out


SCENARIOS: list[Scenario] = [
    Scenario("plugins.search", _setup, _search, _search_raw, extra=_search_extra,
             description="ranked catalog search, 20 hits, 100k plugins"),
    Scenario("plugins.resolve", _setup, _resolve, _resolve_raw, extra=_resolve_extra,
             description="resolve a 50x20 dependency graph (one graph query + Python)"),
    Scenario("plugins.policy_check", _setup, _policy, _policy_raw, extra=_policy_extra,
             description="install-time policy check, 4 policies + 3 stages"),
    Scenario("plugins.usage_ingest", _setup, _ingest, _ingest_raw, extra=_ingest_extra,
             description=f"ingest {BULK} usage events in one statement"),
]
