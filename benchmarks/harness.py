"""The benchmark harness: each scenario against raw asyncpg running the same SQL, in one run.

A :class:`Scenario` is a ``setup`` (run once; returns the state its operations use, e.g.
ids), a ``candidate`` operation (the datalayer path) and a ``baseline`` operation (the
same SQL on raw asyncpg). For every concurrency level the harness warms both up, then
alternates timed rounds baseline, candidate, baseline, candidate, … so that drift on a
noisy machine hits both sides alike, and reports the candidate's throughput and latency
percentiles with the ratio of its p50 to the baseline's (``DESIGN.md``, Performance:
ratios survive noisy machines, absolute times do not).

Scenarios live in the modules of this package: every module but this one that defines
``SCENARIOS: list[Scenario]`` contributes. Names are dotted (``session.one.same_tenant``);
selecting ``session`` runs every ``session.*`` scenario.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import importlib
import itertools
import pkgutil
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import asyncpg
import orjson

from datalayer import DataLayer, Settings, ValidationError
from datalayer.core.database import _init_connection

__all__ = [
    "CONTRACT_FIELDS",
    "BenchContext",
    "Scenario",
    "Skip",
    "bind_context",
    "discover",
    "measure",
    "run",
    "select",
    "throughput",
]

Setup = Callable[["BenchContext"], Awaitable[Any]]
Op = Callable[["BenchContext", Any, int], Awaitable[None]]
Extra = Callable[["BenchContext", Any], Awaitable[Mapping[str, Any]]]

# The fields every JSON row has, in this order; ``datalayer bench --json`` consumers rely on them.
CONTRACT_FIELDS = ("scenario", "concurrency", "ops_per_s", "p50_ms", "p95_ms", "p99_ms",
                   "baseline_p50_ms", "ratio")
POOL_SIZE = 16  # both pools, both sides: the same number of connections
DEFAULT_CONCURRENCY = (1, 16)
DEFAULT_ROUNDS = 3


class Skip(Exception):
    """Raised by a setup whose scenario cannot run here (e.g. no ``REDIS_URL`` for a Redis
    scenario): the run says why on stderr and in the table, reports no row for it, and goes
    on with the next scenario."""


@dataclass(frozen=True, slots=True)
class Scenario:
    """One comparison. ``candidate`` and ``baseline`` run one operation each call; the int
    is the operation's index (consecutive across all workers, e.g. to pick a tenant).

    ``extra(bctx, state)``, if given, is awaited after each concurrency level; its fields
    are added to that JSON row (e.g. a cache hit rate, or an absolute target:
    ``p99_target_ms``, ``rows_per_s_target``). ``target`` is the ratio the candidate must
    stay under. The verdict (``ok``/``MISS``) checks every target the row carries. With
    ``hold_connection`` each worker holds one connection of the raw pool for a whole
    round, as ``bctx.conn``: for scenarios that measure what runs on a connection, not
    acquiring one.
    """

    name: str
    setup: Setup
    candidate: Op
    baseline: Op
    extra: Extra | None = None
    target: float | None = None
    hold_connection: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValidationError(f"scenario name {self.name!r} must be non-empty, no spaces")
        if self.target is not None and self.target <= 0:
            raise ValidationError(f"{self.name}: target must be a positive ratio")


def bind_context(sql: str, nparams: int, *, user: bool = True) -> str:
    """A registry query for a raw-asyncpg baseline, which has no tenant context:
    ``app.org_id()`` becomes parameter ``$nparams+1`` and, with ``user``, ``app.user_id()``
    ``$nparams+2``, so the baseline passes the context's ids after the query's own arguments.
    One the query does not use is declared in an unreferenced CTE, so they always bind."""
    sql = sql.rstrip().rstrip(";")
    names = ["app.org_id()", "app.user_id()"][: 2 if user else 1]
    for k, name in enumerate(names, start=nparams + 1):
        if name in sql:
            sql = sql.replace(name, f"${k}::uuid")
        elif sql.lstrip().upper().startswith("WITH"):
            raise ValidationError(f"bind_context: {name} unused in a WITH query")
        else:
            sql = f"WITH _ctx{k} AS (SELECT ${k}::uuid) {sql}"
    return sql


_HELD: contextvars.ContextVar[asyncpg.Connection | None] = contextvars.ContextVar(
    "benchmarks_held_connection", default=None
)


class BenchContext:
    """What operations run against: the started ``DataLayer`` (``dl``), the raw asyncpg
    ``pool`` of the baseline (same size, same jsonb codec, a no-op reset), the
    ``settings``, a ``cache`` shared by setups (e.g. tenants created once) and an exit
    stack, ``cleanup``, for whatever a setup must undo or close at the end of the run."""

    __slots__ = ("cache", "cleanup", "dl", "pool", "settings")

    def __init__(self, dl: DataLayer, pool: asyncpg.Pool, settings: Settings,
                 cleanup: AsyncExitStack) -> None:
        self.dl = dl
        self.pool = pool
        self.settings = settings
        self.cache: dict[str, Any] = {}
        self.cleanup = cleanup

    @property
    def conn(self) -> asyncpg.Connection:
        """This worker's connection from the raw pool (``hold_connection`` scenarios)."""
        conn = _HELD.get()
        if conn is None:
            raise ValidationError("bctx.conn is only set in scenarios with hold_connection=True")
        return conn


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Baseline pool reset: nothing, so the baseline is as fast as asyncpg can be."""


# -- discovery and selection --------------------------------------------------------------
def discover() -> list[Scenario]:
    """Every scenario of every module in this package (``core`` first, then by name)."""
    package = __name__.rpartition(".")[0]
    paths = sys.modules[package].__path__
    names = sorted((m.name for m in pkgutil.iter_modules(paths) if m.name != "harness"),
                   key=lambda n: (n != "core", n))
    found: list[Scenario] = []
    seen: dict[str, str] = {}
    for mod_name in names:
        module = importlib.import_module(f"{package}.{mod_name}")
        scenarios = getattr(module, "SCENARIOS", None)
        if scenarios is None:
            continue
        for s in scenarios:
            if not isinstance(s, Scenario):
                raise ValidationError(f"{package}.{mod_name}.SCENARIOS holds a "
                                      f"{type(s).__name__}, not a Scenario")
            if s.name in seen:
                raise ValidationError(f"scenario {s.name} is defined in both "
                                      f"{seen[s.name]} and {mod_name}")
            seen[s.name] = mod_name
            found.append(s)
    return found


def select(scenarios: list[Scenario], names: Iterable[str] | None) -> list[Scenario]:
    """The scenarios named (exactly, or by a dotted prefix), in discovery order."""
    if names is None:
        return list(scenarios)
    wanted = list(names)
    if not wanted:
        return list(scenarios)

    def matches(pattern: str, name: str) -> bool:
        return name == pattern or name.startswith(pattern.rstrip(".") + ".")

    unknown = [n for n in wanted if not any(matches(n, s.name) for s in scenarios)]
    if unknown:
        known = ", ".join(s.name for s in scenarios) or "none"
        raise ValidationError(f"unknown scenario {', '.join(map(repr, unknown))}; "
                              f"known: {known}")
    return [s for s in scenarios if any(matches(n, s.name) for n in wanted)]


# -- measurement --------------------------------------------------------------------------
async def _round(bctx: BenchContext, op: Op, state: Any, *, concurrency: int, seconds: float,
                 counter: Iterator[int], hold: bool, latencies: list[int]) -> float:
    """``concurrency`` workers loop ``op`` for ``seconds``; returns the round's wall time
    (seconds) and appends each operation's latency (ns) to ``latencies``."""
    held: list[Any] = []
    try:
        if hold:
            for _ in range(concurrency):
                held.append(await bctx.pool.acquire())
        clock = time.perf_counter_ns
        deadline = 0

        async def worker(conn: Any) -> None:
            if conn is not None:
                _HELD.set(cast(asyncpg.Connection, conn))  # this worker task's own context
            record = latencies.append
            while True:
                t0 = clock()
                if t0 >= deadline:
                    return
                await op(bctx, state, next(counter))
                record(clock() - t0)

        start = clock()
        deadline = start + int(seconds * 1e9)
        conns = held if hold else [None] * concurrency
        await asyncio.gather(*(worker(c) for c in conns))
        return (clock() - start) / 1e9
    finally:
        for conn in held:
            await bctx.pool.release(conn)


