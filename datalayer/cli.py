"""The ``datalayer`` command. Data goes to stdout, progress and errors to stderr.

Every command reads its configuration from the environment (``Settings.from_env``); the
variables are listed in ``datalayer --help`` and in the README. Failures exit non-zero with
one line saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from datalayer.core import migrations
from datalayer.core.database import DataLayer
from datalayer.core.errors import DataLayerError
from datalayer.core.resources import resource_dir
from datalayer.core.session import guarded
from datalayer.settings import Settings

__all__ = ["main"]

ENV_HELP = """\
configuration (environment):
  DATABASE_URL                     login role used at run time
                                   (default postgresql://postgres@127.0.0.1:5432/postgres)
  DATALAYER_ADMIN_URL              role that runs migrations (default: DATABASE_URL)
  REDIS_URL                        optional Redis (redis://host:6379/0)
  DATALAYER_ENV                    development | testing | production
  DATALAYER_KEYS                   kid:base64key[,…] encryption keys (required in production)
  DATALAYER_POOL_MIN               pool size, minimum (2)
  DATALAYER_POOL_MAX               pool size, maximum (10)
  DATALAYER_STATEMENT_TIMEOUT_MS   per-statement limit, 0 = none (30000)
  DATALAYER_ACQUIRE_TIMEOUT_S      wait for a pooled connection (10)
  DATALAYER_CONNECT_TIMEOUT_S      wait for the database to come up at start (15)
  DATALAYER_MIGRATE_ON_START       apply migrations at start (true)
  DATALAYER_MIGRATION_LOCK_TIMEOUT_S  wait for another process's migration (60)
  DATALAYER_CONTEXT_MODE           session | transaction (PgBouncer) (session)
  DATALAYER_STATEMENT_CACHE_SIZE   asyncpg prepared-statement cache (512)
  DATALAYER_DEVDB_DIR              where `dev-db` keeps its cluster (./.datalayer/devdb)
  DATALAYER_CACHE_BACKEND          redis | memory | postgres (redis with REDIS_URL, else memory)
  DATALAYER_CACHE_MAX_BYTES        memory cache budget (67108864)
  DATALAYER_CACHE_PREFIX           Redis key prefix of the cache (dl:cache:)
  DATALAYER_CHANNEL_PREFIX         Redis pub/sub channel prefix (datalayer:)
  DATALAYER_CACHE_STATS_INTERVAL_S write cache_stats this often, 0 = never (60)
  DATALAYER_CACHE_LOOKUPS          read-through caching of users.get, api_keys.verify (true)
  DATALAYER_QUERY_METRICS          in-process per-query figures (true)
  DATALAYER_SLOW_QUERY_MS          log queries this slow (name, duration), 0 = never (200)
  DATALAYER_QUERY_SAMPLE_RATE      share of slow queries written to query_performance (1.0)
  DATALAYER_QUERY_BUFFER_MAX       slow-query samples waiting to be written (10000)
  DATALAYER_OTEL_SPANS             an OpenTelemetry span per query, needs datalayer[otel] (false)
  DATALAYER_EXECUTION_RETENTION_DAYS  `maintain` drops older execution partitions, 0 = keep (0)
"""


def _err(message: str) -> None:
    print(f"datalayer: error: {message}", file=sys.stderr)


def _json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


def _settings(**overrides: Any) -> Settings:
    s = Settings.from_env()
    return replace(s, **overrides) if overrides else s


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


# -- migrate ------------------------------------------------------------------------------
def cmd_migrate(args: argparse.Namespace) -> int:
    s = _settings()
    schema = resource_dir("schema")
    if args.action == "apply":
        done = migrations.apply(s, schema)
        print("\n".join(done) if done else "nothing to apply")
    elif args.action == "rollback":
        done = migrations.rollback(s, schema, count=None if args.all else args.count)
        print("\n".join(f"rolled back {m}" for m in done) if done else "nothing to roll back")
    else:
        rows = migrations.status(s, schema)
        if args.json:
            _json([{"id": r.id, "applied": r.applied, "sha256": r.sha256,
                    "recorded_sha256": r.recorded_sha256} for r in rows])
        else:
            for r in rows:
                drift = " (CHANGED since applied)" if (
                    r.recorded_sha256 and r.recorded_sha256 != r.sha256) else ""
                print(f"{'applied' if r.applied else 'pending':8} {r.id}{drift}")
        if args.strict:
            migrations.verify(s, schema)
    return 0


# -- check ----------------------------------------------------------------------------------
async def _check(args: argparse.Namespace) -> int:
    async with DataLayer(_settings()) as dl:
        infos = await dl.validate()
    failures = [i for i in infos if not i.ok]
    if args.json:
        _json([{"name": i.name, "shape": i.shape.value, "ok": i.ok, "error": i.error,
                "params": [{"name": n, "type": t} for n, t in i.params],
                "columns": [{"name": c.name, "type": c.type, "nullable": c.nullable}
                            for c in i.columns]} for i in infos])
    else:
        for i in infos:
            if not i.ok:
                print(f"FAIL {i.name}: {i.error}")
                continue
            params = ", ".join(f"{n} {t}" for n, t in i.params)
            cols = ", ".join(
                f"{c.name} {c.type}{'' if c.nullable is None else ('?' if c.nullable else '!')}"
                for c in i.columns)
            print(f"ok   {i.name} :{i.shape.value}({params})" + (f" -> {cols}" if cols else ""))
        print(f"{len(infos) - len(failures)}/{len(infos)} queries prepared "
              "('!' not null, '?' nullable, neither: computed)", file=sys.stderr)
    if failures:
        _err(f"{len(failures)} of {len(infos)} queries failed to prepare")
        return 1
    return 0


# -- health ---------------------------------------------------------------------------------
async def _health(args: argparse.Namespace) -> int:
    from datalayer.health import format_report

    async with DataLayer(_settings(migrate_on_start=False, connect_timeout_s=3.0)) as dl:
        report = await dl.health()
    if args.json:
        _json(report)
    else:
        print(format_report(report))
    if not report["ok"]:
        _err("unhealthy: " + ", ".join(k for k, v in report.items()
                                        if isinstance(v, dict) and v.get("ok") is False))
        return 1
    return 0


# -- demo -----------------------------------------------------------------------------------
async def _demo(args: argparse.Namespace) -> int:
    from datalayer.demo import run_demo

    async with DataLayer(_settings()) as dl:
        await run_demo(dl, sys.stdout)
    return 0


# -- dev-db ---------------------------------------------------------------------------------
def cmd_devdb(args: argparse.Namespace) -> int:
    from datalayer.devdb import DevDB

    db = DevDB()
    if args.action == "start":
        print(db.start())
    elif args.action == "stop":
        print("stopped" if db.stop() else "was not running")
    elif args.action == "status":
        print(db.status())
    else:
        url = db.url()
        if url is None:
            _err("the development database is not running; run 'datalayer dev-db start'")
            return 1
        print(url)
    return 0


# -- seed & bench -----------------------------------------------------------------------------
async def _seed(args: argparse.Namespace) -> int:
    from datalayer.seed import seed

    async with DataLayer(_settings()) as dl:
        counts = await seed(dl, profile=args.profile, scale=args.scale, out=sys.stderr)
    if args.json:
        _json(counts)
    else:
        print("\n".join(f"{domain:16} {n:>10,} rows" for domain, n in counts.items()))
    return 0


def load_benchmarks() -> ModuleType:
    """Import the ``benchmarks`` package from the source tree or the wheel's copy."""
    if "benchmarks.harness" in sys.modules:
        return sys.modules["benchmarks.harness"]
    root = resource_dir("benchmarks")
    spec = importlib.util.spec_from_file_location(
        "benchmarks", root / "__init__.py", submodule_search_locations=[str(root)])
    if spec is None or spec.loader is None:
        raise DataLayerError(f"benchmark suite not found at {root}")
    package = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("benchmarks.harness")


async def _bench(args: argparse.Namespace) -> int:
    harness = load_benchmarks()
    conc = tuple(int(c) for c in args.concurrency.split(","))
    s = _settings(pool_min_size=max(conc), pool_max_size=max(conc), statement_timeout_ms=0)
    rows = await harness.run(s, args.scenarios or None,
                             json_path=Path(args.json) if args.json else None,
                             duration_s=args.duration, concurrency=conc, out=sys.stdout)
    return 0 if rows else 1


# -- keys -------------------------------------------------------------------------------------
async def _keys(args: argparse.Namespace) -> int:
    from datalayer.security import Keyring
    from datalayer.security.rotation import RotationProgress, rotate

    if args.action == "generate":
        import time

        print(f"{args.kid or time.strftime('k%Y%m%d')}:{Keyring.generate_key()}")
        return 0

    def progress(p: RotationProgress) -> None:
        print(f"{p.column}: batch {p.batch}, {p.rotated}/{p.total} re-encrypted"
              + (f", {p.skipped} changed meanwhile (next pass)" if p.skipped else ""),
              file=sys.stderr)

    async with DataLayer(_settings()) as dl:
        print(f"rotating to key {dl.keyring.active_kid!r} "
              f"(ring: {', '.join(dl.keyring.kids)})", file=sys.stderr)
        report = await rotate(dl, batch=args.batch, progress=progress)
    _json(report.as_dict())
    return 0


# -- audit ------------------------------------------------------------------------------------
def _when(text: str) -> Any:
    from datetime import UTC, datetime

    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise DataLayerError(f"not an ISO date or timestamp: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def _audit(args: argparse.Namespace) -> int:
    import uuid
    from datetime import UTC, datetime, timedelta

    from datalayer.repos.audit import compliance_report, verify_chain

    try:
        org = uuid.UUID(args.org)
    except ValueError:
        raise DataLayerError("--org must be an organization id (UUID)") from None
    async with DataLayer(_settings()) as dl:
        if args.action == "verify":
            chain = await verify_chain(dl, org)
            out: dict[str, Any] = {"org_id": str(org), "ok": chain.ok, "rows": chain.rows,
                                   "heads": chain.heads, "problems": chain.problems}
            if args.json:
                _json(out)
            else:
                print(("chain ok" if chain.ok else "CHAIN BROKEN") + f": {chain.rows}")
                print("\n".join(chain.problems))
            return 0 if chain.ok else 2
        to_at = _when(args.to) if args.to else datetime.now(UTC)
        from_at = _when(args.from_) if args.from_ else to_at - timedelta(days=30)
        report = await compliance_report(dl, org, from_at=from_at, to_at=to_at,
                                         framework=args.framework)
    if args.json:
        _json({"org_id": str(org), "from": from_at.isoformat(), "to": to_at.isoformat(),
               "framework": args.framework,
               "reports": {k: [{"seq": e.seq, "at": e.at.isoformat(), "action": e.action,
                                "result": e.result, "risk": e.risk,
                                "frameworks": e.frameworks,
                                "actor_user_id": e.actor_user_id and str(e.actor_user_id),
                                "subject_user_id": e.subject_user_id
                                and str(e.subject_user_id),
                                "resource": f"{e.resource_type}:{e.resource_id}",
                                "ip": e.ip and str(e.ip), "request_id": e.request_id,
                                "details": e.details} for e in events]
                           for k, events in report.items()}})
        return 0
    print(f"audit report {org}  {from_at.isoformat()} .. {to_at.isoformat()}"
          + (f"  framework {args.framework}" if args.framework else ""))
    for kind, events in report.items():
        print(f"\n{kind} ({len(events)})")
        for e in events:
            print(f"  {e.at.isoformat()}  {e.risk:8} {e.action:28} {e.result:8} "
                  f"actor={e.actor_user_id} subject={e.subject_user_id} "
                  f"{e.resource_type or ''}:{e.resource_id or ''}")
    return 0


# -- gdpr -------------------------------------------------------------------------------------
async def _gdpr(args: argparse.Namespace) -> int:
    import uuid

    from datalayer.core.context import Context

    def uid(value: str, flag: str) -> uuid.UUID:
        try:
            return uuid.UUID(value)
        except ValueError:
            raise DataLayerError(f"{flag} must be a UUID") from None

    user = uid(args.user, "--user")
    if (args.org is None) != (args.as_user is None):
        raise DataLayerError("--org and --as go together (a requester in an organization); "
                             "without both the command runs as maintenance, every organization")
    if args.action == "erase" and not args.yes:
        raise DataLayerError("erasure cannot be undone: add --yes")
    async with DataLayer(_settings()) as dl:
        if args.org is None:
            scope = dl.system()
        else:
            org, requester = uid(args.org, "--org"), uid(args.as_user, "--as")
            async with dl.system() as sysdb:
                role = await guarded(sysdb.connection.fetchval(
                    "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2",
                    org, requester), "gdpr --as membership")
            if role is None:
                raise DataLayerError("--as is not a member of --org")
            scope = dl.session(Context(org, user_id=requester, role=role))
        async with scope as db:
            if args.action == "export":
                _json(await db.gdpr.export(user))
            else:
                e = await db.gdpr.erase(user)
                _json({"user_id": e.user_id, "pseudonym": e.pseudonym,
                       "organization": e.organization, "affected": e.affected,
                       "profile_erased": e.profile_erased, "audit_redacted": e.audit_redacted})
    return 0


# -- stats & maintain -------------------------------------------------------------------------
async def _stats(args: argparse.Namespace) -> int:
    from datalayer.stats import format_stats

    async with DataLayer(_settings(migrate_on_start=False)) as dl:
        stats = await dl.stats(explain=not args.no_explain)
    if args.json:
        _json(stats.as_dict())
    else:
        print(format_stats(stats, top=args.top))
    return 0


async def _maintain(args: argparse.Namespace) -> int:
    async with DataLayer(_settings()) as dl:
        results = await dl.maintain(args.job or None)
    if args.json:
        _json([r.as_dict() for r in results])
    else:
        for r in results:
            detail = r.error if r.status != "ok" else ", ".join(
                f"{k}={v}" for k, v in r.counts.items())
            print(f"{r.status:8} {r.job:26} {r.duration_ms:>9.1f} ms  {detail or ''}")
    failed = [r.job for r in results if r.status == "error"]
    if failed:
        _err(f"maintenance failed: {', '.join(failed)}")
        return 1
    return 0


# -- parser -------------------------------------------------------------------------------------
def _async(fn: Callable[[argparse.Namespace], Coroutine[Any, Any, int]]
           ) -> Callable[[argparse.Namespace], int]:
    return lambda args: _run(fn(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="datalayer", description="Async raw-SQL PostgreSQL data layer: operations.",
        epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str,
            epilog: str = ENV_HELP) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=fn)
        return sp

    m = add("migrate", cmd_migrate, "apply, inspect or roll back schema migrations")
    m.add_argument("action", choices=["apply", "status", "rollback"])
    m.add_argument("--count", type=int, default=1, help="rollback: how many (default 1)")
    m.add_argument("--all", action="store_true", help="rollback: every applied migration")
    m.add_argument("--json", action="store_true", help="status: machine-readable output")
    m.add_argument("--strict", action="store_true",
                   help="status: exit non-zero when anything is pending or changed")

    c = add("check", _async(_check),
            "migrate, then prepare every registry query and print its parameter and "
            "column types; non-zero exit on any failure")
    c.add_argument("--json", action="store_true")

    h = add("health", _async(_health),
            "database latency, migrations current and unchanged, pool, Redis if configured, "
            "replication lag, oldest transaction, last maintenance runs; non-zero exit when "
            "something is wrong")
    h.add_argument("--json", action="store_true")

    add("demo", _async(_demo), "run the demonstration scenario against the database")

    d = add("dev-db", cmd_devdb, "embedded development PostgreSQL (DATALAYER_DEVDB_DIR)")
    d.add_argument("action", choices=["start", "stop", "status", "url"])

    sd = add("seed", _async(_seed), "load a realistic multi-tenant dataset through COPY")
    sd.add_argument("--profile", choices=["dev", "bench"],
                    default=os.environ.get("DATALAYER_SEED_PROFILE", "dev"),
                    help="dataset shape (DATALAYER_SEED_PROFILE, default dev)")
    sd.add_argument("--scale", type=int,
                    default=int(os.environ.get("DATALAYER_SEED_SCALE", "1")),
                    help="multiplier of row counts (DATALAYER_SEED_SCALE, default 1)")
    sd.add_argument("--json", action="store_true")

    k = add("keys", _async(_keys),
            "encryption keys: 'generate' prints a new kid:key for DATALAYER_KEYS; 'rotate' "
            "re-encrypts every registered encrypted column under the first key of "
            "DATALAYER_KEYS (online, resumable, idempotent)")
    k.add_argument("action", choices=["generate", "rotate"])
    k.add_argument("--kid", default=None,
                   help="generate: the key id (default kYYYYMMDD)")
    k.add_argument("--batch", type=int, default=500, help="rotate: rows per batch (500)")

    b = add("bench", _async(_bench),
            "run benchmark scenarios against raw asyncpg (all, or the named ones/prefixes)")
    b.add_argument("scenarios", nargs="*", help="scenario names or prefixes (default: all)")
    b.add_argument("--json", metavar="PATH", default=os.environ.get("DATALAYER_BENCH_JSON"),
                   help="also write results as JSON (DATALAYER_BENCH_JSON)")
    b.add_argument("--duration", type=float,
                   default=float(os.environ.get("DATALAYER_BENCH_DURATION", "6")),
                   help="seconds per scenario and concurrency (DATALAYER_BENCH_DURATION, 6)")
    b.add_argument("--concurrency", default=os.environ.get("DATALAYER_BENCH_CONCURRENCY",
                                                           "1,16"),
                   help="comma-separated levels (DATALAYER_BENCH_CONCURRENCY, default 1,16)")

    a = add("audit", _async(_audit),
            "audit trail: 'report' prints the compliance reports of an organization for a "
            "period (sensitive-data access, failed logins and lockouts, permission changes, "
            "high-risk events); 'verify' checks its hash chains (exit 2 when broken)")
    a.add_argument("action", choices=["report", "verify"])
    a.add_argument("--org", required=True, help="organization id")
    a.add_argument("--from", dest="from_", default=None,
                   help="report: period start, ISO date/time (default: 30 days before --to)")
    a.add_argument("--to", default=None, help="report: period end, exclusive (default: now)")
    a.add_argument("--framework", choices=["GDPR", "SOX", "HIPAA"], default=None,
                   help="report: only events that matter to this framework")
    a.add_argument("--json", action="store_true")

    g = add("gdpr", _async(_gdpr),
            "GDPR subject requests: 'export' prints everything stored about a user as JSON; "
            "'erase' erases or anonymizes it (with --org/--as: as that organization member, "
            "in that organization; without: maintenance, every organization)")
    g.add_argument("action", choices=["export", "erase"])
    g.add_argument("--user", required=True, help="the subject's user id")
    g.add_argument("--org", default=None, help="the requester's organization id")
    g.add_argument("--as", dest="as_user", default=None,
                   help="the requester's user id (an owner or admin of --org, or the subject)")
    g.add_argument("--yes", action="store_true", help="erase: confirm")

    st = add("stats", _async(_stats),
             "this process's query figures next to pg_stat_statements, and recommendations "
             "from the catalog (scans, indexes, dead rows, cache hit ratio, query plans)")
    st.add_argument("--json", action="store_true")
    st.add_argument("--top", type=int, default=15, help="queries listed (default 15)")
    st.add_argument("--no-explain", action="store_true",
                    help="skip EXPLAIN of every registry query's generic plan")

    from datalayer.maintenance import JOBS

    mt = add("maintain", _async(_maintain),
             "run the periodic maintenance jobs (each under an advisory lock; a job running "
             "elsewhere is skipped), recording each run; non-zero exit if one failed")
    mt.add_argument("--job", action="append", metavar="NAME", choices=[j.name for j in JOBS],
                    help="run only this job (repeatable): " + ", ".join(j.name for j in JOBS))
    mt.add_argument("--json", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="datalayer: %(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except DataLayerError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
