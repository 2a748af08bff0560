"""Execution scenarios: the work queue's throughput, its wake-up latency, and the timeline.

* ``executions.claim_complete``: one operation is a round of ``WORKERS`` (4) workers, each
  claiming a batch of ``BATCH`` through ``db.executions`` in ``dl.system()``, renewing its
  leases (heartbeat) and completing the batch; the baseline sends the same three statements
  on raw asyncpg. ``executions_per_s`` (and the baseline's) is what was completed over the
  time the side was running; target 3,000/s. The queue is pre-filled by COPY and topped up
  between concurrency levels (untimed).
* ``executions.enqueue_to_claim``: ``WORKERS`` idle workers wait on LISTEN (the datalayer
  ``Worker``; raw asyncpg LISTEN connections for the baseline); an operation enqueues one
  execution and waits until a worker has claimed it (workers complete in the background).
  ``claim_p50_ms``/``claim_p99_ms`` measure from the enqueue's commit to the claim's
  return; target p99 < 10 ms.
* ``executions.timeline``: the timeline of an execution with 500 node executions (one
  statement) in a tenant session; the baseline runs the same SQL. Target p99 < 10 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from datalayer import Context, DataLayer
from datalayer.queue import WAKE_CHANNEL, Worker
from datalayer.repos.executions import Execution

from .core import owned_org
from .harness import BenchContext, Scenario, throughput

__all__ = ["SCENARIOS"]

WORKERS = 4
BATCH = 50
LEASE_S = 30.0
QUEUE_FILL = 100_000  # queued executions kept ready for claim_complete
NODES = 500


@dataclass(frozen=True, slots=True)
class BenchTenant:
    org_id: uuid.UUID
    owner: Context
    workflow_id: uuid.UUID
    version: int


async def _tenant(bctx: BenchContext) -> BenchTenant:
    cached: BenchTenant | None = bctx.cache.get("executions.tenant")
    if cached is not None:
        return cached
    dl = bctx.dl
    made = await owned_org(bctx, "executions")
    org, owner = made.org_id, made.ctx
    async with dl.session(owner) as db:
        wf = await db.workflows.create("bench", nodes=[{"id": "a", "type": "code"}])
    t = BenchTenant(org, owner, wf.id, wf.current_version)
    bctx.cache["executions.tenant"] = t

    async def purge() -> None:  # leave no backlog for the next run's workers
        async with dl.system() as db:
            await db.connection.execute(
                "DELETE FROM executions WHERE org_id = $1 AND status = 'queued'", org)

    bctx.cleanup.push_async_callback(purge)
    return t


async def _fill(dl: DataLayer, t: BenchTenant, n: int) -> None:
    """COPY ``n`` due queued executions of the bench workflow."""
    now = datetime.now(UTC) - timedelta(seconds=1)
    for start in range(0, n, 20_000):
        rows: list[tuple[Any, ...]] = [
            (t.org_id, uuid.uuid4(), t.workflow_id, t.version, "manual", {}, {"n": i}, None,
             None, "queued", 0, 1, 3, None, now, None, None, None, None, now)
            for i in range(start, min(n, start + 20_000))]
        async with dl.system() as db:
            await db.copy("executions.copy_rows", rows)
    async with dl.system() as db:
        await db.connection.execute("ANALYZE executions")


# -- claim + heartbeat + complete ---------------------------------------------------------------

@dataclass
class ClaimState:
    tenant: BenchTenant
    claim_sql: str
    claim_params: tuple[str, ...]
    heartbeat_sql: str
    complete_sql: str
    spans: dict[str, list[tuple[float, float, int]]] = field(
        default_factory=lambda: {"candidate": [], "baseline": []})


async def _claim_setup(bctx: BenchContext) -> ClaimState:
    t = await _tenant(bctx)
    await _fill(bctx.dl, t, QUEUE_FILL)
    reg = bctx.dl.registry
    claim = reg["executions.claim"]
    return ClaimState(t, claim.sql, claim.params, reg["executions.heartbeat"].sql,
                      reg["executions.complete_many"].sql)


async def _claim_cycle(b: BenchContext, s: ClaimState, i: int) -> None:
    async def worker(k: int) -> int:
        wid = f"bench-{i}-{k}"
        async with b.dl.system() as db:
            batch = await db.executions.claim(wid, limit=BATCH, lease_s=LEASE_S)
        if not batch:
            raise RuntimeError("the queue ran dry: lower --duration")
        async with b.dl.system() as db:
            await db.executions.heartbeat(wid, lease_s=LEASE_S)
        async with b.dl.system() as db:
            done = await db.executions.complete_many(wid, batch)
        return len(done)

    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*(worker(k) for k in range(WORKERS))))
    s.spans["candidate"].append((t0, time.perf_counter(), n))


async def _claim_cycle_raw(b: BenchContext, s: ClaimState, i: int) -> None:
    async def worker(k: int) -> int:
        wid = f"raw-{i}-{k}"
        args = {"worker_id": wid, "limit": BATCH, "lease_s": LEASE_S}
        async with b.pool.acquire() as conn:
            batch = await conn.fetch(s.claim_sql, *(args[p] for p in s.claim_params))
        if not batch:
            raise RuntimeError("the queue ran dry: lower --duration")
        async with b.pool.acquire() as conn:
            await conn.fetch(s.heartbeat_sql, LEASE_S, wid)
        async with b.pool.acquire() as conn:
            done = await conn.fetch(s.complete_sql, [r["org_id"] for r in batch],
                                    [r["id"] for r in batch], [r["attempt"] for r in batch],
                                    [None] * len(batch), wid)
        return len(done)

    t0 = time.perf_counter()
    n = sum(await asyncio.gather(*(worker(k) for k in range(WORKERS))))
    s.spans["baseline"].append((t0, time.perf_counter(), n))


async def _claim_extra(b: BenchContext, s: ClaimState) -> dict[str, Any]:
    used = sum(n for side in s.spans.values() for _, _, n in side)
    out = {"workers": WORKERS, "batch": BATCH,
           "executions_per_s": throughput(s.spans["candidate"]),
           "baseline_executions_per_s": throughput(s.spans["baseline"]),
           "target_executions_per_s": 3000.0}
    s.spans = {"candidate": [], "baseline": []}
    await _fill(b.dl, s.tenant, min(max(used, QUEUE_FILL // 4), 4 * QUEUE_FILL))  # untimed
    return out


# -- enqueue → claim latency --------------------------------------------------------------------

@dataclass
class WakeState:
    t: BenchTenant
    enqueue_sql: str
    enqueue_params: tuple[str, ...]
    claim_sql: str
    claim_params: tuple[str, ...]
    complete_sql: str
    side: str = "off"  # whose workers claim: set by each operation
    pending: dict[str, asyncio.Future[float]] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(
        default_factory=lambda: {"candidate": [], "baseline": []})


def _resolve(s: WakeState, batch: list[Any], at: float) -> None:
    for e in batch:
        token = (e["input"] if isinstance(e, asyncpg.Record) else e.input).get("token")
        fut = s.pending.pop(token, None) if isinstance(token, str) else None
        if fut is not None and not fut.done():
            fut.set_result(at)


async def _wake_setup(bctx: BenchContext) -> WakeState:
    t = await _tenant(bctx)
    dl = bctx.dl
    async with dl.system() as db:  # no backlog ahead of the executions this measures
        await db.connection.execute(
            "DELETE FROM executions WHERE org_id = $1 AND status = 'queued'", t.org_id)
    reg = dl.registry
    s = WakeState(t, reg["executions.enqueue"].sql, reg["executions.enqueue"].params,
                  reg["executions.claim"].sql, reg["executions.claim"].params,
                  reg["executions.complete_many"].sql)
    stop = asyncio.Event()

    finishing: set[asyncio.Task[Any]] = set()

    def later(coro: Any) -> None:  # complete in the background: the worker claims on
        task = asyncio.create_task(coro)
        finishing.add(task)
        task.add_done_callback(finishing.discard)

    async def complete(w: Worker, batch: list[Execution]) -> None:
        async with w.session() as db:
            await db.executions.complete_many(w.worker_id, batch)

    async def candidate_worker(k: int) -> None:
        async with Worker(dl, f"wake-{k}", lease_s=LEASE_S, poll_interval_s=1.0, reap=False,
                          maintain_partitions=False) as w:
            while not stop.is_set():
                if s.side == "candidate":
                    batch = await w.claim(BATCH)
                    if batch:
                        _resolve(s, batch, time.perf_counter())
                        later(complete(w, batch))
                        continue
                await w.wait_for_work()
            await asyncio.gather(*finishing, return_exceptions=True)

    async def complete_raw(wid: str, batch: list[Any]) -> None:
        async with bctx.pool.acquire() as conn:
            await conn.fetch(s.complete_sql, [r["org_id"] for r in batch],
                             [r["id"] for r in batch], [r["attempt"] for r in batch],
                             [None] * len(batch), wid)

    async def baseline_worker(k: int) -> None:
        wake = asyncio.Event()
        listener = await asyncpg.connect(bctx.settings.database_url)
        await listener.add_listener(WAKE_CHANNEL, lambda *_: wake.set())
        wid = f"raw-wake-{k}"
        args = {"worker_id": wid, "limit": BATCH, "lease_s": LEASE_S}
        try:
            while not stop.is_set():
                if s.side == "baseline":
                    wake.clear()
                    async with bctx.pool.acquire() as conn:
                        batch = await conn.fetch(s.claim_sql,
                                                 *(args[p] for p in s.claim_params))
                    if batch:
                        _resolve(s, batch, time.perf_counter())
                        later(complete_raw(wid, batch))
                        continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 1.0)
                wake.clear()
        finally:
            await listener.close()

    tasks = [asyncio.create_task(candidate_worker(k)) for k in range(WORKERS)]
    tasks += [asyncio.create_task(baseline_worker(k)) for k in range(WORKERS)]

    async def shutdown() -> None:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*finishing, return_exceptions=True)

    bctx.cleanup.push_async_callback(shutdown)
    await asyncio.sleep(0.2)  # LISTEN is set up
    return s


async def _await_claim(s: WakeState, side: str, token: str, fut: asyncio.Future[float],
                       t0: float) -> None:
    try:
        t1 = await asyncio.wait_for(fut, 5.0)
    except TimeoutError:
        s.pending.pop(token, None)
        raise RuntimeError("no worker claimed the execution within 5 s") from None
    s.latencies[side].append(max(0.0, t1 - t0))


async def _enqueue(b: BenchContext, s: WakeState, i: int) -> None:
    s.side = "candidate"
    token = f"c{i}"
    fut = asyncio.get_running_loop().create_future()
    s.pending[token] = fut
    async with b.dl.session(s.t.owner) as db:
        await db.executions.enqueue(s.t.workflow_id, input={"token": token})
    t0 = time.perf_counter()  # committed (the NOTIFY went out with the COMMIT)
    await _await_claim(s, "candidate", token, fut, t0)


async def _enqueue_raw(b: BenchContext, s: WakeState, i: int) -> None:
    s.side = "baseline"
    token = f"b{i}"
    fut = asyncio.get_running_loop().create_future()
    s.pending[token] = fut
    args: dict[str, object] = {
        "workflow_id": s.t.workflow_id, "input": {"token": token}, "trigger": "manual",
        "trigger_payload": None, "priority": 0, "scheduled_at": None, "timeout_ms": None,
        "max_attempts": None, "version": None, "org_id": s.t.org_id}
    async with b.pool.acquire() as conn:
        await conn.fetchrow(s.enqueue_sql, *(args[p] for p in s.enqueue_params))
        t0 = time.perf_counter()  # autocommit: committed when the row came back
    await _await_claim(s, "baseline", token, fut, t0)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


async def _wake_extra(b: BenchContext, s: WakeState) -> dict[str, Any]:
    c, r = s.latencies["candidate"], s.latencies["baseline"]
    s.latencies = {"candidate": [], "baseline": []}
    s.side = "off"  # both sides' workers stand still until the next operation
    return {"claim_p50_ms": _pct(c, 0.5), "claim_p99_ms": _pct(c, 0.99),
            "baseline_claim_p50_ms": _pct(r, 0.5), "baseline_claim_p99_ms": _pct(r, 0.99),
            "idle_workers": WORKERS, "p99_target_ms": 10.0}


# -- timeline -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TimelineState:
    t: BenchTenant
    execution_id: uuid.UUID
    sql: str
    params: tuple[str, ...]
    rows: int


async def _timeline_setup(bctx: BenchContext) -> TimelineState:
    t = await _tenant(bctx)
    dl = bctx.dl
    async with dl.session(t.owner) as db:
        e = await db.executions.enqueue(t.workflow_id, priority=1000)
    claimed: Execution | None = None
    async with dl.system() as db:  # priority 1000: it is first in the queue
        for c in await db.executions.claim("bench-timeline", limit=1):
            if c.id == e.id:
                claimed = c
            else:
                await db.executions.complete(c)
    if claimed is None:
        raise RuntimeError("could not claim the timeline's execution")
    start = claimed.started_at or datetime.now(UTC)
    nodes = [(t.org_id, uuid.uuid4(), e.id, f"n{k}", f"Node {k}", "code", "succeeded", {"k": k},
              {"ok": True}, None, 1, start + timedelta(milliseconds=k),
              start + timedelta(milliseconds=k + 1), start) for k in range(NODES)]
    async with dl.system() as db:
        await db.copy("executions.copy_nodes", nodes)
        await db.executions.complete(claimed)
        await db.connection.execute("ANALYZE node_executions")
    sql = dl.registry["executions.timeline"]
    state = TimelineState(t, e.id, sql.sql, sql.params, NODES + 4)
    async with dl.session(t.owner, readonly=True) as db:
        got = len(await db.executions.timeline(e.id))
    if got != state.rows:
        raise RuntimeError(f"timeline has {got} entries, expected {state.rows}")
    return state


async def _timeline(b: BenchContext, s: TimelineState, i: int) -> None:
    async with b.dl.session(s.t.owner, readonly=True) as db:
        await db.executions.timeline(s.execution_id)


async def _timeline_raw(b: BenchContext, s: TimelineState, i: int) -> None:
    args = {"execution_id": s.execution_id, "org_id": s.t.org_id}
    async with b.pool.acquire() as conn:
        await conn.fetch(s.sql, *(args[p] for p in s.params))


async def _timeline_extra(b: BenchContext, s: TimelineState) -> dict[str, Any]:
    return {"node_executions": NODES, "p99_target_ms": 10.0}


SCENARIOS: list[Scenario] = [
    Scenario("executions.claim_complete", _claim_setup, _claim_cycle, _claim_cycle_raw,
             extra=_claim_extra,
             description=f"{WORKERS} workers: claim {BATCH}, heartbeat, complete (system)"),
    Scenario("executions.enqueue_to_claim", _wake_setup, _enqueue, _enqueue_raw,
             extra=_wake_extra,
             description=f"enqueue one; {WORKERS} idle LISTEN workers claim it"),
    Scenario("executions.timeline", _timeline_setup, _timeline, _timeline_raw,
             extra=_timeline_extra,
             description=f"timeline of an execution with {NODES} node executions"),
]
