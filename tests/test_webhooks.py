"""Webhooks: routing by token, signatures, header redaction, idempotent ingest under real
concurrency, bulk ingest, the processing queue (claim, process, fail, backoff, dead letter,
replay, lease expiry), statistics, retention and tenant isolation."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from datalayer import Context, DataLayer, NotFound, PermissionDenied, Unavailable
from datalayer.repos.webhooks import (
    REDACTED,
    CreatedWebhook,
    Incoming,
    hash_token,
    purge_all,
    redact_headers,
    sign,
)
from datalayer.repos.workflows import Workflow
from tests.conftest import Tenant, TenantFactory, make_layer, make_settings


@pytest.fixture
async def tenant(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant("Webhooks")


@pytest.fixture
async def workflow(dl: DataLayer, tenant: Tenant) -> Workflow:
    async with dl.session(tenant.owner) as db:
        return await db.workflows.create(f"wf {uuid.uuid4().hex[:8]}",
                                         nodes=[{"id": "a", "type": "http"}])


async def new_hook(dl: DataLayer, tenant: Tenant, workflow: Workflow,
                   max_attempts: int = 5) -> CreatedWebhook:
    async with dl.session(tenant.owner) as db:
        return await db.webhooks.create(workflow.id, name="hook", max_attempts=max_attempts)


@pytest.fixture
async def hook(dl: DataLayer, tenant: Tenant, workflow: Workflow) -> CreatedWebhook:
    return await new_hook(dl, tenant, workflow)


def signed(secret: str, body: bytes, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {"X-Datalayer-Timestamp": str(ts), "X-Datalayer-Signature": sign(secret, body, ts),
            "Content-Type": "application/json"}


async def test_create_route_and_secret_at_rest(
    dl: DataLayer, tenant: Tenant, hook: CreatedWebhook, admin_conn: asyncpg.Connection,
) -> None:
    assert hook.token.startswith("wh_") and hook.secret.startswith("whsec_")
    assert hook.token not in repr(hook) and hook.secret not in repr(hook)
    row = await admin_conn.fetchrow("SELECT path_token_hash, secret FROM webhooks "
                                    "WHERE org_id = $1 AND id = $2", tenant.org_id,
                                    hook.webhook.id)
    assert row is not None
    assert row["path_token_hash"] == hash_token(hook.token)
    assert hook.secret.encode() not in row["secret"] and hook.token.encode() not in row["secret"]
    async with dl.system() as db:
        route = await db.webhooks.route(hook.token)
        assert route is not None
        assert (route.org_id, route.webhook_id, route.workflow_id, route.method, route.active) \
            == (tenant.org_id, hook.webhook.id, hook.webhook.workflow_id, "POST", True)
        assert await db.webhooks.route(hook.token[:-1] + "x") is None
        assert await db.webhooks.route("nonsense") is None
    async with dl.session(Context(None)) as db:
        assert await db.webhooks.route(hook.token) is not None
    # Routing is refused in a tenant session (like the login path).
    with pytest.raises(PermissionDenied):
        async with dl.session(tenant.owner) as db:
            await db.webhooks.route(hook.token)
    registered = await admin_conn.fetchval(
        "SELECT count(*) FROM app.encrypted_columns WHERE table_name = 'webhooks' "
        "AND column_name = 'secret' AND org_column = 'org_id' AND id_column = 'id'")
    assert registered == 1


async def test_signature_ok_bad_stale_and_rotated(
    dl: DataLayer, tenant: Tenant, hook: CreatedWebhook,
) -> None:
    body = b'{"hello": "world"}'
    async with dl.system() as db:
        route = await db.webhooks.route(hook.token)
        assert route is not None
        wh = db.webhooks
        assert wh.verify_signature(route, body, signed(hook.secret, body))
        lower = {k.lower(): v for k, v in signed(hook.secret, body).items()}
        assert wh.verify_signature(route, body, lower)
        assert not wh.verify_signature(route, body + b" ", signed(hook.secret, body))
        assert not wh.verify_signature(route, body, signed("whsec_wrong", body))
        stale = int(time.time()) - 301
        assert not wh.verify_signature(route, body, signed(hook.secret, body, stale))
        future = int(time.time()) + 301
        assert not wh.verify_signature(route, body, signed(hook.secret, body, future))
        assert wh.verify_signature(route, body, signed(hook.secret, body, int(time.time()) - 200))
        assert not wh.verify_signature(route, body, {})
        headers = signed(hook.secret, body)
        headers["X-Datalayer-Timestamp"] = "12ab"
        assert not wh.verify_signature(route, body, headers)
    async with dl.session(tenant.owner) as db:
        new_secret = await db.webhooks.rotate_secret(hook.webhook.id)
        fresh = await db.webhooks.get(hook.webhook.id)
        assert fresh is not None
        assert db.webhooks.verify_signature(fresh, body, signed(new_secret, body))
        assert not db.webhooks.verify_signature(fresh, body, signed(hook.secret, body))


def test_header_redaction() -> None:
    out = redact_headers({
        "Authorization": "Bearer abc", "Cookie": "s=1", "X-Api-Key": "k",
        "X-Datalayer-Signature": "sha256=00", "X-Hub-Signature-256": "sha256=11",
        "X-Custom-Token": "t", "Proxy-Authorization": "Basic x",
        "Content-Type": "application/json", "X-Datalayer-Timestamp": "1", "User-Agent": "ua"})
    assert out == {
        "authorization": REDACTED, "cookie": REDACTED, "x-api-key": REDACTED,
        "x-datalayer-signature": REDACTED, "x-hub-signature-256": REDACTED,
        "x-custom-token": REDACTED, "proxy-authorization": REDACTED,
        "content-type": "application/json", "x-datalayer-timestamp": "1", "user-agent": "ua"}


async def test_ingest_stores_redacted_headers_and_counts_triggers(
    dl: DataLayer, tenant: Tenant, hook: CreatedWebhook, admin_conn: asyncpg.Connection,
) -> None:
    async with dl.system() as db:
        got = await db.webhooks.ingest(
            hook.webhook.id, org_id=tenant.org_id, idempotency_key="evt-1",
            event_type="order.created", payload={"order": 1}, source_ip="203.0.113.9",
            headers={"Authorization": "Bearer topsecret", "Cookie": "sid=abc",
                     "X-Api-Key": "key123", "X-Request-Id": "r1"})
    assert got.created and got.event.status == "pending" and got.event.attempts == 0
    assert str(got.event.source_ip) == "203.0.113.9"
    raw = await admin_conn.fetchval("SELECT headers::text FROM webhook_events "
                                    "WHERE org_id = $1 AND id = $2", tenant.org_id, got.event.id)
    for s in ("topsecret", "sid=abc", "key123"):
        assert s not in raw
    assert json.loads(raw)["x-request-id"] == "r1"
    async with dl.session(tenant.ctx("viewer")) as db:
        w = await db.webhooks.get(hook.webhook.id)
    assert w is not None and w.trigger_count == 1 and w.last_triggered_at is not None
    # Inactive webhooks take nothing.
    async with dl.session(tenant.owner) as db:
        await db.webhooks.set_active(hook.webhook.id, False)
    with pytest.raises(NotFound):
        async with dl.system() as db:
            await db.webhooks.ingest(hook.webhook.id, org_id=tenant.org_id,
                                     idempotency_key="evt-2")


async def test_64_concurrent_deliveries_of_one_key_store_one_event(
    dl: DataLayer, tenant: Tenant, hook: CreatedWebhook, admin_conn: asyncpg.Connection,
) -> None:
    clients = 64
    layer = make_layer(make_settings(dl.settings.database_url, pool_min_size=clients,
                                     pool_max_size=clients, migrate_on_start=False))
    for _ in range(40):  # other suites may share the server: wait for 64 free connections
        try:
            await layer.start()
            break
        except Unavailable:
            await asyncio.sleep(0.25)
    try:
        go = asyncio.Event()

        async def deliver(k: int) -> tuple[uuid.UUID, bool, object]:
            await go.wait()
            async with layer.system() as db:
                got = await db.webhooks.ingest(
                    hook.webhook.id, org_id=tenant.org_id, idempotency_key="same-key",
                    payload={"client": k}, event_type="ping")
                return got.event.id, got.created, got.event.payload

        tasks = [asyncio.create_task(deliver(k)) for k in range(clients)]
        await asyncio.sleep(0.05)
        go.set()
        results = await asyncio.gather(*tasks)
    finally:
        await layer.close()
    assert sum(1 for _, created, _ in results if created) == 1
    assert len({eid for eid, _, _ in results}) == 1
    assert len({json.dumps(p) for _, _, p in results}) == 1  # all got the original
    n = await admin_conn.fetchval("SELECT count(*) FROM webhook_events WHERE org_id = $1 "
                                  "AND webhook_id = $2", tenant.org_id, hook.webhook.id)
    assert n == 1
    tc = await admin_conn.fetchval("SELECT sum(trigger_count) FROM webhook_counters "
                                   "WHERE org_id = $1 AND webhook_id = $2", tenant.org_id,
                                   hook.webhook.id)
    assert tc == 1


async def test_bulk_ingest_honours_idempotency_inside_and_across_batches(
    dl: DataLayer, tenant: Tenant, hook: CreatedWebhook, admin_conn: asyncpg.Connection,
) -> None:
    wid = hook.webhook.id
    first = [Incoming(f"k{i % 50}", {"i": i}, "bulk", {"Authorization": "x"}, "10.0.0.1")
             for i in range(100)]  # 50 distinct keys, each twice
    second = [Incoming(f"k{i}", {"i": i}) for i in range(25, 75)]  # 25 old, 25 new
    async with dl.system() as db:
        assert await db.webhooks.ingest_many(wid, first, org_id=tenant.org_id) == 50
        assert await db.webhooks.ingest_many(wid, second, org_id=tenant.org_id) == 25
        assert await db.webhooks.ingest_many(wid, [], org_id=tenant.org_id) == 0
        dup = await db.webhooks.ingest(wid, org_id=tenant.org_id, idempotency_key="k3")
        assert not dup.created
    rows = await admin_conn.fetch("SELECT idempotency_key, headers FROM webhook_events "
                                  "WHERE org_id = $1 AND webhook_id = $2", tenant.org_id, wid)
    assert len(rows) == 75 and len({r["idempotency_key"] for r in rows}) == 75
    assert all(json.loads(r["headers"]).get("authorization") != "x" for r in rows)
    async with dl.session(tenant.owner) as db:
        w = await db.webhooks.get(wid)
        assert w is not None and w.trigger_count == 75
        assert [x.trigger_count for x in await db.webhooks.list()] == [75]


async def test_claim_process_links_an_execution_and_stats(
    dl: DataLayer, tenant: Tenant, hook: CreatedWebhook,
) -> None:
    async with dl.system() as db:
        ev = (await db.webhooks.ingest(hook.webhook.id, org_id=tenant.org_id,
                                       idempotency_key="p1", payload={"x": 1},
                                       event_type="t")).event
        claimed = await db.webhooks.claim("w1", limit=10, org_id=tenant.org_id)
        assert [c.id for c in claimed] == [ev.id]
        assert claimed[0].attempts == 1 and claimed[0].workflow_id == hook.webhook.workflow_id
        assert await db.webhooks.claim("w2", limit=10, org_id=tenant.org_id) == []
        done = await db.webhooks.process(claimed[0])
        assert done is not None and done.status == "processed"
        assert done.execution_id is not None and done.processed_at is not None
        execution = await db.executions.get(done.execution_id, org_id=tenant.org_id)
        assert execution is not None
        assert (execution.trigger, execution.input) == ("webhook", {"x": 1})
        assert execution.trigger_payload["event_id"] == str(ev.id)
        # A second finish of the same claim is fenced off.
        assert await db.webhooks.process(claimed[0]) is None
    async with dl.session(tenant.ctx("viewer")) as db:
        stats = await db.webhooks.stats(hook.webhook.id)
        assert (stats.received, stats.processed, stats.pending, stats.dead) == (1, 1, 0, 0)
        assert stats.p95_ms is not None and stats.p95_ms >= 0


async def test_fail_backoff_dead_letter_and_replay(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    hook = await new_hook(dl, tenant, workflow, max_attempts=2)
    async with dl.system() as db:
        ev = (await db.webhooks.ingest(hook.webhook.id, org_id=tenant.org_id,
                                       idempotency_key="f1")).event
        [c] = await db.webhooks.claim("w1", org_id=tenant.org_id)
        before = datetime.now(UTC)
        failed = await db.webhooks.mark_failed(c, error="boom", base_delay_ms=10_000)
        assert failed is not None and failed.status == "failed" and failed.error == "boom"
        delay = (failed.next_attempt_at - before).total_seconds()
        assert 4.0 <= delay <= 10.5, delay  # 10 s * 2^0 with equal jitter
        assert await db.webhooks.claim("w1", org_id=tenant.org_id) == []  # not due yet
    async with dl.system() as db:
        await db.connection.execute("UPDATE webhook_events SET next_attempt_at = now() "
                                    "WHERE org_id = $1 AND id = $2", tenant.org_id, ev.id)
        [c] = await db.webhooks.claim("w1", org_id=tenant.org_id)
        assert c.attempts == 2
        dead = await db.webhooks.mark_failed(c, error="boom again")
        assert dead is not None and dead.status == "dead"
        assert await db.webhooks.claim("w1", org_id=tenant.org_id) == []
    async with dl.session(tenant.owner) as db:
        stats = await db.webhooks.stats(hook.webhook.id)
        assert (stats.received, stats.dead) == (1, 1)
        replayed = await db.webhooks.replay(hook.webhook.id)
        assert [(e.id, e.status, e.attempts) for e in replayed] == [(ev.id, "pending", 0)]
        assert await db.webhooks.replay(hook.webhook.id) == []
    async with dl.system() as db:
        [c] = await db.webhooks.claim("w1", org_id=tenant.org_id)
        done = await db.webhooks.process(c)
        assert done is not None and done.status == "processed"


async def test_expired_lease_returns_to_the_queue_and_fences_the_old_worker(
    dl: DataLayer, tenant: Tenant, workflow: Workflow,
) -> None:
    hook = await new_hook(dl, tenant, workflow, max_attempts=2)
    async with dl.system() as db:
        ev = (await db.webhooks.ingest(hook.webhook.id, org_id=tenant.org_id,
                                       idempotency_key="l1")).event
        [old] = await db.webhooks.claim("slow", lease_s=0.05, org_id=tenant.org_id)
    await asyncio.sleep(0.2)
    async with dl.system() as db:
        reaped = [e for e in await db.webhooks.reap(limit=1000) if e.id == ev.id]
        assert [(e.status, e.attempts) for e in reaped] == [("pending", 1)]
        [new] = await db.webhooks.claim("fast", org_id=tenant.org_id)
        assert new.attempts == 2
        assert await db.webhooks.mark_processed(old, None) is None  # fenced
        assert await db.webhooks.mark_failed(old, error="late") is None
        [ok] = await db.webhooks.mark_processed_many("fast", [new], [None])
        assert ok.id == ev.id
    # An expired lease on the last attempt dead-letters the event.
    async with dl.system() as db:
        ev2 = (await db.webhooks.ingest(hook.webhook.id, org_id=tenant.org_id,
                                        idempotency_key="l2")).event
    for _ in range(2):  # (now() is the transaction's start: one session per step)
        async with dl.system() as db:
            [c] = await db.webhooks.claim("slow", lease_s=0.05, org_id=tenant.org_id)
        await asyncio.sleep(0.1)
        async with dl.system() as db:
            [r] = [e for e in await db.webhooks.reap(limit=1000) if e.id == ev2.id]
    assert (r.status, r.attempts, c.attempts) == ("dead", 2, 2)


async def test_processing_a_deleted_workflow_fails_the_event(
    dl: DataLayer, tenant: Tenant, hook: CreatedWebhook,
) -> None:
    async with dl.system() as db:
        await db.webhooks.ingest(hook.webhook.id, org_id=tenant.org_id, idempotency_key="d1")
        [c] = await db.webhooks.claim("w", org_id=tenant.org_id)
        await db.connection.execute("UPDATE workflows SET deleted_at = now() WHERE org_id = $1 "
                                    "AND id = $2", tenant.org_id, hook.webhook.workflow_id)
        out = await db.webhooks.process(c)
        assert out is not None and out.status == "failed" and "NotFound" in (out.error or "")


async def test_retention_deletes_old_finished_events_in_batches(
    dl: DataLayer, tenant: Tenant, hook: CreatedWebhook, admin_conn: asyncpg.Connection,
) -> None:
    wid = hook.webhook.id
    async with dl.system() as db:
        await db.webhooks.ingest_many(wid, [Incoming(f"r{i}") for i in range(30)],
                                      org_id=tenant.org_id)
    # 20 old and finished, 5 old but pending, 5 recent and processed.
    await admin_conn.execute(
        "UPDATE webhook_events SET received_at = now() - interval '40 days', "
        "status = CASE WHEN idempotency_key ~ '^r(1?[0-9])$' THEN 'processed' ELSE 'pending' END, "
        "processed_at = CASE WHEN idempotency_key ~ '^r(1?[0-9])$' THEN now() END "
        "WHERE org_id = $1 AND webhook_id = $2 AND idempotency_key ~ '^r(1?[0-9]|2[0-4])$'",
        tenant.org_id, wid)
    await admin_conn.execute(
        "UPDATE webhook_events SET status = 'processed', processed_at = now() "
        "WHERE org_id = $1 AND webhook_id = $2 AND idempotency_key ~ '^r2[5-9]$'",
        tenant.org_id, wid)
    deleted = await purge_all(dl, datetime.now(UTC) - timedelta(days=30), batch=7)
    assert deleted >= 20
    left = await admin_conn.fetch("SELECT idempotency_key, status FROM webhook_events "
                                  "WHERE org_id = $1 AND webhook_id = $2", tenant.org_id, wid)
    assert sorted(r["idempotency_key"] for r in left) == sorted(
        [f"r{i}" for i in range(20, 30)])


async def test_other_tenant_sees_and_touches_nothing(
    dl: DataLayer, make_tenant: TenantFactory, tenant: Tenant, hook: CreatedWebhook,
) -> None:
    other = await make_tenant("Other")
    async with dl.system() as db:
        ev = (await db.webhooks.ingest(hook.webhook.id, org_id=tenant.org_id,
                                       idempotency_key="secret-event",
                                       payload={"private": True})).event
    async with dl.session(other.owner) as db:
        assert await db.webhooks.get(hook.webhook.id) is None
        assert await db.webhooks.get(hook.webhook.id, org_id=tenant.org_id) is None
        assert await db.webhooks.get_event(ev.id) is None
        assert await db.webhooks.get_event(ev.id, org_id=tenant.org_id) is None
        assert await db.webhooks.list() == []
        assert (await db.webhooks.list_events(hook.webhook.id, org_id=tenant.org_id)).items == []
        assert await db.webhooks.claim("thief", limit=100) == []
        assert await db.webhooks.replay(hook.webhook.id, org_id=tenant.org_id) == []
        stats = await db.webhooks.stats(hook.webhook.id, org_id=tenant.org_id)
        assert stats.received == 0
    with pytest.raises(NotFound):
        async with dl.session(other.owner) as db:
            await db.webhooks.ingest(hook.webhook.id, org_id=tenant.org_id,
                                     idempotency_key="injected")
    with pytest.raises(NotFound):
        async with dl.session(other.owner) as db:
            await db.webhooks.ingest(hook.webhook.id, idempotency_key="injected")
    # The owning tenant sees its own.
    async with dl.session(tenant.ctx("viewer")) as db:
        page = await db.webhooks.list_events(hook.webhook.id)
        assert [e.id for e in page.items] == [ev.id]
        assert [w.id for w in await db.webhooks.list()] == [hook.webhook.id]
