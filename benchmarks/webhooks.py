"""Webhook scenarios: event ingest (one and bulk) and the processing queue.

* ``webhooks.ingest_one``: one operation stores one event (a new idempotency key) through
  ``db.webhooks.ingest`` in ``dl.system()`` (routing already done); the baseline runs the
  same statement in a transaction on raw asyncpg. Target p99 < 2 ms.
* ``webhooks.ingest_bulk``: one operation stores ``BULK`` (1,000) events of one webhook in
  one statement (``db.webhooks.ingest_many``, unnest; a tenth of the keys repeat inside the
  batch). ``events_per_s`` counts the events offered per second of busy time; target
  >= 50,000/s.
* ``webhooks.claim_process``: one operation claims ``BATCH`` (50) due events, enqueues one
  execution per event (``trigger='webhook'``) and marks the batch processed in one
  statement, all in one ``dl.system()`` transaction; ``events_per_s`` is what was
  processed per second of busy time. The queue is filled by bulk ingest (untimed).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from datalayer.repos.webhooks import Incoming

from .core import owned_org
from .harness import BenchContext, Scenario, throughput

__all__ = ["SCENARIOS"]

BULK = 1000
BATCH = 50
QUEUE_FILL = 60_000


@dataclass(frozen=True, slots=True)
class BenchHook:
    org_id: uuid.UUID
    workflow_id: uuid.UUID
    webhook_id: uuid.UUID


async def _hook(bctx: BenchContext, tag: str) -> BenchHook:
    """A fresh organization, workflow and webhook (one per scenario: their queues and
    idempotency keys stay apart)."""
    dl = bctx.dl
    made = await owned_org(bctx, "webhooks")
    org, owner = made.org_id, made.ctx
    async with dl.session(owner) as db:
        wf = await db.workflows.create("bench", nodes=[{"id": "a", "type": "code"}])
        hook = await db.webhooks.create(wf.id, name=tag)

    async def purge() -> None:  # leave no backlog behind for other benchmarks' workers
        async with dl.system() as db:
            await db.connection.execute("DELETE FROM webhook_events WHERE org_id = $1", org)
            await db.connection.execute(
                "DELETE FROM executions WHERE org_id = $1 AND status = 'queued'", org)

    bctx.cleanup.push_async_callback(purge)
    return BenchHook(org, wf.id, hook.webhook.id)


_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer x",
            "User-Agent": "bench"}
_PAYLOAD = {"type": "order.created", "order": {"id": 12345, "total": 99.5,
                                               "items": [{"sku": "A1", "qty": 2}]}}


# -- ingest one -------------------------------------------------------------------------------

@dataclass
class OneState:
    hook: BenchHook
    sql: str
    params: tuple[str, ...]
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])


async def _one_setup(bctx: BenchContext) -> OneState:
    q = bctx.dl.registry["webhooks.ingest"]
    return OneState(await _hook(bctx, "one"), q.sql, q.params)


async def _ingest_one(b: BenchContext, s: OneState, i: int) -> None:
    async with b.dl.system() as db:
        await db.webhooks.ingest(s.hook.webhook_id, org_id=s.hook.org_id,
                                 idempotency_key=f"c-{s.run}-{i}", event_type="order.created",
                                 payload=_PAYLOAD, headers=_HEADERS, source_ip="198.51.100.7")


async def _ingest_one_raw(b: BenchContext, s: OneState, i: int) -> None:
    from datalayer.repos.webhooks import redact_headers

    args: dict[str, Any] = {
        "org_id": s.hook.org_id, "webhook_id": s.hook.webhook_id,
        "idempotency_key": f"b-{s.run}-{i}", "event_type": "order.created",
        "payload": _PAYLOAD, "headers": redact_headers(_HEADERS), "source_ip": "198.51.100.7"}
    async with b.pool.acquire() as conn, conn.transaction():
        await conn.fetchrow(s.sql, *(args[p] for p in s.params))


async def _one_extra(b: BenchContext, s: OneState) -> dict[str, Any]:
    return {"p99_target_ms": 2.0}


# -- ingest bulk ------------------------------------------------------------------------------

@dataclass
class BulkState:
    hook: BenchHook
    sql: str
    params: tuple[str, ...]
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    spans: dict[str, list[tuple[float, float, int]]] = field(
        default_factory=lambda: {"candidate": [], "baseline": []})


def _batch(prefix: str) -> list[Incoming]:
    # A tenth of the keys repeat inside the batch (a retrying sender): stored once.
    return [Incoming(f"{prefix}-{k - k % 2 if k % 10 == 1 else k}", _PAYLOAD, "order.created",
                     _HEADERS, "198.51.100.7") for k in range(BULK)]


async def _bulk_setup(bctx: BenchContext) -> BulkState:
    q = bctx.dl.registry["webhooks.ingest_many"]
    return BulkState(await _hook(bctx, "bulk"), q.sql, q.params)


async def _ingest_bulk(b: BenchContext, s: BulkState, i: int) -> None:
    events = _batch(f"c-{s.run}-{i}")
    t0 = time.perf_counter()
    async with b.dl.system() as db:
        await db.webhooks.ingest_many(s.hook.webhook_id, events, org_id=s.hook.org_id)
    s.spans["candidate"].append((t0, time.perf_counter(), len(events)))


async def _ingest_bulk_raw(b: BenchContext, s: BulkState, i: int) -> None:
    from datalayer.repos.webhooks import redact_headers

    events = _batch(f"b-{s.run}-{i}")
    t0 = time.perf_counter()
    args: dict[str, Any] = {
        "org_id": s.hook.org_id, "webhook_id": s.hook.webhook_id,
        "idempotency_keys": [e.idempotency_key for e in events],
        "event_types": [e.event_type for e in events],
        "payloads": [e.payload for e in events],
        "headers": [redact_headers(e.headers) for e in events],
        "source_ips": [e.source_ip for e in events]}
    async with b.pool.acquire() as conn, conn.transaction():
        await conn.fetchval(s.sql, *(args[p] for p in s.params))
    s.spans["baseline"].append((t0, time.perf_counter(), len(events)))


async def _bulk_extra(b: BenchContext, s: BulkState) -> dict[str, Any]:
    out = {"batch": BULK, "events_per_s": throughput(s.spans["candidate"]),
           "baseline_events_per_s": throughput(s.spans["baseline"]),
           "target_events_per_s": 50_000.0}
    s.spans = {"candidate": [], "baseline": []}
    return out


# -- claim and process ------------------------------------------------------------------------

@dataclass
class ProcessState:
    hook: BenchHook
    claim_sql: str
    claim_params: tuple[str, ...]
    enqueue_sql: str
    enqueue_params: tuple[str, ...]
    mark_sql: str
    mark_params: tuple[str, ...]
    filled: int = 0
    spans: dict[str, list[tuple[float, float, int]]] = field(
        default_factory=lambda: {"candidate": [], "baseline": []})


async def _fill(b: BenchContext, s: ProcessState, n: int) -> None:
    async with b.dl.system() as db:
        for start in range(0, n, 5000):
            events = [Incoming(f"q-{s.filled + k}", _PAYLOAD, "order.created", _HEADERS)
                      for k in range(start, min(n, start + 5000))]
            await db.webhooks.ingest_many(s.hook.webhook_id, events, org_id=s.hook.org_id)
    s.filled += n
    async with b.dl.system() as db:
        await db.connection.execute("ANALYZE webhook_events")


async def _process_setup(bctx: BenchContext) -> ProcessState:
    reg = bctx.dl.registry
    c, e, m = (reg["webhooks.claim"], reg["executions.enqueue"],
               reg["webhooks.mark_processed_many"])
    s = ProcessState(await _hook(bctx, "process"), c.sql, c.params, e.sql, e.params, m.sql,
                     m.params)
    await _fill(bctx, s, QUEUE_FILL)
    return s


async def _process(b: BenchContext, s: ProcessState, i: int) -> None:
    wid = f"bench-{i}"
    t0 = time.perf_counter()
    async with b.dl.system() as db:
        batch = await db.webhooks.claim(wid, limit=BATCH, org_id=s.hook.org_id)
        if not batch:
            raise RuntimeError("the webhook queue ran dry: lower --duration")
        ids = []
        for ev in batch:
            ex = await db.executions.enqueue(
                ev.workflow_id, trigger="webhook", input=ev.payload, org_id=ev.org_id,
                trigger_payload={"webhook_id": str(ev.webhook_id), "event_id": str(ev.id)})
            ids.append(ex.id)
        done = await db.webhooks.mark_processed_many(wid, batch, ids)
    s.spans["candidate"].append((t0, time.perf_counter(), len(done)))


async def _process_raw(b: BenchContext, s: ProcessState, i: int) -> None:
    wid = f"raw-{i}"
    t0 = time.perf_counter()
    async with b.pool.acquire() as conn, conn.transaction():
        ca = {"worker_id": wid, "limit": BATCH, "lease_s": 30.0, "org_id": s.hook.org_id}
        batch = await conn.fetch(s.claim_sql, *(ca[p] for p in s.claim_params))
        if not batch:
            raise RuntimeError("the webhook queue ran dry: lower --duration")
        ids = []
        for ev in batch:
            ea: dict[str, Any] = {
                "workflow_id": ev["workflow_id"], "input": ev["payload"], "trigger": "webhook",
                "trigger_payload": {"webhook_id": str(ev["webhook_id"]),
                                    "event_id": str(ev["id"])},
                "priority": 0, "scheduled_at": None, "timeout_ms": None, "max_attempts": None,
                "version": None, "org_id": ev["org_id"]}
            row = await conn.fetchrow(s.enqueue_sql, *(ea[p] for p in s.enqueue_params))
            assert row is not None
            ids.append(row["id"])
        ma: dict[str, Any] = {"worker_id": wid, "org_ids": [r["org_id"] for r in batch],
                              "ids": [r["id"] for r in batch],
                              "attempts": [r["attempts"] for r in batch], "execution_ids": ids}
        done = await conn.fetch(s.mark_sql, *(ma[p] for p in s.mark_params))
    s.spans["baseline"].append((t0, time.perf_counter(), len(done)))


async def _process_extra(b: BenchContext, s: ProcessState) -> dict[str, Any]:
    used = sum(n for side in s.spans.values() for _, _, n in side)
    out = {"batch": BATCH, "events_per_s": throughput(s.spans["candidate"]),
           "baseline_events_per_s": throughput(s.spans["baseline"])}
    s.spans = {"candidate": [], "baseline": []}
    await _fill(b, s, min(max(used, QUEUE_FILL // 4), 4 * QUEUE_FILL))  # untimed
    return out


SCENARIOS: list[Scenario] = [
    Scenario("webhooks.ingest_one", _one_setup, _ingest_one, _ingest_one_raw,
             extra=_one_extra, description="store one event (new key), system session"),
    Scenario("webhooks.ingest_bulk", _bulk_setup, _ingest_bulk, _ingest_bulk_raw,
             extra=_bulk_extra,
             description=f"store {BULK} events of one webhook in one statement"),
    Scenario("webhooks.claim_process", _process_setup, _process, _process_raw,
             extra=_process_extra,
             description=f"claim {BATCH}, enqueue an execution each, mark processed"),
]