def _percentile(ordered: list[int], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..1) of sorted nanoseconds, in milliseconds."""
    if not ordered:
        return 0.0
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    value = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    return value / 1e6


async def measure(bctx: BenchContext, scenario: Scenario, state: Any, concurrency: int, *,
                  duration_s: float, rounds: int = DEFAULT_ROUNDS,
                  warmup_s: float | None = None) -> dict[str, Any]:
    """One JSON row: ``scenario`` at ``concurrency``, ``duration_s`` of timed rounds."""
    per_round = duration_s / (2 * rounds)
    warm = warmup_s if warmup_s is not None else max(0.05, min(1.0, duration_s / 10))
    counters = {"baseline": itertools.count(), "candidate": itertools.count()}
    ops = {"baseline": scenario.baseline, "candidate": scenario.candidate}
    lat: dict[str, list[int]] = {"baseline": [], "candidate": []}
    secs = {"baseline": 0.0, "candidate": 0.0}
    for side in ("baseline", "candidate"):
        await _round(bctx, ops[side], state, concurrency=concurrency, seconds=warm,
                     counter=counters[side], hold=scenario.hold_connection, latencies=[])
    for _ in range(rounds):
        for side in ("baseline", "candidate"):
            secs[side] += await _round(bctx, ops[side], state, concurrency=concurrency,
                                       seconds=per_round, counter=counters[side],
                                       hold=scenario.hold_connection, latencies=lat[side])
    cand = sorted(lat["candidate"])
    base = sorted(lat["baseline"])
    p50 = round(_percentile(cand, 0.50), 4)
    base_p50 = round(_percentile(base, 0.50), 4)
    row: dict[str, Any] = {
        "scenario": scenario.name,
        "concurrency": concurrency,
        "ops_per_s": round(len(cand) / secs["candidate"], 1) if secs["candidate"] else 0.0,
        "p50_ms": p50,
        "p95_ms": round(_percentile(cand, 0.95), 4),
        "p99_ms": round(_percentile(cand, 0.99), 4),
        "baseline_p50_ms": base_p50,
        "ratio": round(p50 / base_p50, 3) if base_p50 else 0.0,
        "baseline_ops_per_s": round(len(base) / secs["baseline"], 1) if secs["baseline"] else 0.0,
        "baseline_p99_ms": round(_percentile(base, 0.99), 4),
        "target": scenario.target,
    }
    add_fields = scenario.extra
    if add_fields is not None:
        more = await add_fields(bctx, state)
        clash = sorted(set(more) & set(row))
        if clash:
            raise ValidationError(f"{scenario.name}: extra fields may not replace "
                                  f"{', '.join(clash)}")
        row.update(more)
    return row


# -- output -------------------------------------------------------------------------------
_COLUMNS = (("scenario", 28, "<"), ("c", 3, ">"), ("ops/s", 9, ">"), ("p50", 8, ">"),
            ("p95", 8, ">"), ("p99", 8, ">"), ("base p50", 9, ">"), ("ratio", 6, ">"),
            ("target", 6, ">"), ("verdict", 7, "<"))


def verdict(row: Mapping[str, Any]) -> str:
    """``ok`` when the row meets every target it carries, ``MISS`` otherwise, ``-`` without
    any: the scenario's ratio ``target``, and the absolute targets an ``extra`` reports,
    ``p99_target_ms`` (p99 under it) and ``rows_per_s_target`` (``rows_per_s`` at least)."""
    met: list[bool] = []
    if row.get("target") is not None:
        met.append(row["ratio"] <= row["target"])
    if row.get("p99_target_ms") is not None:
        met.append(row["p99_ms"] < row["p99_target_ms"])
    if row.get("rows_per_s_target") is not None:
        met.append(row.get("rows_per_s", 0.0) >= row["rows_per_s_target"])
    if not met:
        return "-"
    return "ok" if all(met) else "MISS"


def _line(cells: Iterable[str]) -> str:
    return "  ".join(f"{cell:{align}{width}}"
                     for cell, (_, width, align) in zip(cells, _COLUMNS, strict=True)).rstrip()


def header() -> str:
    """The table's header (times in milliseconds)."""
    return _line(name for name, _, _ in _COLUMNS)


