"""``dl.stats()``: in-process figures, pg_stat_statements detection, recommendations."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from datalayer import Context, DataLayer
from datalayer.stats import Recommendation, Thresholds, collect, format_stats
from tests.conftest import TenantFactory, make_layer, make_settings

LOW = Thresholds(large_rows=10_000, min_seq_scans=2, unused_index_bytes=0, dead_rows=1000,
                 dead_ratio=0.2, cache_hit_ratio=1.01, cache_min_blocks=0)


@pytest.fixture
async def scratch(admin_conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A schema with the conditions: a large table read by sequential scans, with an
    unused index; a table full of dead rows; duplicate and prefix indexes."""
    schema = f"stats_{uuid.uuid4().hex[:8]}"
    c = admin_conn
    await c.execute(f"""
        CREATE SCHEMA {schema};
        CREATE TABLE {schema}.big (id int PRIMARY KEY, x int NOT NULL, y int NOT NULL);
        INSERT INTO {schema}.big SELECT g, g % 1000, g FROM generate_series(1, 20000) g;
        CREATE INDEX big_y_unused ON {schema}.big (y);
        CREATE TABLE {schema}.churn (id int PRIMARY KEY, v text)
          WITH (autovacuum_enabled = false);
        INSERT INTO {schema}.churn SELECT g, 'v' FROM generate_series(1, 3000) g;
        DELETE FROM {schema}.churn WHERE id > 500;
        CREATE TABLE {schema}.dup (a int, b int);
        CREATE INDEX dup_a_1 ON {schema}.dup (a);
        CREATE INDEX dup_a_2 ON {schema}.dup (a);
        CREATE INDEX dup_a_b ON {schema}.dup (a, b);
        ANALYZE {schema}.big;
        GRANT USAGE ON SCHEMA {schema} TO datalayer_maint;
        GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO datalayer_maint;
    """)
    for _ in range(3):
        await c.fetchval(f"SELECT count(*) FROM {schema}.big WHERE x = 7")
    await c.execute("SELECT pg_stat_force_next_flush()")
    await c.fetchval("SELECT 1")  # a new statement: the counters are flushed now
    try:
        yield schema
    finally:
        await c.execute(f"DROP SCHEMA {schema} CASCADE")


def _about(recs: list[Recommendation], kind: str, subject: str) -> Recommendation | None:
    return next((r for r in recs if r.kind == kind and r.subject == subject), None)


async def test_catalog_recommendations_name_the_problem_and_the_fix(
    dl: DataLayer, scratch: str,
) -> None:
    stats = await collect(dl, explain=False, thresholds=LOW)
    recs = stats.recommendations
    seq = _about(recs, "seq_scan", f"{scratch}.big")
    assert seq is not None and "index" in seq.action
    unused = _about(recs, "unused_index", f"{scratch}.big_y_unused")
    assert unused is not None and "DROP INDEX CONCURRENTLY" in unused.action
    assert _about(recs, "unused_index", f"{scratch}.big_pkey") is None  # backs a constraint
    dead = _about(recs, "dead_tuples", f"{scratch}.churn")
    assert dead is not None and "VACUUM" in dead.action and "2500 dead rows" in dead.detail
    dup = _about(recs, "duplicate_index", f"{scratch}.dup_a_2")
    assert dup is not None and f"same definition as {scratch}.dup_a_1" in dup.detail
    prefix = _about(recs, "duplicate_index", f"{scratch}.dup_a_1")
    assert prefix is not None and "leading prefix" in prefix.detail
    assert _about(recs, "duplicate_index", f"{scratch}.dup_a_b") is None
    assert _about(recs, "cache_hit", "shared_buffers") is not None  # threshold above 1
    assert all(r.action for r in recs)


async def test_production_thresholds_keep_a_fresh_schema_quiet(dl: DataLayer) -> None:
    """The layer's own schema has no duplicate index (a regression check)."""
    stats = await collect(dl, explain=False)
    dups = [r for r in stats.recommendations if r.kind == "duplicate_index"
            and r.subject.startswith("public.")]
    assert not dups, dups


