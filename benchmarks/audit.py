"""Audit scenarios: change-capture overhead, queries at 1,000,000 rows, chain verification.

* ``audit.capture_overhead``: one operation creates a workflow (10 nodes) and updates it
  (name and nodes: a second version), in one transaction, under an owner context, with the
  registry's SQL on raw asyncpg. The candidate runs on the bench database (workflows and
  workflow_versions captured), the baseline on a second database, ``<bench>_nocapture``,
  migrated the same way with those two tables uncaptured. Operations spread over ``ORGS``
  (64) organizations (the chain serializes writers of one organization). Target ratio
  <= 1.40.
* ``audit.query_by_resource``: ``db.audit.by_resource`` (first page of 50, newest first)
  in a read-only owner session, with ``SEED_ROWS`` (1,000,000) audit rows seeded server-side
  over 10 organizations and 2 months; baseline: the same SQL on raw asyncpg. Target p99 < 5 ms.
* ``audit.verify_chain``: one operation verifies a ``WINDOW`` (10,000 rows) keyset batch of a
  ``CHAIN_ROWS`` (200,000) row chain (recomputing every hash in SQL, links and gaps in
  Python); baseline: fetching the same window of the same columns without recomputing.
  ``rows_per_s`` (extra) is a full :func:`verify_chain` of the whole chain. Target
  >= 100,000 rows/s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from datalayer import Context
from datalayer.core import migrations
from datalayer.core.database import _init_connection
from datalayer.core.resources import resource_dir
from datalayer.repos.audit import verify_chain

from .harness import POOL_SIZE, BenchContext, Scenario

__all__ = ["SCENARIOS"]

ORGS = 64
SEED_ROWS = 1_000_000
SEED_ORGS = 10
RESOURCES = 10_000
CHAIN_ROWS = 200_000
WINDOW = 10_000
_NODES = [{"id": f"n{i}", "type": "code", "name": f"step {i}",
           "parameters": {"code": "return items", "retries": 2}} for i in range(10)]


def _org(i: int, tag: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"datalayer-bench-audit-{tag}-{i}")


# -- capture overhead ------------------------------------------------------------------------
# Candidate and baseline run the same registry SQL (workflows.create, then workflows.update
# changing name and nodes: a new version) on raw asyncpg under the same kind of context, the
# candidate on the bench database, the baseline on a second database migrated the same way
# where workflows and workflow_versions are not captured (app.audit_uncapture). Both pay the
# workflow triggers (content hash, versions); the ratio is what change capture adds.

@dataclass
class CaptureState:
    ctxs: list[str]
    create: tuple[str, tuple[str, ...]]
    update: tuple[str, tuple[str, ...]]
    plain: asyncpg.Pool


async def _tenants(conn: Any) -> list[str]:
    ctxs = []
    for i in range(ORGS):
        org, user = _org(i, "capture"), _org(i, "capture-owner")
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO organizations (id, slug, name) VALUES ($1, $2, 'audit bench') "
                "ON CONFLICT DO NOTHING", org, f"bench-audit-{org.hex[:12]}")
            await conn.execute(
                "INSERT INTO users (id, email) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                user, f"o-{user.hex[:12]}@bench.test")
            await conn.execute(
                "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, 'owner') "
                "ON CONFLICT DO NOTHING", org, user)
        ctxs.append(Context(org, user_id=user, role="owner", request_id=f"bench-{i}").local_sql)
    return ctxs


async def _capture_setup(bctx: BenchContext) -> CaptureState:
    base = bctx.settings.database_url
    name = base.rsplit("/", 1)[1].split("?")[0] + "_nocapture"
    url = base.rsplit("/", 1)[0] + "/" + name
    async with bctx.pool.acquire() as conn:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}"')
    await asyncio.to_thread(migrations.apply, dataclasses.replace(bctx.settings, database_url=url),
                            resource_dir("schema"))
    plain = await asyncpg.create_pool(url, min_size=1, max_size=POOL_SIZE,
                                      init=_init_connection)
    bctx.cleanup.push_async_callback(plain.close)
    async with plain.acquire() as conn:
        await conn.execute("CALL app.audit_uncapture('workflows')")
        await conn.execute("CALL app.audit_uncapture('workflow_versions')")
        await _tenants(conn)
    async with bctx.pool.acquire() as conn:
        ctxs = await _tenants(conn)
    reg = bctx.dl.registry
    return CaptureState(ctxs, (reg["workflows.create"].sql, reg["workflows.create"].params),
                        (reg["workflows.update"].sql, reg["workflows.update"].params), plain)


async def _write(pool: asyncpg.Pool, s: CaptureState, i: int) -> None:
    create: dict[str, Any] = {
        "name": f"workflow {i}", "description": "", "nodes": _NODES, "edges": [],
        "settings": {}, "status": "draft", "owner_id": None, "team_id": None, "tags": [],
        "is_template": False, "visibility": "organization", "current_version": 1}
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(s.ctxs[i % ORGS])
        wid = await conn.fetchval(s.create[0], *(create[p] for p in s.create[1]), column=1)
        update: dict[str, Any] = {
            "name": f"workflow {i} v2", "description": None, "nodes": _NODES[:9],
            "edges": None, "settings": None, "status": None, "tags": None,
            "is_template": None, "visibility": None, "id": wid, "expected_version": None}
        await conn.fetchrow(s.update[0], *(update[p] for p in s.update[1]))


async def _capture(b: BenchContext, s: CaptureState, i: int) -> None:
    await _write(b.pool, s, i)


async def _capture_raw(b: BenchContext, s: CaptureState, i: int) -> None:
    await _write(s.plain, s, i)


# -- query by resource -----------------------------------------------------------------------

@dataclass
class QueryState:
    ctxs: list[Context]
    sql: str
    params: tuple[str, ...]


# Seeded rows are for reading only: they are written with the chain triggers off (a valid
# chain of a million rows would take the row-at-a-time trigger minutes), so their hashes are
# placeholders. The verify scenario seeds its own valid chain.
_SEED = """
INSERT INTO audit_events (org_id, seq, id, at, action, result, risk, frameworks,
                          actor_user_id, subject_user_id, resource_type, resource_id, ip,
                          user_agent, request_id, details, pii_commit, prev_hash, row_hash)
