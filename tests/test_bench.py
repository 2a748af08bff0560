"""The benchmark harness, run briefly against the test database."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest

from benchmarks import harness
from datalayer import Settings, ValidationError

CONTRACT = ("scenario", "concurrency", "ops_per_s", "p50_ms", "p95_ms", "p99_ms",
            "baseline_p50_ms", "ratio")


async def test_harness_writes_contract_rows(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    out = io.StringIO()
    err = io.StringIO()
    rows = await harness.run(settings, ["registry.one", "session.one.switch_tenant"],
                             json_path=path, duration_s=0.4, concurrency=(1, 2), out=out,
                             progress=err)
    data = orjson.loads(path.read_bytes())
    assert data == rows
    assert [(r["scenario"], r["concurrency"]) for r in data] == [
        ("registry.one", 1), ("registry.one", 2),
        ("session.one.switch_tenant", 1), ("session.one.switch_tenant", 2),
    ]
    for row in data:
        assert tuple(row)[: len(CONTRACT)] == CONTRACT
        for key in CONTRACT[2:]:
            assert isinstance(row[key], float) and row[key] > 0, (key, row)
        assert row["ratio"] == round(row["p50_ms"] / row["baseline_p50_ms"], 3)
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["baseline_ops_per_s"] > 0
        assert 0 < row["baseline_p50_ms"] <= row["baseline_p99_ms"]
        assert row["target"] in (1.05, 3.2)
    table = out.getvalue().splitlines()
    assert table[0].split()[:3] == ["scenario", "c", "ops/s"]
    assert len(table) == 5
    assert "session.one.switch_tenant" in err.getvalue()


def test_verdict_checks_every_target_the_row_carries() -> None:
    row = {"ratio": 1.2, "p99_ms": 1.9, "rows_per_s": 150_000.0}
    assert harness.verdict(row) == "-"
    assert harness.verdict({**row, "target": 1.4}) == "ok"
    assert harness.verdict({**row, "target": 1.1}) == "MISS"
    assert harness.verdict({**row, "target": 1.4, "p99_target_ms": 2.0}) == "ok"
    assert harness.verdict({**row, "target": 1.4, "p99_target_ms": 1.5}) == "MISS"
    assert harness.verdict({**row, "p99_target_ms": 1.9}) == "MISS"  # p99 under the target
    assert harness.verdict({**row, "rows_per_s_target": 100_000}) == "ok"
    assert harness.verdict({**row, "rows_per_s_target": 200_000}) == "MISS"


def test_unknown_scenario_names_the_known_ones() -> None:
    with pytest.raises(ValidationError, match=r"unknown scenario 'nope'.*registry\.one"):
        harness.select(harness.discover(), ["nope"])


async def test_run_rejects_unknown_before_connecting(settings: Settings) -> None:
    with pytest.raises(ValidationError, match="unknown scenario"):
        await harness.run(settings, ["session.nope"], json_path=None, duration_s=1,
                          concurrency=(1,), out=io.StringIO())


def test_prefix_selects_a_family() -> None:
    chosen = [s.name for s in harness.select(harness.discover(), ["session"])]
    assert chosen == ["session.one.same_tenant", "session.one.switch_tenant", "session.ten"]
    assert [s.name for s in harness.select(harness.discover(), ["session.one"])] == [
        "session.one.same_tenant", "session.one.switch_tenant"]
    every = harness.select(harness.discover(), None)
    assert {"registry.one", "repo.one", "session.ten"} <= {s.name for s in every}


def test_bind_context_turns_the_context_helpers_into_parameters() -> None:
    sql = "SELECT * FROM t WHERE org_id = app.org_id() AND x = $1;"
    assert harness.bind_context(sql, 1) == (
        "WITH _ctx3 AS (SELECT $3::uuid) SELECT * FROM t WHERE org_id = $2::uuid AND x = $1")
    assert harness.bind_context(sql, 1, user=False) == (
        "SELECT * FROM t WHERE org_id = $2::uuid AND x = $1")
    with pytest.raises(ValidationError, match=r"app\.user_id\(\) unused in a WITH query"):
        harness.bind_context("WITH a AS (SELECT app.org_id()) SELECT * FROM a", 0)


async def test_each_scenario_starts_from_a_clean_baseline_connection(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A setup may apply a context to the raw connections for its own baseline (the
    analytics and search scenarios do); the next scenario's baseline must not inherit it:
    a rate-limit check refuses to run under a tenant context, so a full run used to fail."""
    seen: dict[str, set[str]] = {}

    async def leave_a_context(b: harness.BenchContext) -> None:
        conns = [await b.pool.acquire() for _ in range(b.pool.get_max_size())]
        for conn in conns:
            await conn.execute("SELECT set_config('app.org_id', $1, false), "
                               "set_config('app.role', 'owner', false)",
                               "00000000-0000-0000-0000-000000000001")
            await b.pool.release(conn)

    async def read_settings(b: harness.BenchContext) -> None:
        conns = [await b.pool.acquire() for _ in range(b.pool.get_max_size())]
        for conn in conns:
            row = await conn.fetchrow("SELECT current_setting('app.org_id', true) AS org, "
                                      "current_setting('app.role', true) AS role")
            assert row is not None
            seen.setdefault("after", set()).add(f"{row['org'] or ''}/{row['role'] or ''}")
            await b.pool.release(conn)

    async def op(b: harness.BenchContext, state: object, i: int) -> None:
        await b.pool.fetchval("SELECT 1")

    scenarios = [harness.Scenario("t.first", leave_a_context, op, op),
                 harness.Scenario("t.second", read_settings, op, op)]
    monkeypatch.setattr(harness, "discover", lambda: scenarios)
    rows = await harness.run(settings, None, json_path=None, duration_s=0.1,
                             concurrency=(1,), out=io.StringIO(), progress=io.StringIO())
    assert [r["scenario"] for r in rows] == ["t.first", "t.second"]
    assert seen == {"after": {"/"}}


async def test_a_scenario_that_cannot_run_here_is_skipped_and_the_run_goes_on(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Redis scenario without REDIS_URL used to end a full run with an error halfway."""
    async def ready(b: harness.BenchContext) -> None:
        return None

    async def no_redis(b: harness.BenchContext) -> None:
        raise harness.Skip("REDIS_URL is not set")

    async def op(b: harness.BenchContext, state: object, i: int) -> None:
        await b.pool.fetchval("SELECT 1")

    scenarios = [harness.Scenario("t.before", ready, op, op),
                 harness.Scenario("t.redis", no_redis, op, op),
                 harness.Scenario("t.after", ready, op, op)]
    monkeypatch.setattr(harness, "discover", lambda: scenarios)
    out, progress = io.StringIO(), io.StringIO()
    rows = await harness.run(settings, None, json_path=None, duration_s=0.1,
                             concurrency=(1,), out=out, progress=progress)
    assert [r["scenario"] for r in rows] == ["t.before", "t.after"]
    assert "t.redis                       skipped: REDIS_URL is not set" in out.getvalue()
    assert "[bench] t.redis: skipped: REDIS_URL is not set" in progress.getvalue()