async def test_a_registry_query_whose_generic_plan_seq_scans_a_large_table_is_named(
    dl: DataLayer, scratch: str, tmp_path: Path,
) -> None:
    (tmp_path / "scratchq.sql").write_text(
        f"-- name: by_x :many\nSELECT id FROM {scratch}.big WHERE x = :x;\n"
        f"-- name: by_id :one\nSELECT id FROM {scratch}.big WHERE id = :id;\n")
    layer = make_layer(make_settings(dl.settings.database_url, migrate_on_start=False),
                       extra_queries=[tmp_path])
    async with layer:
        stats = await collect(layer, thresholds=LOW)
    plan = _about(stats.recommendations, "plan", "scratchq.by_x")
    assert plan is not None and "big" in plan.detail and "index" in plan.action
    assert _about(stats.recommendations, "plan", "scratchq.by_id") is None
    # The layer's own queries: none scans a large table here (nothing is large).
    assert not [r for r in stats.recommendations
                if r.kind == "plan" and not r.subject.startswith("scratchq.")]


async def test_in_process_figures_and_pg_stat_statements_state(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant()
    async with dl.session(t.owner, readonly=True) as db:
        await db.orgs.get(t.org_id)
    stats = await dl.stats(explain=False)
    by_name = {q["name"]: q for q in stats.queries}
    assert by_name["orgs.get"]["calls"] >= 1
    p = stats.pg_stat_statements
    assert set(p) >= {"installed", "loaded", "available"}
    if not p["available"]:  # this machine: not in shared_preload_libraries
        assert "shared_preload_libraries" in p["action"] or "EXTENSION" in p["action"]
    text = format_stats(stats, top=len(stats.queries))  # every query, whatever ran before
    assert "orgs.get" in text and "recommendations" in text
    assert set(stats.as_dict()) == {"queries", "pg_stat_statements", "slow_samples",
                                    "metrics", "recommendations"}


def test_cli_stats_json_and_text(database_url: str) -> None:
    from tests.test_cli import cli

    result = cli("stats", "--json", "--no-explain", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"queries", "pg_stat_statements", "recommendations"} <= set(data)
    text = cli("stats", "--no-explain", "--top", "3", DATABASE_URL=database_url)
    assert text.returncode == 0 and "recommendations (" in text.stdout


PGSS_URL = os.environ.get("DATALAYER_TEST_PGSS_URL")


@pytest.mark.skipif(not PGSS_URL, reason="set DATALAYER_TEST_PGSS_URL to an admin URL of a "
                    "server with pg_stat_statements in shared_preload_libraries")
async def test_pg_stat_statements_rows_are_matched_by_provenance_comment() -> None:
    assert PGSS_URL is not None
    name = f"dl_test_pgss_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PGSS_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = PGSS_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE EXTENSION pg_stat_statements")
        await conn.close()
        async with make_layer(make_settings(url)) as layer:
            org_id = uuid.uuid4()
            ctx = Context(org_id, user_id=uuid.uuid4(), role="owner")
            async with layer.session(ctx) as db:
                await db.orgs.create(slug=f"p-{uuid.uuid4().hex[:8]}", name="P")
            for _ in range(3):
                async with layer.session(ctx, readonly=True) as db:
                    await db.orgs.get(org_id)
            stats = await layer.stats(explain=False)
        assert stats.pg_stat_statements == {"installed": True, "loaded": True,
                                            "available": True}
        by_name = {q["name"]: q for q in stats.queries}
        assert by_name["orgs.get"]["calls"] == 3
        assert by_name["orgs.get"]["server"]["calls"] == 3
        assert by_name["orgs.create"]["server"]["rows"] == 1
    finally:
        admin = await asyncpg.connect(PGSS_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