def format_row(row: Mapping[str, Any]) -> str:
    target = row.get("target")
    return _line((
        str(row["scenario"]), str(row["concurrency"]), f"{row['ops_per_s']:.0f}",
        f"{row['p50_ms']:.3f}", f"{row['p95_ms']:.3f}", f"{row['p99_ms']:.3f}",
        f"{row['baseline_p50_ms']:.3f}", f"{row['ratio']:.3f}",
        "-" if target is None else f"{target:.2f}", verdict(row),
    ))


# -- entry point --------------------------------------------------------------------------
async def run(settings: Settings, names: list[str] | None, *, json_path: Path | None,
              duration_s: float, concurrency: tuple[int, ...], out: TextIO,
              rounds: int = DEFAULT_ROUNDS, warmup_s: float | None = None,
              progress: TextIO | None = None) -> list[dict[str, Any]]:
    """Run the ``names`` scenarios (all when None) and return one row per scenario and
    concurrency; print the table to ``out`` and write the rows to ``json_path`` if given.

    ``duration_s`` is the timed part of each (scenario, concurrency), split into ``rounds``
    rounds per side. The run uses its own ``DataLayer`` (pool of 16, or the largest
    concurrency if more; no statement timeout) and seeds what its scenarios need, so an
    empty migrated database is enough. Raises ``ValidationError`` for unknown names.
    """
    if not duration_s > 0:
        raise ValidationError("duration must be > 0 seconds")
    if rounds < 1:
        raise ValidationError("rounds must be >= 1")
    if not concurrency or any(c < 1 for c in concurrency):
        raise ValidationError("concurrency must be one or more integers >= 1")
    scenarios = select(discover(), names)
    err = progress if progress is not None else sys.stderr
    size = max(POOL_SIZE, *concurrency)
    bench_settings = dataclasses.replace(settings, pool_min_size=size, pool_max_size=size,
                                         statement_timeout_ms=0)
    rows: list[dict[str, Any]] = []
    async with AsyncExitStack() as stack:
        dl = await stack.enter_async_context(DataLayer(bench_settings))
        pool = await asyncpg.create_pool(bench_settings.database_url, min_size=size,
                                         max_size=size, init=_init_connection,
                                         reset=_no_reset)
        stack.push_async_callback(pool.close)
        bctx = BenchContext(dl, pool, bench_settings, stack)
        print(header(), file=out, flush=True)
        for scenario in scenarios:
            print(f"[bench] {scenario.name}: setup", file=err, flush=True)
            await _reset_baseline(pool)
            try:
                state = await scenario.setup(bctx)
            except Skip as e:
                print(f"[bench] {scenario.name}: skipped: {e}", file=err, flush=True)
                print(f"{scenario.name:<28}  skipped: {e}", file=out, flush=True)
                continue
            await _settle(pool, err)
            for c in concurrency:
                print(f"[bench] {scenario.name}: concurrency {c}, {duration_s:g}s",
                      file=err, flush=True)
                row = await measure(bctx, scenario, state, c, duration_s=duration_s,
                                    rounds=rounds, warmup_s=warmup_s)
                rows.append(row)
                print(format_row(row), file=out, flush=True)
    if json_path is not None:
        data = orjson.dumps(rows, option=orjson.OPT_INDENT_2) + b"\n"
        await asyncio.to_thread(json_path.write_bytes, data)
        print(f"[bench] wrote {json_path}", file=err, flush=True)
    return rows


