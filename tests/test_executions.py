"""Executions: the state machine in SQL, the work queue under real concurrency, leases and
the reaper, retries, snapshots and recovery, timeline and tree, partitions, live status."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from datalayer import (
    Conflict,
    Context,
    DataLayer,
    NotFound,
    PermissionDenied,
    Unavailable,
    ValidationError,
)
from datalayer.live import LiveStatus, StatusUpdate
from datalayer.queue import Worker
from datalayer.repos.executions import STATUSES, Execution, LeaseLost
from datalayer.repos.workflows import Workflow
from tests.conftest import MemberFactory, Tenant, TenantFactory, make_layer, make_settings

TEST_QUERIES = Path(__file__).parent / "queries"


@pytest.fixture
async def tenant(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant("Executions")


async def new_workflow(dl: DataLayer, tenant: Tenant, **settings: Any) -> Workflow:
    async with dl.session(tenant.owner) as db:
        return await db.workflows.create(
            f"wf {uuid.uuid4().hex[:8]}", settings=settings,
            nodes=[{"id": "a", "type": "http"}, {"id": "b", "type": "code"}],
            edges=[{"source": "a", "target": "b"}])


@pytest.fixture
async def workflow(dl: DataLayer, tenant: Tenant) -> Workflow:
    return await new_workflow(dl, tenant)


async def enqueue_many(dl: DataLayer, tenant: Tenant, workflow: Workflow, n: int,
                       **kw: Any) -> list[Execution]:
    async with dl.session(tenant.owner) as db:
        return [await db.executions.enqueue(workflow.id, input={"i": i}, **kw)
                for i in range(n)]


async def claim_mine(dl: DataLayer, worker_id: str, mine: set[uuid.UUID], *,
                     lease_s: float = 30.0) -> list[Execution]:
    """Claim from the shared queue until every execution of ``mine`` is claimed (other
    tests' leftovers that come along are completed on the spot)."""
    got: list[Execution] = []
    for _ in range(50):
        async with dl.system() as db:
            batch = await db.executions.claim(worker_id, limit=100, lease_s=lease_s)
            others = [e for e in batch if e.id not in mine]
            if others:
                await db.executions.complete_many(worker_id, others)
        got += [e for e in batch if e.id in mine]
        if {e.id for e in got} >= mine:
            return got
        await asyncio.sleep(0.01)
    raise AssertionError("could not claim the test's executions")


async def worker_claim_mine(w: Worker, mine: set[uuid.UUID]) -> list[Execution]:
    """``claim_mine`` through a Worker (which then holds them)."""
    got: list[Execution] = []
    for _ in range(50):
        for e in await w.claim(100):
            if e.id in mine:
                got.append(e)
            else:
                await w.complete(e)
        if {e.id for e in got} >= mine:
            return got
        await asyncio.sleep(0.01)
    raise AssertionError("could not claim the test's executions")


# -- the state machine ----------------------------------------------------------------------------

ALLOWED = {
    ("queued", "running"), ("queued", "cancelled"),
    ("running", "succeeded"), ("running", "failed"), ("running", "cancelled"),
    ("running", "timed_out"), ("running", "waiting"), ("running", "queued"),
    ("waiting", "queued"), ("waiting", "cancelled"), ("waiting", "timed_out"),
    ("waiting", "failed"),
}


async def test_transition_table_is_the_documented_state_machine(
    admin_conn: asyncpg.Connection,
) -> None:
    rows = await admin_conn.fetch(
        "SELECT f, t FROM unnest($1::text[]) f, unnest($1::text[]) t "
        "WHERE app.execution_transition_allowed(f, t)", list(STATUSES))
    assert {(r["f"], r["t"]) for r in rows} == ALLOWED


async def test_illegal_transition_is_refused_by_sql_even_through_a_raw_update(
    dl: DataLayer, tenant: Tenant, workflow: Workflow, admin_conn: asyncpg.Connection,
) -> None:
    """The rule is in the database: a raw UPDATE through the registry (db.run), or even as
    the superuser, cannot move an execution along a transition the machine does not have."""
    (e,) = await enqueue_many(dl, tenant, workflow, 1)
    async with DataLayer(dl.settings, extra_queries=[TEST_QUERIES]) as layer:
        with pytest.raises(ValidationError, match="from queued to succeeded"):
            async with layer.session(tenant.owner) as db:
                await db.run("executions_raw.set_status", id=e.id, status="succeeded")
        async with layer.session(tenant.owner) as db:
            assert await db.run("executions_raw.set_status", id=e.id, status="cancelled") == 1
        for target in ("running", "queued", "waiting", "succeeded"):
            with pytest.raises(ValidationError) as info:
                async with layer.session(tenant.owner) as db:
                    await db.run("executions_raw.set_status", id=e.id, status=target)
            assert f"from cancelled to {target}" in str(info.value)
            assert info.value.constraint == "executions_status_transition"
    with pytest.raises(asyncpg.CheckViolationError, match="from cancelled to running"):
        await admin_conn.execute("UPDATE executions SET status = 'running', worker_id = 'x', "
                                 "lease_expires_at = now() WHERE org_id = $1 AND id = $2",
                                 e.org_id, e.id)
    async with dl.session(tenant.owner, readonly=True) as db:
        got = await db.executions.get(e.id)
        history = await db.executions.transitions(e.id)
    assert got is not None and got.status == "cancelled"
    assert [(t.from_status, t.to_status) for t in history] == [(None, "queued"),
                                                               ("queued", "cancelled")]
    assert history[1].actor_id == tenant.owner_id


async def test_tenant_sessions_insert_only_queued_executions(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    """A tenant cannot forge history: the status (and the columns the triggers own) are not
    insertable at all, and the guard refuses anything but queued from non-maintenance roles."""
    async with dl.session(tenant.owner) as db:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with db.savepoint():
                await db.connection.execute(
                    "INSERT INTO executions (org_id, workflow_id, workflow_version, status) "
                    "VALUES ($1, $2, 1, 'succeeded')", tenant.org_id, workflow.id)


async def test_enqueue_get_list_and_who_may(
    dl: DataLayer, tenant: Tenant, workflow: Workflow, add_member: MemberFactory,
    make_tenant: TenantFactory,
) -> None:
    created = await enqueue_many(dl, tenant, workflow, 3, priority=5)
    e = created[0]
    assert (e.status, e.attempt, e.max_attempts, e.auto_retry) == ("queued", 1, 3, False)
    assert e.workflow_version == workflow.current_version
    assert e.root_execution_id == e.id and e.created_by == tenant.owner_id
    assert e.input == {"i": 0} and e.trigger == "manual"
    viewer = await add_member(tenant, "viewer")
    async with dl.session(viewer, readonly=True) as db:
        newest = [x.id for x in sorted(created, key=lambda x: (x.created_at, x.id),
                                       reverse=True)]
        page = await db.executions.list(limit=2)
        assert [x.id for x in page.items] == newest[:2]
        assert page.next is not None
        rest = await db.executions.list(before=page.next, limit=2)
        assert [x.id for x in rest.items] == newest[2:]
        by_wf = await db.executions.list(workflow_id=workflow.id, statuses=["queued"])
        assert len(by_wf.items) == 3
    with pytest.raises(PermissionDenied):
        async with dl.session(viewer) as db:
            await db.executions.enqueue(workflow.id)
    with pytest.raises(NotFound):
        async with dl.session(viewer) as db:
            await db.executions.cancel(e.id)
    other = await make_tenant("Other")
    async with dl.session(other.owner) as db:
        assert await db.executions.get(e.id) is None
        with pytest.raises(NotFound):
            await db.executions.enqueue(workflow.id)
        with pytest.raises(NotFound):
            await db.executions.cancel(e.id)
        assert await db.executions.timeline(e.id) == []


# -- the work queue -------------------------------------------------------------------------------

async def test_64_concurrent_claimers_never_share_and_drain_exactly_once(
    dl: DataLayer, tenant: Tenant, workflow: Workflow, admin_conn: asyncpg.Connection,
) -> None:
    """64 claimers, each on its own connection, claim small batches at the same time: no
    execution is handed out twice, and together they drain the queue, each exactly once."""
    n = 640
    async with dl.system() as db:
        now = datetime.now(UTC)
        rows: list[tuple[Any, ...]] = [
            (tenant.org_id, uuid.uuid4(), workflow.id, workflow.current_version, "manual", {},
             {"i": i}, None, None, "queued", i % 3, 1, 3, None, now, None, None, None, None, now)
            for i in range(n)]
        await db.copy("executions.copy_rows", rows)
    mine = {r[1] for r in rows}
    claimers = 64
    layer = make_layer(make_settings(dl.settings.database_url, pool_min_size=claimers,
                                     pool_max_size=claimers, migrate_on_start=False))
    for _ in range(40):  # other suites may share the server: wait for 64 free connections
        try:
            await layer.start()
            break
        except Unavailable:
            await asyncio.sleep(0.25)
    try:
        go = asyncio.Event()
        received: list[list[uuid.UUID]] = [[] for _ in range(claimers)]

        async def claimer(k: int) -> None:
            await go.wait()
            while True:
                async with layer.system() as db:
                    batch = await db.executions.claim(f"claimer-{k}", limit=3)
                    if batch:
                        await db.executions.complete_many(f"claimer-{k}", batch)
                if not batch:
                    return
                received[k] += [e.id for e in batch]

        tasks = [asyncio.create_task(claimer(k)) for k in range(claimers)]
        backends = await admin_conn.fetchval(
            "SELECT count(DISTINCT pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'datalayer'")
        go.set()
        await asyncio.gather(*tasks)
    finally:
        await layer.close()
    assert backends >= claimers
    everything = [i for r in received for i in r]
    counts = Counter(everything)
    assert not [i for i, c in counts.items() if c > 1], "an execution was handed out twice"
    assert mine <= set(counts)
    assert sum(1 for r in received if r) > 8, "the claimers did not actually run concurrently"
    stats = await admin_conn.fetch(
        "SELECT e.status, count(*) AS n, "
        "       sum((SELECT count(*) FROM execution_transitions t WHERE t.org_id = e.org_id "
        "            AND t.execution_id = e.id AND t.to_status = 'running')) AS claims "
        "FROM executions e WHERE e.org_id = $1 AND e.id = ANY($2::uuid[]) GROUP BY 1",
        tenant.org_id, list(mine))
    assert [(r["status"], r["n"], r["claims"]) for r in stats] == [("succeeded", n, n)]


async def test_claim_order_and_plan_use_the_queue_index(
    dl: DataLayer, tenant: Tenant, workflow: Workflow, admin_conn: asyncpg.Connection,
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    low = await enqueue_many(dl, tenant, workflow, 2, priority=-5)
    high = await enqueue_many(dl, tenant, workflow, 1, priority=7)
    future = await enqueue_many(dl, tenant, workflow, 1, priority=9, scheduled_at=later)
    got = await claim_mine(dl, "order", {e.id for e in low + high})
    assert [e.id for e in got] == [high[0].id, low[0].id, low[1].id]
    assert all(e.status == "running" and e.worker_id == "order" for e in got)
    async with dl.session(tenant.owner) as db:
        assert (await db.executions.cancel(future[0].id)).status == "cancelled"
    sql = dl.registry["executions.claim"].sql
    plan = await admin_conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, "w", 10, 30.0)
    assert "executions_queue_idx" in str(plan)


async def test_dead_worker_loses_its_executions_within_two_leases_and_none_run_twice(
    dl: DataLayer, tenant: Tenant, workflow: Workflow, admin_conn: asyncpg.Connection,
) -> None:
    """Worker 1 claims a batch and dies (no heartbeats). Worker 2 reaps and runs every one of
    them within two lease periods; worker 1 coming back cannot finish any; each execution
    succeeded exactly once."""
    lease = 1.0
    created = await enqueue_many(dl, tenant, workflow, 12)
    mine = {e.id for e in created}
    w1 = Worker(dl, "dying", lease_s=lease, maintain_partitions=False)
    await w1.start()
    held = await worker_claim_mine(w1, mine)
    assert {e.id for e in w1.held} >= mine
    claimed_at = time.monotonic()
    await w1.abort()
    taken: dict[uuid.UUID, Execution] = {}
    async with Worker(dl, "survivor", lease_s=lease, poll_interval_s=5.0,
                      maintain_partitions=False) as w2:
        while set(taken) < mine and time.monotonic() - claimed_at < 10:
            for e in await w2.next_batch(timeout_s=0.2):
                if e.id in mine:
                    assert e.id not in taken, "handed out twice"
                    taken[e.id] = e
                else:
                    await w2.complete(e)
        elapsed = time.monotonic() - claimed_at
        assert set(taken) == mine
        assert elapsed < 2 * lease, f"took {elapsed:.2f}s to recover"
        assert all(e.attempt == 2 and e.worker_id == "survivor" for e in taken.values())
        await asyncio.sleep(lease * 0.6)  # the survivor's heartbeats keep its leases alive
        assert {e.id for e in w2.held} >= mine
        for e in taken.values():
            assert await w2.complete(e, {"ok": True})
    async with dl.system() as db:  # the dead worker comes back: too late for everything
        for e in held:
            assert await db.executions.complete(e, output={"zombie": True}) is None
            with pytest.raises(LeaseLost):
                await db.executions.checkpoint(e, {"zombie": True})
    rows = await admin_conn.fetch(
        "SELECT e.id, e.status, e.output, e.attempt, array_agg(t.to_status || ':' || "
        "coalesce(t.worker_id, '') ORDER BY t.created_at, t.id) AS history "
        "FROM executions e JOIN execution_transitions t ON t.org_id = e.org_id "
        "AND t.execution_id = e.id WHERE e.org_id = $1 GROUP BY 1, 2, 3, 4", tenant.org_id)
    assert len(rows) == len(mine)
    for r in rows:
        assert (r["status"], r["output"], r["attempt"]) == ("succeeded", '{"ok": true}', 2)
        assert r["history"] == ["queued:", "running:dying", "queued:dying",
                                "running:survivor", "succeeded:survivor"]


async def test_reaper_fails_after_the_last_attempt(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    (e,) = await enqueue_many(dl, tenant, workflow, 1, max_attempts=1)
    await claim_mine(dl, "gone", {e.id}, lease_s=0.05)
    await asyncio.sleep(0.1)
    async with dl.system() as db:
        reaped = {x.id: x for x in await db.executions.reap(limit=1000)}
    assert reaped[e.id].status == "failed"
    assert "last attempt" in (reaped[e.id].error or {})["message"]
    assert reaped[e.id].status_reason == "lease expired (worker gone)"


async def test_worker_wakes_on_notify_without_polling(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    async with Worker(dl, "waiter", poll_interval_s=30.0, maintain_partitions=False,
                      reap=False) as w:
        # Empty the queue of anything due from earlier tests first.
        while batch := await w.claim(100):
            for e in batch:
                await w.complete(e)
        waiting = asyncio.create_task(w.next_batch())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        started = time.monotonic()
        (e,) = await enqueue_many(dl, tenant, workflow, 1)
        batch = await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started < 2.0, "woken by the poll, not by NOTIFY"
        assert [x.id for x in batch] == [e.id]
        await w.complete(batch[0])


async def test_worker_run_completes_and_fails_through_the_handler(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    created = await enqueue_many(dl, tenant, workflow, 6)
    mine = {e.id for e in created}
    done: set[uuid.UUID] = set()
    stop = asyncio.Event()

    async def handler(e: Execution) -> Any:
        if e.id in mine:
            done.add(e.id)
        if len(done) == len(mine):
            stop.set()
        if e.input.get("i") == 0:
            raise RuntimeError("node a exploded")
        return {"doubled": 2 * e.input.get("i", 0)}

    async with Worker(dl, "runner", poll_interval_s=0.1, maintain_partitions=False) as w:
        await asyncio.wait_for(w.run(handler, concurrency=3, stop=stop), 10)
    async with dl.session(tenant.owner, readonly=True) as db:
        result = {e.input["i"]: e for e in (await db.executions.list()).items}
    assert result[0].status == "failed"
    assert result[0].error == {"message": "node a exploded", "type": "RuntimeError"}
    assert all(result[i].status == "succeeded" and result[i].output == {"doubled": 2 * i}
               for i in range(1, 6))


async def test_cancel_queued_running_and_waiting(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    running, waiting = await enqueue_many(dl, tenant, workflow, 2)
    claimed = {e.id: e for e in await claim_mine(dl, "c", {running.id, waiting.id})}
    (queued,) = await enqueue_many(dl, tenant, workflow, 1)
    async with dl.system() as db:
        assert await db.executions.wait(claimed[waiting.id], reason="approval") is not None
    async with dl.session(tenant.owner) as db:
        for e in (queued, running, waiting):
            got = await db.executions.cancel(e.id, reason="user asked")
            assert got.status == "cancelled" and got.finished_at is not None
            assert got.status_reason == "user asked"
    with pytest.raises(ValidationError, match=r"finished execution cannot change \(it is "
                                              r"cancelled\)"):
        async with dl.session(tenant.owner) as db:
            await db.executions.cancel(queued.id)
    async with dl.system() as db:
        assert running.id not in {x.id for x in await db.executions.heartbeat("c")}
        assert await db.executions.complete(claimed[running.id]) is None
    async with dl.session(tenant.owner, readonly=True) as db:
        history = await db.executions.transitions(waiting.id)
    assert [t.to_status for t in history] == ["queued", "running", "waiting", "cancelled"]
    assert history[2].reason == "approval" and history[3].actor_id == tenant.owner_id


async def test_finished_execution_cannot_be_cancelled_and_names_both_states(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    (e,) = await enqueue_many(dl, tenant, workflow, 1)
    (c,) = await claim_mine(dl, "fin", {e.id})
    async with dl.system() as db:
        assert (await db.executions.complete(c, output=1)) is not None
    with pytest.raises(ValidationError, match="from succeeded to cancelled"):
        async with dl.session(tenant.owner) as db:
            await db.executions.cancel(e.id)


async def test_waiting_resume_and_deadline(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    (e,) = await enqueue_many(dl, tenant, workflow, 1)
    (timed,) = await enqueue_many(dl, tenant, workflow, 1, timeout_s=0.2)
    claimed = {x.id: x for x in await claim_mine(dl, "w", {e.id, timed.id})}
    assert claimed[timed.id].deadline_at is not None
    async with dl.system() as db:
        await db.executions.wait(claimed[e.id], reason="webhook")
    async with dl.session(tenant.owner) as db:
        resumed = await db.executions.resume(e.id, reason="webhook arrived")
        assert (resumed.status, resumed.attempt) == ("queued", 1)
        with pytest.raises(ValidationError, match="only a waiting execution"):
            await db.executions.resume(e.id)
    (again,) = await claim_mine(dl, "w2", {e.id})
    assert again.started_at == claimed[e.id].started_at  # first start is kept
    await asyncio.sleep(0.3)
    async with dl.system() as db:
        reaped = {x.id: x for x in await db.executions.reap(limit=1000)}
        await db.executions.complete(again)
    assert reaped[timed.id].status == "timed_out"


# -- retries --------------------------------------------------------------------------------------

async def test_retry_is_a_new_linked_attempt_refused_past_max_attempts(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    (e,) = await enqueue_many(dl, tenant, workflow, 1, max_attempts=2)
    (c,) = await claim_mine(dl, "r", {e.id})
    async with dl.system() as db:
        failed = await db.executions.fail(c, error="boom")
    assert failed is not None and failed.error == {"message": "boom"}
    async with dl.session(tenant.owner) as db:
        second = await db.executions.retry(e.id)
        assert (second.attempt, second.retry_of, second.status) == (2, e.id, "queued")
        assert second.input == e.input and second.status_reason == "retry 2 of 2"
        with pytest.raises(Conflict):
            async with db.savepoint():
                await db.executions.retry(e.id)
        with pytest.raises(ValidationError, match="only a failed"):
            await db.executions.retry(second.id)
    (c2,) = await claim_mine(dl, "r", {second.id})
    async with dl.system() as db:
        await db.executions.fail(c2, error={"message": "boom again", "node": "b"})
    with pytest.raises(ValidationError, match="all 2 of its attempts"):
        async with dl.session(tenant.owner) as db:
            await db.executions.retry(second.id)


async def test_automatic_retry_with_exponential_backoff_and_jitter(
    dl: DataLayer, tenant: Tenant, admin_conn: asyncpg.Connection,
) -> None:
    wf = await new_workflow(dl, tenant,
                            retry={"enabled": True, "max_attempts": 3, "base_delay_ms": 400})
    (e,) = await enqueue_many(dl, tenant, wf, 1)
    assert (e.auto_retry, e.max_attempts, e.retry_delay_ms) == (True, 3, 400)
    (c,) = await claim_mine(dl, "auto", {e.id})
    async with dl.system() as db:
        failed = await db.executions.fail(c, error="flaky")
    assert failed is not None
    nxt = await admin_conn.fetchrow(
        "SELECT id, attempt, scheduled_at, status, status_reason FROM executions "
        "WHERE org_id = $1 AND retry_of = $2", tenant.org_id, e.id)
    assert nxt is not None
    assert (nxt["attempt"], nxt["status"]) == (2, "queued")
    assert nxt["status_reason"] == "automatic retry 2 of 3"
    assert failed.finished_at is not None
    delay = (nxt["scheduled_at"] - failed.finished_at).total_seconds()
    assert 0.2 - 0.01 <= delay <= 0.4 + 0.05
    # The schedule: base * 2^(attempt-1), in the upper half (equal jitter), never equal.
    samples = await admin_conn.fetch(
        "SELECT a, extract(epoch FROM app.execution_retry_delay(1000, a)) AS s "
        "FROM generate_series(1, 4) a, generate_series(1, 50)")
    for a in range(1, 5):
        got = [float(r["s"]) for r in samples if r["a"] == a]
        full = 2 ** (a - 1)
        assert all(full / 2 <= s <= full for s in got), (a, min(got), max(got))
        assert len(set(got)) > 40
    capped = await admin_conn.fetchval(
        "SELECT extract(epoch FROM app.execution_retry_delay(3600000, 30))")
    assert 1800 <= float(capped) <= 3600
    await asyncio.sleep(max(0.0, delay) + 0.05)
    (c2,) = await claim_mine(dl, "auto", {nxt["id"]})
    async with dl.system() as db:
        await db.executions.complete(c2)
    assert await admin_conn.fetchval(
        "SELECT count(*) FROM executions WHERE org_id = $1", tenant.org_id) == 2


# -- snapshots, nodes, timeline, tree -------------------------------------------------------------

async def test_checkpoint_and_recover_from_the_latest_snapshot(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    (e,) = await enqueue_many(dl, tenant, workflow, 1)
    (c,) = await claim_mine(dl, "crashy", {e.id}, lease_s=0.6)
    async with dl.system() as db:
        first = await db.executions.checkpoint(c, {"done": ["a"]}, reason="after a")
        second = await db.executions.checkpoint(c, {"done": ["a", "b"]}, reason="after b")
        with pytest.raises(Conflict):
            async with db.savepoint():
                await db.executions.checkpoint(c, {}, seq=2)
    async with dl.system() as db:
        stuck = await db.executions.start_node(c, "c", name="Interrupted")
    assert (first.seq, second.seq, second.attempt) == (1, 2, 1)
    async with dl.session(tenant.owner) as db:
        with pytest.raises(ValidationError, match="lease expired"):
            await db.executions.recover(e.id)
    await asyncio.sleep(0.7)
    async with dl.session(tenant.owner) as db:
        rec = await db.executions.recover(e.id)
    assert (rec.execution.status, rec.execution.attempt) == ("queued", 2)
    assert rec.snapshot is not None and rec.snapshot.state == {"done": ["a", "b"]}
    async with dl.session(tenant.owner, readonly=True) as db:  # the dead attempt's node
        (closed,) = [n for n in await db.executions.nodes(e.id) if n.id == stuck.id]
    assert closed.status == "cancelled" and closed.finished_at is not None
    assert closed.error == {"message": "the execution stopped running (queued)"}
    (again,) = await claim_mine(dl, "fresh", {e.id})
    async with dl.system() as db:
        latest = await db.executions.latest_snapshot(e.id, org_id=e.org_id)
        assert latest is not None and latest.seq == 2
        third = await db.executions.checkpoint(again, {"done": ["a", "b", "c"]})
        assert (third.seq, third.attempt) == (3, 2)
        with pytest.raises(LeaseLost):
            await db.executions.checkpoint(c, {"stale": True})
        await db.executions.complete(again)


async def test_nodes_and_timeline_in_order(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    (e,) = await enqueue_many(dl, tenant, workflow, 1)
    (c,) = await claim_mine(dl, "tl", {e.id})
    async with dl.system() as db:
        a = await db.executions.start_node(c, "a", name="Fetch", type="http", input={"u": 1})
        a = await db.executions.finish_node(c, a, output={"status": 200})
        b = await db.executions.start_node(c, "b", name="Transform", type="code")
        b = await db.executions.finish_node(c, b, status="failed", error="bad input")
        with pytest.raises(ValidationError, match="already finished"):
            await db.executions.finish_node(c, b)
        await db.executions.fail(c, error="node b failed")
    assert a.status == "succeeded" and a.duration_ms is not None and a.duration_ms >= 0
    assert b.error == {"message": "bad input"}
    async with dl.session(tenant.ctx("guest"), readonly=True) as db:
        timeline = await db.executions.timeline(e.id)
        nodes = await db.executions.nodes(e.id)
    assert [n.node_id for n in nodes] == ["a", "b"]
    assert [(t.kind, t.status, t.node_id) for t in timeline] == [
        ("execution", "failed", None),
        ("transition", "queued", None),
        ("transition", "running", None),
        ("node", "succeeded", "a"),
        ("node", "failed", "b"),
        ("transition", "failed", None),
    ]
    assert timeline[2].worker_id == "tl" and timeline[2].from_status == "queued"
    assert timeline[0].error == {"message": "node b failed"}
    async with dl.system() as db:
        with pytest.raises(LeaseLost):
            await db.executions.start_node(c, "c")


async def test_sub_workflow_tree(dl: DataLayer, tenant: Tenant, workflow: Workflow) -> None:
    (root,) = await enqueue_many(dl, tenant, workflow, 1)
    (r,) = await claim_mine(dl, "tree", {root.id})
    async with dl.system() as db:
        c1 = await db.executions.enqueue_child(r, workflow.id, node_id="a", input={"k": 1})
    async with dl.system() as db:  # its own transaction: siblings are ordered by creation
        c2 = await db.executions.enqueue_child(r, workflow.id, node_id="b")
    assert (c1.trigger, c1.parent_execution_id, c1.root_execution_id) == (
        "sub_workflow", root.id, root.id)
    assert c1.trigger_payload == {"parent_execution_id": str(root.id), "node_id": "a"}
    got = {x.id: x for x in await claim_mine(dl, "tree", {c1.id, c2.id})}
    async with dl.system() as db:
        g = await db.executions.enqueue_child(got[c1.id], workflow.id, node_id="x")
        for x in got.values():
            await db.executions.complete(x)
        with pytest.raises(NotFound):  # a finished parent starts nothing
            await db.executions.enqueue_child(got[c1.id], workflow.id, node_id="y")
    assert g.root_execution_id == root.id
    async with dl.session(tenant.owner, readonly=True) as db:
        tree = await db.executions.tree(root.id)
        sub = await db.executions.tree(c1.id)
    assert [(t.id, t.depth) for t in tree] == [(root.id, 0), (c1.id, 1), (g.id, 2),
                                               (c2.id, 1)]
    assert [(t.id, t.depth) for t in sub] == [(c1.id, 0), (g.id, 1)]
    assert tree[1].parent_execution_id == root.id


# -- partitions -----------------------------------------------------------------------------------

async def test_partitions_have_rls_and_are_maintained(
    dl: DataLayer, tenant: Tenant, workflow: Workflow, admin_conn: asyncpg.Connection,
) -> None:
    async def parts() -> dict[str, asyncpg.Record]:
        rows = await admin_conn.fetch(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, p.relname AS parent, "
            "       (SELECT count(*) FROM pg_policy WHERE polrelid = c.oid) AS policies, "
            "       (SELECT count(*) FROM pg_policy WHERE polrelid = p.oid) AS parent_policies, "
            "       has_table_privilege('datalayer_app', c.oid, 'SELECT') AS app_select "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent "
            "WHERE p.relname IN ('node_executions', 'execution_transitions')")
        return {r["relname"]: r for r in rows}

    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)

    def name(table: str, months: int) -> str:
        y, m = divmod(month.month - 1 + months, 12)
        return f"{table}_p{month.year + y}{m + 1:02d}"

    before = await parts()
    for table in ("node_executions", "execution_transitions"):
        assert {f"{table}_default", name(table, 0), name(table, 1)} <= set(before)
    # A node row far ahead of the created months lands in the default partition, and moves
    # into its month when that month is created.
    (e,) = await enqueue_many(dl, tenant, workflow, 1)
    ahead = month + timedelta(days=31 * 7 + 5)
    await admin_conn.execute(
        "INSERT INTO node_executions (org_id, execution_id, node_id, created_at, started_at) "
        "VALUES ($1, $2, 'later', $3, $3)", tenant.org_id, e.id, ahead)
    where = "SELECT tableoid::regclass::text FROM node_executions WHERE execution_id = $1"
    assert await admin_conn.fetchval(where, e.id) == "partitions.node_executions_default"
    async with dl.system() as db:
        created = [r["name"] for r in await db.many("partitions.ensure", months_ahead=9,
                                                    months_back=3)]
        assert await db.many("partitions.ensure", months_ahead=9, months_back=3) == []
    assert name("node_executions", 7) in created and name("node_executions", -3) in created
    assert await admin_conn.fetchval(where, e.id) == (
        f"partitions.node_executions_p{ahead:%Y%m}")
    after = await parts()
    for part, r in after.items():
        assert r["relrowsecurity"] and r["relforcerowsecurity"], part
        assert r["policies"] == r["parent_policies"] > 0, part
        assert not r["app_select"], part
    # Retention drops whole months before the cut-off, never the current one.
    async with dl.system() as db:
        dropped = [r["name"] for r in await db.many(
            "partitions.drop_before", before=(month - timedelta(days=40)).date())]
    assert name("node_executions", -3) in dropped
    assert name("node_executions", -1) not in dropped
    with pytest.raises(ValidationError, match="only months before the current one"):
        async with dl.system() as db:
            await db.many("partitions.drop_before", before=(month + timedelta(days=40)).date())
    assert name("node_executions", -3) not in await parts()
    with pytest.raises(PermissionDenied):
        async with dl.session(tenant.owner) as db:
            await db.many("partitions.ensure", months_ahead=1, months_back=0)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="schema partitions"):
        async with dl.session(tenant.owner) as db:
            await db.connection.fetch(f"SELECT * FROM partitions.{name('node_executions', 0)}")


# -- live status ----------------------------------------------------------------------------------

@pytest.fixture
async def redis_dl(dl: DataLayer, redis_url: str) -> AsyncIterator[DataLayer]:
    layer = make_layer(make_settings(dl.settings.database_url, redis_url=redis_url,
                                     pool_max_size=4, migrate_on_start=False))
    await layer.start()
    yield layer
    await layer.close()


async def _live_roundtrip(layer: DataLayer, live: LiveStatus, tenant: Tenant,
                          workflow: Workflow) -> list[StatusUpdate]:
    (e,) = await enqueue_many(layer, tenant, workflow, 1)
    one = await live.subscribe(tenant.ctx("viewer"), execution_id=e.id)
    every = await live.subscribe(tenant.owner, workflow_id=workflow.id)
    async with one, every:
        async with Worker(layer, "live", live=live, maintain_partitions=False) as w:
            (c,) = await worker_claim_mine(w, {e.id})
            await w.progress(c, 0.5, node_id="a")
            assert await w.complete(c, {"fine": True})
        got = [await one.get(timeout_s=5) for _ in range(3)]
        from_workflow = [await every.get(timeout_s=5) for _ in range(3)]
        assert await one.get(timeout_s=0.2) is None
    updates = [u for u in got if u is not None]
    expected = [("running", None, None), ("running", 0.5, "a"), ("succeeded", None, None)]
    assert [(u.status, u.progress, u.node_id) for u in updates] == expected
    assert [(u.status, u.progress, u.node_id) for u in from_workflow if u] == expected
    assert all(u.execution_id == e.id and u.workflow_id == workflow.id for u in updates)
    return updates


async def test_live_status_through_redis(
    redis_dl: DataLayer, tenant: Tenant, workflow: Workflow, redis_client: aioredis.Redis,
    redis_prefix: str, make_tenant: TenantFactory,
) -> None:
    live = LiveStatus(redis_dl, prefix=redis_prefix)
    updates = await _live_roundtrip(redis_dl, live, tenant, workflow)
    e_id = updates[0].execution_id
    current = await live.current(e_id)
    assert current is not None and current["status"] == "succeeded"
    assert await redis_client.ttl(live.status_key(e_id)) > 0
    assert (await redis_client.hget(live.status_key(e_id), "workflow_id")) == str(
        workflow.id).encode()
    other = await make_tenant("Snoop")
    with pytest.raises(NotFound):
        await live.subscribe(other.owner, execution_id=e_id)
    with pytest.raises(NotFound):
        await live.subscribe(other.owner, workflow_id=workflow.id)


async def test_live_status_through_notify_without_redis(
    dl: DataLayer, tenant: Tenant, workflow: Workflow, make_tenant: TenantFactory,
) -> None:
    assert dl.redis is None
    live = LiveStatus(dl)
    updates = await _live_roundtrip(dl, live, tenant, workflow)
    assert await live.current(updates[0].execution_id) is None
    # A tenant session cannot announce another tenant's execution.
    other = await make_tenant("Spoof")
    async with dl.session(other.owner) as db:
        assert await db.execrows("executions.notify_status", org_id=None,
                                 id=updates[0].execution_id, progress=1.0, node_id="x") == 0


async def test_worker_close_releases_what_it_holds(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    """A clean shutdown gives its executions back at once, as the same attempt."""
    created = await enqueue_many(dl, tenant, workflow, 3)
    w = Worker(dl, "leaving", maintain_partitions=False)
    await w.start()
    await worker_claim_mine(w, {e.id for e in created})
    await w.close()
    async with dl.session(tenant.owner, readonly=True) as db:
        back = [await db.executions.get(e.id) for e in created]
        history = await db.executions.transitions(created[0].id)
    assert all(b is not None and (b.status, b.attempt, b.worker_id) == ("queued", 1, None)
               for b in back)
    assert history[-1].reason == "released by worker leaving"
    await claim_mine(dl, "cleanup", {e.id for e in created})
    async with dl.system() as db:
        await db.executions.release("cleanup")


async def test_seeded_executions_belong_to_their_organization(dl: DataLayer) -> None:
    from datalayer.seed import SeedPlan, seed

    run_id = uuid.uuid4().hex[:8]
    counts = await seed(dl, profile="dev", scale=1, out=io.StringIO(), run_id=run_id)
    assert counts["executions"] == 30
    plan = SeedPlan("dev", 1, run_id)
    first, second = plan.org_ids[0], plan.org_ids[1]
    async with dl.session(Context(first), readonly=True) as db:
        page = await db.executions.list()
        assert page.items and all(e.org_id == first for e in page.items)
        done = next(e for e in page.items if e.status in ("succeeded", "failed"))
        timeline = await db.executions.timeline(done.id)
        assert timeline[0].kind == "execution" and "transition" in {t.kind for t in timeline}
        assert all(e.scheduled_at > e.created_at for e in page.items if e.status == "queued")
    async with dl.session(Context(second), readonly=True) as db:
        assert await db.executions.get(done.id) is None


async def test_tenant_scoped_worker_serves_only_its_organization(
    dl: DataLayer, tenant: Tenant, workflow: Workflow, make_tenant: TenantFactory,
) -> None:
    other = await make_tenant("Neighbour")
    theirs = await enqueue_many(dl, other, await new_workflow(dl, other), 2)
    mine = await enqueue_many(dl, tenant, workflow, 2)
    async with Worker(dl, "tenant-only", ctx=tenant.owner, maintain_partitions=False) as w:
        got = await w.claim(100)
        assert {e.id for e in got} == {e.id for e in mine}
        for e in got:
            assert await w.complete(e)
        assert await w.claim(100) == []
    async with dl.session(other.owner) as db:
        for e in theirs:
            assert (await db.executions.cancel(e.id)).status == "cancelled"
