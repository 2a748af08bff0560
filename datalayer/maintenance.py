"""Periodic maintenance: one registry of jobs, run by ``dl.maintain()`` / ``datalayer maintain``.

A job is ``async def job(dl) -> dict[str, int]`` (what it did, e.g. ``{"deleted": 12}``):
idempotent, safe to run at any time, as often as wanted, from several processes. To add
one, append a :class:`Job` line to :data:`JOBS` below (the name is what ``--job`` takes).

Each run of a job:

* takes a session-level advisory lock named after the job (``pg_try_advisory_lock`` on a
  connection of its own, opened for the run and closed after it, so a crashed process
  cannot keep a lock). A job already running elsewhere is skipped, and reported as such;
* records its start, end, ok or error, and counts in ``maintenance_runs`` (one row per
  job, with when it last succeeded), which ``dl.health()`` reports;
* is isolated: a failing job is recorded and logged, and the others still run.

Jobs run one after the other (they are mostly batched deletes; running them in parallel
would only compete for the same I/O).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import asyncpg

from datalayer.core.errors import DataLayerError, ValidationError
from datalayer.core.session import guarded
from datalayer.repos.analytics import refresh_analytics, rollup_analytics
from datalayer.repos.audit import audit_retention
from datalayer.repos.knowledge import reap_documents
from datalayer.repos.metrics import metrics_retention, rollup_metrics
from datalayer.repos.plugins import plugin_quality_refresh, plugin_usage_rollup

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = ["JOBS", "Job", "JobResult", "JobRun", "last_runs", "run_jobs"]

log = logging.getLogger("datalayer.maintenance")

JobFn = Callable[["DataLayer"], Awaitable[dict[str, int]]]

# Retention of the operator and queue tables the jobs below prune.
WEBHOOK_EVENT_RETENTION = timedelta(days=30)
# Raw plugin usage events; the daily roll-up (plugins.usage_rollup, its last two days) keeps
# what they counted, so this only has to outlast the roll-up's window.
PLUGIN_USAGE_RETENTION = timedelta(days=30)
QUERY_SAMPLE_RETENTION = timedelta(days=14)
VIOLATION_RETENTION = timedelta(days=30)
BATCH = 5000


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    run: JobFn
    description: str = ""


@dataclass(frozen=True, slots=True)
class JobResult:
    """What one job did in one ``maintain()`` call."""

    job: str
    status: Literal["ok", "error", "skipped"]  # skipped: running elsewhere (lock held)
    counts: dict[str, int]
    duration_ms: float
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


@dataclass(frozen=True, slots=True)
class JobRun:
    """The last recorded run of a job (``maintenance_runs``)."""

    job: str
    started_at: datetime
    finished_at: datetime | None
    ok: bool | None
    error: str | None
    counts: dict[str, int]
    instance: str
    last_ok_at: datetime | None
    runs: int
    failures: int


# -- the jobs ---------------------------------------------------------------------------------
async def ensure_partitions(dl: DataLayer) -> dict[str, int]:
    """Monthly partitions of the execution tables, this month and the next two."""
    async with dl.system() as db:
        rows = await db.many("partitions.ensure", months_ahead=2, months_back=0)
    return {"created": len(rows)}


async def _drain(dl: DataLayer, step: Callable[[Any], Awaitable[int]], limit: int) -> int:
    total = 0
    while True:
        async with dl.system() as db:
            n = await step(db)
        total += n
        if n < limit:
            return total


async def reap_executions(dl: DataLayer) -> dict[str, int]:
    """Executions whose workers stopped renewing their leases: requeued or failed."""
    async def step(db: Any) -> int:
        return len(await db.executions.reap(limit=500))

    return {"reaped": await _drain(dl, step, 500)}


async def reap_webhook_events(dl: DataLayer) -> dict[str, int]:
    """Webhook events whose lease expired: back to the queue, or dead."""
    async def step(db: Any) -> int:
        return len(await db.webhooks.reap(limit=500))

    return {"reaped": await _drain(dl, step, 500)}


async def purge_webhook_events(dl: DataLayer) -> dict[str, int]:
    """Processed and dead webhook events older than WEBHOOK_EVENT_RETENTION."""
    from datalayer.repos.webhooks import purge_all

    before = datetime.now(UTC) - WEBHOOK_EVENT_RETENTION
    return {"deleted": await purge_all(dl, before, batch=BATCH)}


async def purge_plugin_usage(dl: DataLayer) -> dict[str, int]:
    """Raw plugin usage events older than PLUGIN_USAGE_RETENTION."""
    before = datetime.now(UTC) - PLUGIN_USAGE_RETENTION

    async def step(db: Any) -> int:
        n: int = await db.execrows("plugins.usage_purge", before=before, limit=BATCH)
        return n

    return {"deleted": await _drain(dl, step, BATCH)}


async def delete_expired_notifications(dl: DataLayer) -> dict[str, int]:
    async with dl.system() as db:
        return {"deleted": await db.notifications.delete_expired(batch=BATCH)}


async def deactivate_expired_credentials(dl: DataLayer) -> dict[str, int]:
    async with dl.system() as db:
        return {"deactivated": await db.credentials.deactivate_expired()}


async def sweep_ratelimit_buckets(dl: DataLayer) -> dict[str, int]:
    """Rate-limit buckets that are full again (PostgreSQL backend's table)."""
    from datalayer.ratelimit import sweep_buckets

    return {"deleted": await sweep_buckets(dl)}


async def sweep_web_sessions(dl: DataLayer) -> dict[str, int]:
    """Expired web sessions of the PostgreSQL store (Redis expires its own)."""
    async with dl.system() as db:
        return {"deleted": await db.execrows("web_sessions.sweep")}


async def clean_postgres_cache(dl: DataLayer) -> dict[str, int]:
    """Expired entries, leases, counters and old versions of the PostgreSQL cache backend's
    tables, and cache statistics older than their retention."""
    from datalayer.cache.core import STATS_KEEP_DAYS
    from datalayer.cache.postgres import CLEANUP_BATCH

    async def step(db: Any) -> int:
        n: int = await db.execrows("cache.cleanup_expired", batch=CLEANUP_BATCH)
        return n

    entries = await _drain(dl, step, CLEANUP_BATCH)
    from datalayer.cache._backend import VERSION_TTL_S

    async with dl.system() as db:
        aux = int(await db.scalar("cache.cleanup_aux", version_ttl_s=VERSION_TTL_S) or 0)
        stats = await db.execrows("cache.prune_stats", keep_days=STATS_KEEP_DAYS)
    return {"entries": entries, "leases_counters_versions": aux, "stats": stats}


async def drop_old_partitions(dl: DataLayer) -> dict[str, int]:
    """Execution history retention: monthly partitions (and default-partition rows) older
    than ``DATALAYER_EXECUTION_RETENTION_DAYS``; nothing when that is 0 (keep forever)."""
    days = dl.settings.execution_retention_days
    if not days:
        return {"dropped": 0}
    before = (datetime.now(UTC) - timedelta(days=days)).date()
    async with dl.system() as db:
        rows = await db.many("partitions.drop_before", before=before)
    return {"dropped": len(rows)}


async def prune_ratelimit_violations(dl: DataLayer) -> dict[str, int]:
    """Rate-limit violation windows older than VIOLATION_RETENTION."""
    before = datetime.now(UTC) - VIOLATION_RETENTION
    async with dl.system() as db:
        return {"deleted": await db.execrows("ratelimit.prune_violations", before=before)}


async def prune_query_samples(dl: DataLayer) -> dict[str, int]:
    """Slow-query samples older than QUERY_SAMPLE_RETENTION."""
    before = datetime.now(UTC) - QUERY_SAMPLE_RETENTION

    async def step(db: Any) -> int:
        n: int = await db.execrows("query_performance.prune", before=before, batch=BATCH)
        return n

    return {"deleted": await _drain(dl, step, BATCH)}


# The registry: one line per job. Other domains add theirs here.
JOBS: tuple[Job, ...] = (
    Job("partitions", ensure_partitions, "create the coming months' execution partitions"),
    Job("partitions.retention", drop_old_partitions,
        "drop execution partitions past DATALAYER_EXECUTION_RETENTION_DAYS"),
    Job("executions.reap", reap_executions, "requeue or fail executions of dead workers"),
    Job("webhooks.reap", reap_webhook_events, "requeue webhook events of dead workers"),
    Job("webhooks.purge", purge_webhook_events, "delete old processed/dead webhook events"),
    Job("notifications.expired", delete_expired_notifications, "delete expired notifications"),
    Job("credentials.expired", deactivate_expired_credentials, "invalidate expired credentials"),
    Job("ratelimit.sweep", sweep_ratelimit_buckets, "drop full rate-limit buckets"),
    Job("ratelimit.violations", prune_ratelimit_violations, "delete old violation windows"),
    Job("web_sessions.sweep", sweep_web_sessions, "delete expired web sessions"),
    Job("cache.cleanup", clean_postgres_cache, "expired PostgreSQL cache rows, old stats"),
    Job("query_performance.prune", prune_query_samples, "delete old slow-query samples"),
    Job("audit.retention", audit_retention,
        "remove audit rows every applicable retention policy lets go (not under legal hold)"),
    Job("knowledge.reap", reap_documents,
        "requeue knowledge documents of dead workers (fail them after 5 attempts)"),
    Job("plugins.usage_rollup", plugin_usage_rollup,
        "recompute the last two UTC days of per-plugin, per-organization usage roll-ups"),
    Job("plugins.usage_purge", purge_plugin_usage,
        "delete raw plugin usage events older than 30 days (the roll-ups keep their counts)"),
    Job("plugins.quality", plugin_quality_refresh,
        "refresh every approved plugin version's quality score"),
    Job("analytics.refresh", refresh_analytics,
        "refresh the organization analytics views (CONCURRENTLY; as fresh as this job)"),
    Job("analytics.rollup", rollup_analytics,
        "rebuild closed days of per-workflow roll-ups from executions (catches up)"),
    Job("metrics.rollup", rollup_metrics,
        "system metrics: partitions ahead, roll-ups 1 minute, 1 hour, 1 day"),
    Job("metrics.retention", metrics_retention,
        "system metrics: drop partitions past each resolution's retention"),
)


# -- running them ---------------------------------------------------------------------------
_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('datalayer.maintenance:' || $1, 0))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended('datalayer.maintenance:' || $1, 0))"