async def _reset_baseline(pool: asyncpg.Pool) -> None:
    """Every scenario's baseline starts from the login role's defaults: ``RESET ALL`` on each
    raw connection clears what an earlier scenario left there (``_no_reset`` keeps session
    settings between operations, and some setups apply an ``app.*`` context once for their
    baseline's whole run, which a later scenario's SQL must not see)."""
    conns = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        for conn in conns:
            await conn.execute("RESET ALL")
    finally:
        for conn in conns:
            await pool.release(conn)


async def _settle(pool: asyncpg.Pool, err: TextIO) -> None:
    """Write the setup's dirty pages out before measuring: a seeding of a million rows leaves
    gigabytes for the checkpointer, and its write-back would otherwise land in the timed
    rounds (both sides' commits wait on the disk behind it). Needs a superuser or
    pg_checkpoint; without either the run goes on, saying so."""
    try:
        await pool.execute("CHECKPOINT")
    except asyncpg.InsufficientPrivilegeError:
        print("[bench] CHECKPOINT not allowed for this role: the setup's write-back may "
              "show in the numbers", file=err, flush=True)


def throughput(spans: list[tuple[float, float, int]]) -> float:
    """Items per second over the union of operations' (start, end, items) time spans, so
    overlapping concurrent operations are not counted twice."""
    busy, end, done = 0.0, float("-inf"), 0
    for t0, t1, n in sorted(spans):
        done += n
        if t0 > end:
            busy += t1 - t0
            end = t1
        elif t1 > end:
            busy += t1 - end
            end = t1
    return round(done / busy, 1) if busy else 0.0
