"""``dl.health()`` and ``datalayer health``: every part, and each way it turns unhealthy."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import asyncpg
import pytest

from datalayer import DataLayer, Settings, maintenance
from datalayer import health as health_mod
from datalayer.core.resources import resource_dir
from datalayer.maintenance import Job
from tests.conftest import TenantFactory, make_layer, make_settings
from tests.test_cli import cli


async def test_report_has_every_part_and_is_healthy(dl: DataLayer) -> None:
    report = await dl.health()
    assert report["ok"] is True, report
    assert report["database"]["latency_ms"] > 0 and report["database"]["standby"] is False
    assert report["migrations"] == {"ok": True, "applied": report["migrations"]["applied"],
                                    "pending": [], "changed": []}
    pool = report["pool"]
    assert pool["in_use"] + pool["idle"] == pool["size"] and pool["waiting"] == 0
    assert report["replication"] == {"ok": True, "role": "primary", "replicas": None,
                                     "max_lag_s": None}
    assert report["transactions"]["ok"] is True
    assert set(report["maintenance"]["jobs"]) == {j.name for j in maintenance.JOBS}
    assert "redis" not in report  # not configured in these settings
    text = health_mod.format_report(report)
    assert text.splitlines()[-1] == "healthy" and "maintenance" in text


async def test_an_old_open_transaction_is_reported(
    dl: DataLayer, database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = await asyncpg.connect(database_url, server_settings={"application_name": "idler"})
    try:
        await other.execute("BEGIN; SELECT txid_current()")
        await asyncio.sleep(0.05)
        monkeypatch.setattr(health_mod, "OLDEST_XACT_LIMIT_S", 0.01)
        report = await dl.health()
        tx = report["transactions"]
        assert tx["ok"] is False and report["ok"] is False
        assert tx["oldest_s"] >= 0.05
        assert tx["application_name"] == "idler" or tx["pid"] != other.get_server_pid()
    finally:
        await other.close()


async def test_pool_figures_count_connections_in_use_and_waiters(settings: Settings,
                                                                 make_tenant: TenantFactory,
                                                                 ) -> None:
    t = await make_tenant()
    s = make_settings(settings.database_url, migrate_on_start=False, pool_min_size=1,
                      pool_max_size=1)
    async with make_layer(s) as layer:
        async def second() -> None:
            async with layer.session(t.owner, readonly=True) as db:
                await db.orgs.get(t.org_id)

        async with layer.session(t.owner, readonly=True):
            waiter = asyncio.create_task(second())
            await asyncio.sleep(0.05)
            pool = health_mod._pool(layer)
            assert (pool["in_use"], pool["idle"], pool["waiting"]) == (1, 0, 1)
        await waiter
        assert health_mod._pool(layer)["waiting"] == 0


async def test_a_changed_migration_file_is_reported(dl: DataLayer, tmp_path: Path) -> None:
    schema = tmp_path / "schema"
    shutil.copytree(resource_dir("schema"), schema)
    first = schema / "0001_roles.sql"
    first.write_text(first.read_text() + "\n-- edited\n")
    layer = DataLayer(dl.settings, schema_dir=schema)
    layer._pool = dl.pool  # share the started pool: only the file check differs
    try:
        report = await layer.health()
    finally:
        layer._pool = None
    assert report["migrations"]["ok"] is False
    assert report["migrations"]["changed"] == [first.stem]
    assert report["ok"] is False


async def test_a_failed_maintenance_job_makes_it_unhealthy(
    dl: DataLayer, admin_conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"test.{uuid.uuid4().hex[:8]}"

    async def boom(_: DataLayer) -> dict[str, int]:
        raise RuntimeError("disk full")

    job = Job(name, boom)
    monkeypatch.setattr(maintenance, "JOBS", (*maintenance.JOBS, job))
    try:
        await dl.maintain([job])
        report = await dl.health()
        assert report["maintenance"]["ok"] is False and report["ok"] is False
        assert report["maintenance"]["failed"] == [name]
        assert report["maintenance"]["jobs"][name]["error"] == "RuntimeError: disk full"
        assert "FAIL maintenance" in health_mod.format_report(report)
    finally:
        await admin_conn.execute("DELETE FROM maintenance_runs WHERE job = $1", name)


def test_cli_health_is_readable_and_json(database_url: str) -> None:
    text = cli("health", DATABASE_URL=database_url)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[-1] == "healthy"
    assert any(line.startswith("ok   database") and "latency_ms=" in line for line in lines)
    assert any(line.startswith("ok   replication") for line in lines)