def select_jobs(names: Iterable[str | Job] | None,
                registry: Sequence[Job] = JOBS) -> list[Job]:
    """The jobs to run: all of ``registry``, or those named (``Job`` objects pass through)."""
    if names is None:
        return list(registry)
    by_name = {j.name: j for j in registry}
    out: list[Job] = []
    for n in names:
        if isinstance(n, Job):
            out.append(n)
        elif n in by_name:
            out.append(by_name[n])
        else:
            raise ValidationError(f"unknown maintenance job {n!r}; jobs: {', '.join(by_name)}")
    return out


async def run_jobs(dl: DataLayer, jobs: Iterable[str | Job] | None = None) -> list[JobResult]:
    """Run ``jobs`` (default: every registered one) once each; see the module docstring.

    Costs one extra connection for the whole call (the advisory locks) and, per job, two
    short system sessions to record the run, plus whatever the job does.
    """
    selected = select_jobs(jobs)
    instance = dl.metrics.instance
    lock_conn = await dl.connect_dedicated("maintenance", "for maintenance's job locks")
    results: list[JobResult] = []
    try:
        since: datetime = await guarded(lock_conn.fetchval("SELECT clock_timestamp()"),
                                        "maintenance lock")
        for job in selected:
            results.append(await _run_one(dl, lock_conn, job, instance, since))
    finally:
        await lock_conn.close()  # releases any lock still held
    return results


