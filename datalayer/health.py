"""``dl.health()``: is this DataLayer able to serve, and what needs an operator's attention.

Each part is a dict with ``ok``; the report's ``ok`` is true only when every part is.
Nothing here raises: a part that cannot be checked reports ``ok: false`` and why.

* ``database``: a round trip through the pool (``latency_ms``), server version, standby;
* ``migrations``: every file applied and unchanged since (the checksum ledger);
* ``pool``: connections in use, idle, tasks waiting for one, min/max;
* ``redis``: reachable (only when ``REDIS_URL`` is set);
* ``replication``: standbys of this server and their lag (``null`` when there are none),
  or, on a standby, its replay delay;
* ``transactions``: the oldest open transaction (not ok beyond ``OLDEST_XACT_LIMIT_S``: it
  holds back vacuum on every table);
* ``maintenance``: the last run of every registered job (not ok when the last run failed).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from datalayer.core import migrations
from datalayer.core.errors import DataLayerError, translate

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = ["OLDEST_XACT_LIMIT_S", "REPLICA_LAG_LIMIT_S", "check", "format_report"]

OLDEST_XACT_LIMIT_S = 3600.0
REPLICA_LAG_LIMIT_S = 60.0
_FAILURES = (DataLayerError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


def _error(exc: BaseException) -> dict[str, Any]:
    err = translate(exc) if not isinstance(exc, DataLayerError) else exc
    return {"ok": False, "error": f"{type(err or exc).__name__}: {err or exc}"[:500]}


async def check(dl: DataLayer) -> dict[str, Any]:
    """The health report; see the module docstring."""
    out: dict[str, Any] = {"ok": True}
    out["database"], server = await _database(dl)
    out["migrations"] = await _migrations(dl)
    out["pool"] = _pool(dl)
    if dl.settings.redis_url:
        out["redis"] = await _redis(dl.settings.redis_url)
    if server is not None:
        out["replication"] = await _replication(dl, server)
        out["transactions"] = await _transactions(dl)
        out["maintenance"] = await _maintenance(dl)
    out["ok"] = all(v.get("ok", True) for v in out.values() if isinstance(v, dict))
    return out


async def _database(dl: DataLayer) -> tuple[dict[str, Any], asyncpg.Record | None]:
    """The database section, and the server row (recovery state, replay delay) it read,
    which the replication section uses; None when the database did not answer."""
    started = time.perf_counter()
    try:
        async with dl.system() as db:
            row = await db.one("health.server")
        assert row is not None
        return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                "server_version": row["server_version"], "standby": row["in_recovery"]}, row
    except _FAILURES as exc:
        return _error(exc), None


async def _redis(url: str) -> dict[str, Any]:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    started = time.perf_counter()
    try:
        await client.ping()
        return {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
    except (RedisError, OSError) as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: Redis did not answer"}
    finally:
        await client.aclose()


async def _migrations(dl: DataLayer) -> dict[str, Any]:
    try:
        rows = await asyncio.to_thread(migrations.status, dl.settings, dl.schema_dir)
    except DataLayerError as exc:
        return _error(exc)
    pending = [m.id for m in rows if not m.applied]
    changed = [m.id for m in rows
               if m.applied and m.recorded_sha256 and m.recorded_sha256 != m.sha256]
    return {"ok": not pending and not changed, "applied": len(rows) - len(pending),
            "pending": pending, "changed": changed}


def _pool(dl: DataLayer) -> dict[str, Any]:
    try:
        pool = dl.pool
    except DataLayerError as exc:
        return _error(exc)
    size, idle = pool.get_size(), pool.get_idle_size()
    # asyncpg exposes no waiter count: the holders' queue is an asyncio.Queue whose
    # _getters are the acquirers waiting for a connection (0 if the internals change).
    queue = getattr(pool, "_queue", None)
    waiting = len(getattr(queue, "_getters", ()) or ())
    return {"ok": True, "size": size, "in_use": size - idle, "idle": idle,
            "waiting": waiting, "min": pool.get_min_size(), "max": pool.get_max_size()}


async def _replication(dl: DataLayer, server: asyncpg.Record) -> dict[str, Any]:
    if server["in_recovery"]:
        delay = server["replay_delay_s"]
        return {"ok": delay is None or delay < REPLICA_LAG_LIMIT_S, "role": "standby",
                "replay_delay_s": None if delay is None else round(delay, 3)}
    try:
        async with dl.system() as db:
            replicas = await db.many("health.replicas")
    except _FAILURES as exc:
        return _error(exc)
    if not replicas:
        return {"ok": True, "role": "primary", "replicas": None, "max_lag_s": None}
    lags = [r["replay_lag_s"] for r in replicas if r["replay_lag_s"] is not None]
    worst = max(lags) if lags else None
    return {"ok": worst is None or worst < REPLICA_LAG_LIMIT_S, "role": "primary",
            "max_lag_s": None if worst is None else round(worst, 3),
            "replicas": [dict(r) for r in replicas]}


async def _transactions(dl: DataLayer) -> dict[str, Any]:
    try:
        async with dl.system() as db:
            row = await db.one("health.oldest_transaction")
    except _FAILURES as exc:
        return _error(exc)
    if row is None:
        return {"ok": True, "oldest_s": None}
    age = round(float(row["age_s"]), 3)
    return {"ok": age < OLDEST_XACT_LIMIT_S, "oldest_s": age, "pid": row["pid"],
            "state": row["state"], "application_name": row["application_name"]}


async def _maintenance(dl: DataLayer) -> dict[str, Any]:
    from datalayer.maintenance import JOBS, last_runs

    try:
        runs = {r.job: r for r in await last_runs(dl)}
    except _FAILURES as exc:
        return _error(exc)
    jobs: dict[str, Any] = {}
    failed = []
    for job in JOBS:
        r = runs.get(job.name)
        if r is None:
            jobs[job.name] = {"last_run": None}
            continue
        status = "running" if r.finished_at is None else ("ok" if r.ok else "error")
        if status == "error":
            failed.append(job.name)
        jobs[job.name] = {"last_run": r.started_at.isoformat(), "status": status,
                          "finished_at": r.finished_at and r.finished_at.isoformat(),
                          "last_ok_at": r.last_ok_at and r.last_ok_at.isoformat(),
                          "counts": r.counts, "error": r.error}
    return {"ok": not failed, "failed": failed, "jobs": jobs}


def format_report(report: dict[str, Any]) -> str:
    """The report for a person: one line per part, then the maintenance jobs."""
    lines = []
    for part, value in report.items():
        if not isinstance(value, dict):
            continue
        mark = "ok  " if value.get("ok", True) else "FAIL"
        if "error" in value and not value.get("ok", True) and len(value) == 2:
            lines.append(f"{mark} {part:13} {value['error']}")
            continue
        if part == "maintenance":
            lines.append(f"{mark} {part:13} "
                         + (f"failed: {', '.join(value['failed'])}" if value["failed"]
                            else "no failed job"))
            for job, j in value["jobs"].items():
                if j.get("last_run") is None:
                    lines.append(f"       {job:26} never run")
                else:
                    detail = j["error"] if j["status"] == "error" else ", ".join(
                        f"{k}={v}" for k, v in (j["counts"] or {}).items())
                    lines.append(f"       {job:26} {j['status']:7} {j['last_run'][:19]}"
                                 + (f"  {detail}" if detail else ""))
            continue
        detail = ", ".join(f"{k}={_short(v)}" for k, v in value.items() if k != "ok")
        lines.append(f"{mark} {part:13} {detail}")
    lines.append("healthy" if report.get("ok") else "UNHEALTHY")
    return "\n".join(lines)


def _short(v: object) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]" if len(v) < 6 else f"[{len(v)} items]"
    return str(v)
