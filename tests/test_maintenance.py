"""Maintenance: the job registry, advisory locks across concurrent runs, recorded runs."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from datalayer import DataLayer, ValidationError
from datalayer.maintenance import JOBS, Job, last_runs


def _job(name: str, runs: list[str], *, sleep: float = 0.0, fail: bool = False) -> Job:
    async def run(dl: DataLayer) -> dict[str, int]:
        runs.append(name)
        await asyncio.sleep(sleep)
        if fail:
            raise RuntimeError("boom")
        return {"done": 1}

    return Job(name, run)


def _names() -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"test.{tag}.{i}" for i in range(4)]


async def test_every_registered_job_runs_and_records_its_run(dl: DataLayer) -> None:
    results = await dl.maintain()
    assert [r.job for r in results] == [j.name for j in JOBS]
    assert all(r.status in ("ok", "skipped") for r in results), results
    assert any(r.status == "ok" for r in results)
    runs = {r.job: r for r in await last_runs(dl)}
    for r in results:
        if r.status == "ok":
            rec = runs[r.job]
            assert rec.ok is True and rec.finished_at is not None and rec.error is None
            assert rec.counts == r.counts and rec.last_ok_at is not None


async def test_jobs_are_idempotent(dl: DataLayer) -> None:
    await dl.maintain(["partitions", "notifications.expired"])
    again = await dl.maintain(["partitions", "notifications.expired"])
    assert [r.counts for r in again] == [{"created": 0}, {"deleted": 0}]


async def test_unknown_job_is_refused_with_the_known_names(dl: DataLayer) -> None:
    with pytest.raises(ValidationError, match="partitions"):
        await dl.maintain(["nope"])


async def test_two_concurrent_runs_run_each_job_once(dl: DataLayer) -> None:
    runs: list[str] = []
    names = _names()
    jobs = [_job(n, runs, sleep=0.2) for n in names]
    a, b = await asyncio.gather(dl.maintain(jobs), dl.maintain(jobs))
    assert sorted(runs) == sorted(names)  # each once
    for name in names:
        statuses = sorted(r.status for r in (*a, *b) if r.job == name)
        assert statuses == ["ok", "skipped"], (name, statuses)
    skipped = [r for r in (*a, *b) if r.status == "skipped"]
    assert all(r.error for r in skipped)  # says why


async def test_a_job_finished_elsewhere_after_this_run_began_is_not_repeated(
    dl: DataLayer,
) -> None:
    """The second run reaches a job after the first has released its lock. Each job takes
    long enough (0.3 s) that every run has begun (opened its lock connection) before any
    job ends, also on a loaded machine; with instant jobs a run that began late would rightly
    run them again."""
    runs: list[str] = []
    names = _names()
    jobs = [_job(n, runs, sleep=0.3) for n in names]
    await asyncio.gather(dl.maintain(jobs), dl.maintain(jobs), dl.maintain(jobs))
    assert sorted(runs) == sorted(names)
    # A later run does them again.
    await dl.maintain(jobs)
    assert len(runs) == 2 * len(names)


async def test_a_failing_job_is_recorded_and_the_others_still_run(dl: DataLayer) -> None:
    runs: list[str] = []
    first, bad, last, _ = _names()
    results = await dl.maintain([_job(first, runs), _job(bad, runs, fail=True),
                                 _job(last, runs)])
    assert runs == [first, bad, last]
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert results[1].error == "RuntimeError: boom"
    recorded = {r.job: r for r in await last_runs(dl)}
    assert recorded[bad].ok is False and recorded[bad].error == "RuntimeError: boom"
    assert recorded[bad].failures == 1 and recorded[bad].last_ok_at is None
    assert recorded[last].ok is True and recorded[last].counts == {"done": 1}


async def test_a_lock_held_elsewhere_skips_the_job(dl: DataLayer, database_url: str) -> None:
    runs: list[str] = []
    name = _names()[0]
    other = await asyncpg.connect(database_url)
    try:
        assert await other.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended('datalayer.maintenance:' || $1, 0))",
            name)
        [r] = await dl.maintain([_job(name, runs)])
        assert r.status == "skipped" and runs == []
    finally:
        await other.close()  # a dead holder releases the lock
    [r] = await dl.maintain([_job(name, runs)])
    assert r.status == "ok" and runs == [name]


async def test_maintenance_jobs_do_their_work(dl: DataLayer, admin_conn: asyncpg.Connection,
                                              ) -> None:
    """Old slow-query samples are pruned; recent ones stay."""
    old = datetime.now(UTC) - timedelta(days=60)
    tag = f"test.{uuid.uuid4().hex[:8]}"
    await admin_conn.execute(
        "INSERT INTO query_performance (query_name, duration_ms, executed_at) "
        "VALUES ($1, 1, $2), ($1, 1, now())", tag, old)
    [r] = await dl.maintain(["query_performance.prune"])
    assert r.status == "ok" and r.counts["deleted"] >= 1
    assert await admin_conn.fetchval(
        "SELECT count(*) FROM query_performance WHERE query_name = $1", tag) == 1


def test_cli_maintain_runs_the_named_jobs(database_url: str) -> None:
    from tests.test_cli import cli

    result = cli("maintain", "--job", "partitions", "--job", "web_sessions.sweep", "--json",
                 DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert [r["job"] for r in json.loads(result.stdout)] == ["partitions", "web_sessions.sweep"]
    bad = cli("maintain", "--job", "nope", DATABASE_URL=database_url)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


async def test_retention_jobs_run_with_their_settings(dl: DataLayer) -> None:
    from dataclasses import replace

    [r] = await dl.maintain(["partitions.retention"])
    assert r.status == "ok" and r.counts == {"dropped": 0}  # 0 days: keep everything
    layer = DataLayer(replace(dl.settings, execution_retention_days=3650))
    layer._pool = dl.pool  # reuse the started pool; only the setting differs
    try:
        results = await layer.maintain(["partitions.retention", "ratelimit.violations"])
    finally:
        layer._pool = None
    assert [x.status for x in results] == ["ok", "ok"], results