SELECT o.org, g, gen_random_uuid(), now() - (random() * interval '50 days'),
       (ARRAY['workflow.updated', 'credential.decrypt', 'auth.login', 'data.export'])[1 + g % 4],
       'success', 'low', '{SOX}', o.org, NULL, 'workflow', 'wf-' || (g % $2), '10.0.0.1',
       'bench', 'req-' || g, jsonb_build_object('n', g), '\\x', '\\x', '\\x'
FROM unnest($1::uuid[]) AS o(org), generate_series(1, $3) g
"""


async def _query_setup(bctx: BenchContext) -> QueryState:
    orgs = [_org(i, "query") for i in range(SEED_ORGS)]
    async with bctx.pool.acquire() as conn:
        have = await conn.fetchval("SELECT count(*) FROM audit_events WHERE org_id = $1",
                                   orgs[0])
        if have < SEED_ROWS // SEED_ORGS:
            await conn.execute("SET ROLE datalayer_maint")
            await conn.execute("SELECT app.ensure_partitions(1, 2)")
            await conn.execute("RESET ROLE")
            async with conn.transaction():
                await conn.execute("SET LOCAL session_replication_role = replica")
                await conn.execute(_SEED, orgs, RESOURCES, SEED_ROWS // SEED_ORGS)
            await conn.execute("ANALYZE audit_events")
    q = bctx.dl.registry["audit.by_resource"]
    return QueryState([Context(o, user_id=uuid.uuid4(), role="owner") for o in orgs],
                      q.sql, q.params)


async def _query(b: BenchContext, s: QueryState, i: int) -> None:
    async with b.dl.session(s.ctxs[i % SEED_ORGS], readonly=True) as db:
        await db.audit.by_resource("workflow", f"wf-{(i * 7919) % RESOURCES}", limit=50)


async def _query_raw(b: BenchContext, s: QueryState, i: int) -> None:
    from datalayer.repos._base import LAST

    args: dict[str, Any] = {"org_id": s.ctxs[i % SEED_ORGS].org_id,
                            "resource_type": "workflow",
                            "resource_id": f"wf-{(i * 7919) % RESOURCES}",
                            "before_at": LAST[0], "before_seq": 2**62, "limit": 50}
    async with b.pool.acquire() as conn:
        await conn.fetch(s.sql, *(args[p] for p in s.params))


async def _query_extra(b: BenchContext, s: QueryState) -> dict[str, Any]:
    async with b.pool.acquire() as conn:
        n = await conn.fetchval("SELECT count(*) FROM audit_events")
    return {"audit_rows": n, "p99_target_ms": 5.0}


# -- chain verification ----------------------------------------------------------------------

@dataclass
class VerifyState:
    org: uuid.UUID
    sql: str
    params: tuple[str, ...]
    rows_per_s: float = 0.0


async def _verify_setup(bctx: BenchContext) -> VerifyState:
    org = _org(0, "verify")
    # A connection of its own: a pooled one may carry a tenant context from an earlier
    # scenario, and the chain trigger leaves rows of another organization than the context's
    # alone (RLS refuses them for the app role; this login role is not under RLS).
    conn = await asyncpg.connect(bctx.settings.database_url)
    try:
        have = await conn.fetchval("SELECT count(*) FROM audit_events WHERE org_id = $1", org)
        if have < CHAIN_ROWS:
            # Through the chain trigger (valid hashes), as maintenance importing history.
            await conn.execute(
                "INSERT INTO audit_events (org_id, action, resource_type, resource_id, ip, "
                "user_agent, details, personal) "
                "SELECT $1, 'workflow.updated', 'workflow', 'wf-' || (g % 1000), '10.0.0.1', "
                "'bench', jsonb_build_object('n', g), jsonb_build_object('email', 'x@y.z') "
                "FROM generate_series(1, $2) g", org, CHAIN_ROWS - have)
    finally:
        await conn.close()
    q = bctx.dl.registry["audit.verify_events"]
    return VerifyState(org, q.sql, q.params)


async def _verify(b: BenchContext, s: VerifyState, i: int) -> None:
    start = 1 + (i * WINDOW) % (CHAIN_ROWS - WINDOW)
    async with b.dl.system() as db:
        rows = await db.many("audit.verify_events", org_id=s.org, from_seq=start,
                             to_seq=start + WINDOW)
    prev = rows[0][1]
    expect = start
    for seq, prev_hash, row_hash, ok in rows:
        if seq != expect or prev_hash != prev or not ok:
            raise AssertionError(f"bench chain broken at {seq}")
        prev, expect = row_hash, seq + 1


async def _verify_raw(b: BenchContext, s: VerifyState, i: int) -> None:
    start = 1 + (i * WINDOW) % (CHAIN_ROWS - WINDOW)
    async with b.pool.acquire() as conn:
        await conn.fetch("SELECT seq, prev_hash, row_hash, true AS ok FROM audit_events "
                         "WHERE org_id = $1 AND seq >= $2 AND seq < $3 ORDER BY seq",
                         s.org, start, start + WINDOW)


async def _verify_extra(b: BenchContext, s: VerifyState) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = await verify_chain(b.dl, s.org)
    secs = time.perf_counter() - t0
    n = report.rows["events"] + report.rows["changes"]
    return {"chain_rows": n, "chain_ok": report.ok,
            "rows_per_s": round(n / secs, 1) if secs else 0.0, "rows_per_s_target": 100_000}


SCENARIOS = [
    Scenario("audit.capture_overhead", _capture_setup, _capture, _capture_raw, target=1.40,
             description="insert + update of a workflow row, with vs without change capture"),
    Scenario("audit.query_by_resource", _query_setup, _query, _query_raw, extra=_query_extra,
             description=f"first page of events of one resource at {SEED_ROWS:,} rows"),
    Scenario("audit.verify_chain", _verify_setup, _verify, _verify_raw, extra=_verify_extra,
             description=f"verify a {WINDOW:,}-row window of a {CHAIN_ROWS:,}-row chain"),
]
