"""``dl.stats()`` / ``datalayer stats``: query figures and what to do about the database.

* ``queries``: this process's figures per registry query (``dl.metrics``), next to
  ``pg_stat_statements`` (every process's, matched through the provenance comment each
  registry statement starts with, ``/* datalayer:<name> */``) when the extension is
  installed in this database and loaded (``shared_preload_libraries``); otherwise
  ``pg_stat_statements`` says why not and what to do;
* ``slow_samples``: persisted slow executions of the last day (``query_performance``);
* ``recommendations``: from the catalog, each with the action to take: sequential scans on
  large tables, unused and duplicate indexes, tables with many dead rows, a low buffer
  cache hit ratio, and registry queries whose *generic* plan (what a prepared statement
  settles on after five executions) scans a large table sequentially.

Costs: a few catalog queries; with ``explain`` (the default) three round trips per registry
query, on one connection, in a transaction that is rolled back.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg

from datalayer.core.context import APP_ROLE, MAINT_ROLE, Context
from datalayer.core.errors import DataLayerError
from datalayer.core.sqlfile import Shape

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer
    from datalayer.core.session import Session

__all__ = ["Recommendation", "Stats", "Thresholds", "collect", "format_stats"]


@dataclass(frozen=True, slots=True)
class Thresholds:
    """What counts as a problem. The defaults suit production; tests lower them."""

    large_rows: int = 10_000  # a "large" table, for scans and plans
    min_seq_scans: int = 10  # sequential scans before a large table is reported
    unused_index_bytes: int = 1024 * 1024  # smaller unused indexes are not worth a line
    dead_rows: int = 10_000  # dead rows before a table is reported ...
    dead_ratio: float = 0.2  # ... and their share of the live rows
    cache_hit_ratio: float = 0.99  # below this (with enough reads) is low
    cache_min_blocks: int = 10_000  # hits + reads before the ratio means anything


@dataclass(frozen=True, slots=True)
class Recommendation:
    kind: str  # seq_scan | unused_index | duplicate_index | dead_tuples | cache_hit | plan
    subject: str  # the table, index or query
    detail: str  # what was observed
    action: str  # what to do

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject, "detail": self.detail,
                "action": self.action}


@dataclass(slots=True)
class Stats:
    queries: list[dict[str, Any]] = field(default_factory=list)
    pg_stat_statements: dict[str, Any] = field(default_factory=dict)
    slow_samples: list[dict[str, Any]] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)
    metrics: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "pg_stat_statements": self.pg_stat_statements,
                "slow_samples": self.slow_samples, "metrics": self.metrics,
                "recommendations": [r.as_dict() for r in self.recommendations]}


_PGSS_STATE = """
SELECT (SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements') AS installed,
       EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_stat_statements')
         AS available,
       'pg_stat_statements' = ANY (string_to_array(
         replace(current_setting('shared_preload_libraries'), ' ', ''), ',')) AS loaded
"""
_PGSS_STATE_UNPRIVILEGED = """
SELECT (SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements') AS installed,
       EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_stat_statements')
         AS available,
       NULL::bool AS loaded
"""
# Fixed text; the view's columns are those of PostgreSQL 13+ (total_exec_time, …).
_PGSS = r"""
SELECT substring(query FROM '^/\* datalayer:([^ ]+) \*/') AS name,
       sum(calls)::int8 AS calls, sum(total_exec_time)::float8 AS total_ms,
       sum(rows)::int8 AS rows, sum(shared_blks_hit)::int8 AS hits,
       sum(shared_blks_read)::int8 AS reads
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query LIKE '/* datalayer:%'
GROUP BY 1
"""


async def collect(dl: DataLayer, *, explain: bool = True,
                  thresholds: Thresholds | None = None) -> Stats:
    """Gather everything ``datalayer stats`` shows; see the module docstring."""
    t = thresholds or Thresholds()
    out = Stats()
    m = dl.metrics
    out.metrics = {"slow": m.slow, "samples_persisted": m.persisted,
                   "flush_errors": m.flush_errors,
                   "samples_dropped": m.dropped, "samples_buffered": len(m.buffer)}
    pgss: dict[str, dict[str, Any]] = {}
    figures = m.snapshot()  # before the catalog queries below add themselves
    async with dl.system() as db:
        out.pg_stat_statements, pgss = await _pg_stat_statements(db)
        since = datetime.now(UTC) - timedelta(days=1)
        out.slow_samples = [_plain(r) for r in await db.many(
            "query_performance.slowest", since=since, limit=20)]
        out.recommendations += await _catalog(db, t)
    for f in figures:
        row: dict[str, Any] = {k: (round(v, 3) if isinstance(v, float) else v)
                               for k, v in f.as_dict().items()}
        server = pgss.pop(f.name, None)
        row["server"] = server
        out.queries.append(row)
    for name, server in sorted(pgss.items(), key=lambda kv: -kv[1]["total_ms"]):
        out.queries.append({"name": name, "calls": 0, "server": server})
    if explain:
        out.recommendations += await _plans(dl, t)
    return out


def _plain(r: Any) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in dict(r).items()}


async def _pg_stat_statements(db: Session,
                              ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    conn = db.connection
    try:
        async with db.savepoint():
            state = await conn.fetchrow(_PGSS_STATE)
    except asyncpg.InsufficientPrivilegeError:  # no pg_monitor: try the view to find out
        state = await conn.fetchrow(_PGSS_STATE_UNPRIVILEGED)
    assert state is not None
    info: dict[str, Any] = {"installed": state["installed"] is not None,
                            "loaded": state["loaded"]}
    if not state["installed"] or state["loaded"] is False:
        steps = []
        if not state["loaded"]:
            steps.append("add pg_stat_statements to shared_preload_libraries and restart")
        if not state["installed"]:
            steps.append("CREATE EXTENSION pg_stat_statements in this database")
        if not state["available"]:
            steps = ["install the PostgreSQL contrib package", *steps]
        info.update(available=False, action="; then ".join(steps))
        return info, {}
    try:
        async with db.savepoint():  # the view may still refuse
            rows = await conn.fetch(_PGSS)
    except asyncpg.PostgresError as exc:
        info.update(available=False, action=f"pg_stat_statements failed: {exc}")
        return info, {}
    info["available"] = True
    by_name: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["name"] is None:
            continue
        total = r["hits"] + r["reads"]
        by_name[r["name"]] = {"calls": r["calls"], "total_ms": round(r["total_ms"], 3),
                              "mean_ms": round(r["total_ms"] / max(r["calls"], 1), 3),
                              "rows": r["rows"],
                              "hit_ratio": round(r["hits"] / total, 4) if total else None}
    return info, by_name


async def _catalog(db: Any, t: Thresholds) -> list[Recommendation]:
    recs: list[Recommendation] = []
    for r in await db.many("stats.seq_scanned_tables", min_rows=t.large_rows,
                           min_scans=t.min_seq_scans):
        recs.append(Recommendation(
            "seq_scan", r["table_name"],
            f"{r['seq_scans']} sequential scans vs {r['index_scans']} index scans, "
            f"{r['live_rows']} rows, {r['rows_read_by_seq_scans']} rows read by them",
            "find the queries that scan it (the 'plan' recommendations, pg_stat_statements) "
            "and add an index on their filter columns (led by org_id for tenant tables)"))
    for r in await db.many("stats.unused_indexes", min_bytes=t.unused_index_bytes):
        recs.append(Recommendation(
            "unused_index", r["index_name"],
            f"never scanned since statistics were reset, {r['bytes']} bytes, on "
            f"{r['table_name']}",
            f"if no replica or rare job uses it either: DROP INDEX CONCURRENTLY "
            f"{r['index_name']} (in a new migration); every write pays for it"))
    seen: set[str] = set()
    dups = await db.many("stats.duplicate_indexes")
    for r in sorted(dups, key=lambda r: (r["index_name"], not r["identical"])):
        if r["index_name"] in seen:  # one line per index: identical twin first
            continue
        seen.add(r["index_name"])
        how = "the same definition as" if r["identical"] else "a leading prefix of"
        recs.append(Recommendation(
            "duplicate_index", r["index_name"],
            f"{how} {r['covered_by']} on {r['table_name']} ({r['bytes']} bytes)",
            f"DROP INDEX CONCURRENTLY {r['index_name']} (in a new migration): "
            f"{r['covered_by']} serves the same lookups"))
    for r in await db.many("stats.dead_tuples", min_dead=t.dead_rows, ratio=t.dead_ratio):
        recs.append(Recommendation(
            "dead_tuples", r["table_name"],
            f"{r['dead_rows']} dead rows for {r['live_rows']} live ones "
            f"(last autovacuum: {r['last_autovacuum'] or 'never'})",
            f"VACUUM (ANALYZE) {r['table_name']}; if it recurs, lower its "
            "autovacuum_vacuum_scale_factor and look for long transactions holding "
            "vacuum back (datalayer health)"))
    hit = await db.one("stats.cache_hit")
    if hit is not None:
        total = hit["hits"] + hit["reads"]
        if total >= t.cache_min_blocks and hit["hits"] / total < t.cache_hit_ratio:
            recs.append(Recommendation(
                "cache_hit", "shared_buffers",
                f"buffer cache hit ratio {hit['hits'] / total:.4f} over {total} block reads "
                f"(below {t.cache_hit_ratio})",
                "raise shared_buffers (about a quarter of RAM) or the machine's memory, and "
                "remove sequential scans of large tables that push hot pages out"))
    return recs


async def _plans(dl: DataLayer, t: Thresholds) -> list[Recommendation]:
    """Registry queries whose generic plan has a Seq Scan on a table of ``large_rows``+.

    Each query is PREPAREd (types inferred) and EXPLAINed with ``plan_cache_mode =
    force_generic_plan`` and NULL arguments (a generic plan ignores them), as the app role
    with a tenant context, so RLS policies are in the plan, or, for the tables that role
    may not read, as the maintenance role. Nothing runs: EXPLAIN without ANALYZE.
    """
    async with dl.system() as db:
        sizes = {r["name"]: r["estimated_rows"] for r in await db.many("stats.table_rows")}
    ctx = Context(uuid.uuid4(), user_id=uuid.uuid4(), role="owner")
    recs: list[Recommendation] = []
    conn = await dl.connect_dedicated("stats", "to explain the registry's queries")
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            for n, q in enumerate(dl.registry.values()):
                if q.shape is Shape.COPY:
                    continue
                plan = await _explain(conn, q.sql, len(q.params), ctx, f"dl_stats_{n}")
                if plan is None:
                    continue
                big = sorted({rel for rel in _seq_scans(plan)
                              if sizes.get(rel, 0) >= t.large_rows})
                if big:
                    recs.append(Recommendation(
                        "plan", q.name,
                        f"its generic plan scans {', '.join(big)} sequentially "
                        f"({', '.join(str(sizes[b]) for b in big)} rows)",
                        f"add an index matching the filter of {q.name} ({q.source}) or "
                        "rewrite it so an existing one applies; check EXPLAIN as "
                        f"{APP_ROLE} with a context"))
            raise _Rollback
    except _Rollback:
        pass
    except (asyncpg.PostgresError, OSError) as exc:
        raise DataLayerError(f"stats: explaining registry queries failed: {exc}") from exc
    finally:
        await conn.close()
    return recs


class _Rollback(Exception):
    pass


async def _explain(conn: asyncpg.Connection, sql: str, nparams: int, ctx: Context,
                   name: str) -> Any | None:
    # Prepared statements outlive a rolled-back savepoint: one name per attempt, and the
    # connection (closed afterwards) takes them all away.
    args = ", ".join(["NULL"] * nparams)
    for i, setup in enumerate((ctx.local_sql, f"SET LOCAL ROLE {MAINT_ROLE}")):
        stmt = f"{name}_{i}"
        try:
            async with conn.transaction():  # savepoint: a failure leaves the rest usable
                await conn.execute(setup)
                await conn.execute(f"PREPARE {stmt} AS {sql}")
                text = await conn.fetchval(
                    f"EXPLAIN (FORMAT JSON) EXECUTE {stmt}{f'({args})' if args else ''}")
            return json.loads(text) if isinstance(text, str) else text
        except asyncpg.InsufficientPrivilegeError:
            continue
        except asyncpg.PostgresError:
            return None
    return None


def _seq_scans(plan: Any) -> Iterator[str]:
    if isinstance(plan, list):
        for p in plan:
            yield from _seq_scans(p)
    elif isinstance(plan, dict):
        if plan.get("Node Type") == "Seq Scan" and "Relation Name" in plan:
            yield str(plan["Relation Name"])
        for key in ("Plan", "Plans"):
            if key in plan:
                yield from _seq_scans(plan[key])


def format_stats(stats: Stats, *, top: int = 15) -> str:
    """``stats`` for a person: the top queries by total time, then the recommendations."""
    lines = [f"{'query':40} {'calls':>7} {'err':>4} {'rows':>8} {'total ms':>10} "
             f"{'p50':>7} {'p95':>7} {'p99':>7} {'max':>8} {'server calls':>12} "
             f"{'server ms':>10}"]
    for q in stats.queries[:top]:
        server = q.get("server") or {}
        lines.append(
            f"{q['name'][:40]:40} {q.get('calls', 0):>7} "
            f"{sum((q.get('errors') or {}).values()):>4} {q.get('rows', 0):>8} "
            f"{q.get('total_ms', 0):>10.2f} {q.get('p50_ms', 0):>7.2f} "
            f"{q.get('p95_ms', 0):>7.2f} {q.get('p99_ms', 0):>7.2f} {q.get('max_ms', 0):>8.2f} "
            f"{server.get('calls', '-'):>12} {server.get('total_ms', '-'):>10}")
    if not stats.queries:
        lines.append("(no registry query has run in this process, and pg_stat_statements "
                     "has nothing: see below)")
    if len(stats.queries) > top:
        lines.append(f"… {len(stats.queries) - top} more (--json for all)")
    p = stats.pg_stat_statements
    lines.append("pg_stat_statements: " + ("matched by provenance comment" if p.get("available")
                                           else f"unavailable ({p.get('action')})"))
    m = stats.metrics
    lines.append(f"slow queries: {m.get('slow', 0)} seen, {m.get('samples_persisted', 0)} "
                 f"persisted, {m.get('samples_dropped', 0)} dropped, "
                 f"{m.get('flush_errors', 0)} failed writes")
    for s in stats.slow_samples[:5]:
        lines.append(f"  slow {s['query_name']}: {s['samples']} samples, p95 "
                     f"{s['p95_ms']:.1f} ms, max {s['max_ms']:.1f} ms")
    lines.append(f"recommendations ({len(stats.recommendations)}):")
    for r in stats.recommendations:
        lines.append(f"  [{r.kind}] {r.subject}: {r.detail}\n      -> {r.action}")
    return "\n".join(lines)