async def _run_one(dl: DataLayer, lock_conn: asyncpg.Connection, job: Job, instance: str,
                   since: datetime) -> JobResult:
    t0 = time.perf_counter()
    if not await guarded(lock_conn.fetchval(_TRY_LOCK, job.name), "maintenance lock"):
        log.info("maintenance job %s is running elsewhere; skipped", job.name)
        return JobResult(job.name, "skipped", {}, 0.0, "running in another process")
    error: str | None = None
    counts: dict[str, int] = {}
    try:
        async with dl.system() as db:
            started = await db.scalar("maintenance.start", job=job.name, instance=instance,
                                      since=since)
        if started is None:
            return JobResult(job.name, "skipped", {}, 0.0,
                             "another process ran it since this run began")
        try:
            counts = {k: int(v) for k, v in (await job.run(dl)).items()}
        except Exception as exc:  # recorded, logged; the other jobs still run
            error = _describe(exc)
            log.warning("maintenance job %s failed: %s", job.name, error,
                        extra={"job": job.name})
        async with dl.system() as db:
            await db.exec("maintenance.finished", job=job.name, started_at=started,
                          ok=error is None, error=error, counts=counts, instance=instance)
    except DataLayerError as exc:  # could not record the run: report it, go on
        error = error or _describe(exc)
        log.warning("maintenance job %s: could not record its run: %s", job.name, exc)
    finally:
        # An unlock that fails (the connection lost) must not hide the job's own outcome:
        # the lock went with the connection's session anyway.
        with contextlib.suppress(DataLayerError):
            await guarded(lock_conn.fetchval(_UNLOCK, job.name), "maintenance unlock")
    ms = (time.perf_counter() - t0) * 1000
    return JobResult(job.name, "ok" if error is None else "error", counts, round(ms, 2), error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DataLayerError):
        text = f"{type(exc).__name__}: {exc}"
    else:
        text = type(exc).__name__ + (f": {exc}" if str(exc) else "")
    return text[:2000]


async def last_runs(dl: DataLayer) -> list[JobRun]:
    """Every job's last recorded run (``maintenance_runs``), by name."""
    async with dl.system() as db:
        rows = await db.many("maintenance.last_runs")
    return [JobRun(**dict(r)) for r in rows]
