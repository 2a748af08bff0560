"""System metrics: bulk ingest, series at the best resolution, roll-ups 1m → 1h → 1d that are
idempotent, retention by whole partitions, and that only the maintenance role reaches them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from datalayer import Context, DataLayer, PermissionDenied, ValidationError
from datalayer.repos.metrics import Metrics, Point, metrics_retention, rollup_metrics
from tests.conftest import TenantFactory


def minute(dt: datetime) -> datetime:
    return dt.replace(second=0, microsecond=0)


async def test_ingest_rollup_and_series(dl: DataLayer, admin_conn: asyncpg.Connection) -> None:
    # Points 30 minutes old are late for a roll-up that already ran (the maintenance tests
    # run every job): start from "nothing rolled up yet", as on a fresh database.
    await admin_conn.execute("UPDATE metrics.resolutions SET through = NULL")
    name = f"test.latency_{uuid.uuid4().hex[:8]}"
    base = minute(datetime.now(UTC)) - timedelta(minutes=30)
    points = [Point(name, float(k % 10), base + timedelta(seconds=10 * k),
                    {"host": "a" if k % 2 else "b", "db": "main"}) for k in range(120)]
    async with dl.system() as db:
        assert await db.metrics.record(points) == 120
        assert await db.metrics.record([]) == 0
    # Raw, aggregated on read (before any roll-up), both hosts together.
    async with dl.system() as db:
        s = await db.metrics.series(name, start=base, end=base + timedelta(minutes=20),
                                    resolution="1m")
    assert s.resolution == "1m"
    assert sum(b.count for b in s.buckets) == 120 and len(s.buckets) == 20
    assert s.buckets[0].min == 0 and s.buckets[0].max == 5
    first = await rollup_metrics(dl)
    assert first["rows_1m"] >= 20
    again = await rollup_metrics(dl)  # idempotent: the same buckets, recomputed
    async with dl.system() as db:
        rolled = await db.metrics.series(name, start=base, end=base + timedelta(minutes=20),
                                         resolution="1m")
        one_host = await db.metrics.series(name, start=base, end=base + timedelta(minutes=20),
                                           labels={"host": "a"}, resolution="1m")
        hourly = await db.metrics.series(name, start=base - timedelta(hours=1),
                                         end=base + timedelta(hours=1), resolution="1h")
        best = await db.metrics.series(name, start=base, max_points=100)
    assert rolled.buckets == s.buckets
    assert again.get("rows_1m", 0) >= 0
    assert sum(b.count for b in one_host.buckets) == 60
    assert sum(b.count for b in hourly.buckets) == 120
    assert best.resolution == "1m"  # 30+ minutes in at most 100 buckets, kept 30 days
    assert sum(b.count for b in best.buckets) == 120
    avg = sum(p.value for p in points) / len(points)
    assert abs(sum(b.sum for b in best.buckets) / 120 - avg) < 1e-9


def test_best_resolution() -> None:
    now = datetime.now(UTC)
    keep = {"raw": timedelta(days=3), "1m": timedelta(days=30), "1h": timedelta(days=400),
            "1d": timedelta(days=3650)}
    best = Metrics.best_resolution
    assert best(now - timedelta(minutes=5), now, 1000, keep) == "raw"
    assert best(now - timedelta(hours=6), now, 1000, keep) == "1m"
    assert best(now - timedelta(days=10), now, 1000, keep) == "1h"
    assert best(now - timedelta(days=5), now - timedelta(days=5, minutes=-10), 1000,
                keep) == "1m"  # raw is not kept that long
    assert best(now - timedelta(days=200), now, 1000, keep) == "1d"
    assert best(now - timedelta(days=40), now - timedelta(days=39), 2000, keep) == "1h"


async def test_retention_drops_whole_partitions(dl: DataLayer,
                                                admin_conn: asyncpg.Connection) -> None:
    old = datetime.now(UTC) - timedelta(days=10)
    async with dl.system() as db:
        await db.connection.execute(
            "SELECT metrics.ensure_partitions('points', 'day', $1::timestamptz, "
            "$1::timestamptz + interval '1 day')", old)
        await db.metrics.record([Point("test.old", 1.0, old)])
    name = f"points_p{old:%Y%m%d}"
    assert await admin_conn.fetchval("SELECT to_regclass('metrics.' || $1) IS NOT NULL", name)
    out = await metrics_retention(dl)
    assert out["partitions_dropped"] >= 1
    assert not await admin_conn.fetchval("SELECT to_regclass('metrics.' || $1) IS NOT NULL",
                                         name)
    assert await admin_conn.fetchval(  # today's partition stays
        "SELECT to_regclass('metrics.' || $1) IS NOT NULL",
        f"points_p{datetime.now(UTC):%Y%m%d}")
    async with dl.system() as db:
        with pytest.raises(ValidationError, match=r"'test\.bad': value must be a number"):
            await db.metrics.record([Point("test.ok", 1.0), Point("test.bad", "n/a")])  # type: ignore[arg-type]
        with pytest.raises(ValidationError):
            await db.metrics.set_retention("raw", timedelta(0))
        await db.metrics.set_retention("raw", timedelta(days=3))


async def test_only_the_maintenance_role_reaches_metrics(dl: DataLayer,
                                                         make_tenant: TenantFactory) -> None:
    t = await make_tenant("Metrics")
    for ctx in (t.owner, Context(None)):
        with pytest.raises(PermissionDenied):
            async with dl.session(ctx) as db:
                await db.metrics.record([Point("test.x", 1.0)])
        with pytest.raises(PermissionDenied):
            async with dl.session(ctx, readonly=True) as db:
                await db.metrics.series("test.x", start=datetime.now(UTC) - timedelta(hours=1),
                                        resolution="1m")
