"""``datalayer demo``: a real scenario against the configured database, printed as it runs.

Each domain adds a section. Output is for people; it goes to the stream it is given.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TextIO

import asyncpg

from datalayer.core.context import Context
from datalayer.core.database import DataLayer
from datalayer.core.errors import translate
from datalayer.stats import format_stats

__all__ = ["run_demo"]


def _printer(out: TextIO) -> Callable[..., None]:
    """``say(text)``: one line of demo output to ``out``."""

    def say(text: str = "") -> None:
        print(text, file=out)

    return say


async def run_demo(dl: DataLayer, out: TextIO) -> None:
    """Run every section in order."""
    await _tenancy(dl, out)
    await _identity(dl, out)
    await _workflows(dl, out)
    await _executions(dl, out)
    await _webhooks(dl, out)
    await _cache(dl, out)
    await _ratelimit(dl, out)
    await _credentials(dl, out)
    await _notifications(dl, out)
    await _audit(dl, out)
    await _gdpr(dl, out)
    await _analytics_search(dl, out)
    await _plugins(dl, out)
    await _digitwin(dl, out)
    await _stats_and_health(dl, out)


async def _tenancy(dl: DataLayer, out: TextIO) -> None:
    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    say("== Tenancy: two organizations, each sees only itself (RLS) ==")
    tenants = {}
    for name in ("Acme", "Globex"):
        ctx = Context(uuid.uuid4(), user_id=uuid.uuid4(), role="owner",
                      request_id=f"demo-{run}")
        async with dl.session(ctx) as db:
            org = await db.orgs.create(slug=f"{name.lower()}-{run}", name=name, plan="pro")
        tenants[name] = (ctx, org)
        say(f"created {org.name:<7} id={org.id} slug={org.slug}")
    acme_ctx, acme = tenants["Acme"]
    _, globex = tenants["Globex"]
    async with dl.session(acme_ctx, readonly=True) as db:
        visible = [o.name for o in await db.orgs.list_visible()]
        say(f"Acme's session lists: {visible}")
        say(f"Acme's session reads Globex by id: {await db.orgs.get(globex.id)}")
        role = await db.connection.fetchval("SELECT current_user")
        say(f"Acme's session runs as role {role!r} (NOBYPASSRLS, owns nothing)")
    async with dl.session(Context(None), readonly=True) as db:
        say(f"a session with no organization counts {await db.scalar('orgs.count_all')} "
            "organizations")
    try:
        async with dl.session(acme_ctx.with_(role="viewer")) as db:
            await db.orgs.update(acme.id, name="Renamed by a viewer")
    except Exception as exc:  # NotFound: the viewer's UPDATE matched no writable row
        say(f"a viewer renaming Acme: {type(exc).__name__}: {exc}")
    try:
        async with dl.session(acme_ctx) as db:
            await db.connection.execute(
                "INSERT INTO organizations (id, slug, name) VALUES ($1, $2, 'Sneaky')",
                uuid.uuid4(), f"sneaky-{run}")
    except asyncpg.PostgresError as exc:
        err = translate(exc)
        say(f"Acme inserting an organization with another id: {type(err).__name__}: {err}")
    async with dl.system() as db:
        say(f"the maintenance role (dl.system()) counts {await db.scalar('orgs.count_all')} "
            "organizations across all tenants")
    say()


async def _identity(dl: DataLayer, out: TextIO) -> None:
    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    say("== Identity: users, teams, API keys, lockout ==")
    orgs = {}
    for name in ("Initech", "Hooli"):
        org_id, owner_id = uuid.uuid4(), uuid.uuid4()
        owner = Context(org_id, user_id=owner_id, role="owner", request_id=f"demo-{run}")
        email = f"owner-{run}@{name.lower()}.example"
        async with dl.session(owner) as db:
            await db.orgs.create(slug=f"{name.lower()}-{run}", name=name)
            await db.auth.register(email=email, password=f"{name} owner password",
                                   display_name=f"{name} owner")
            await db.memberships.add(owner_id, "owner")
            team = await db.teams.create("Platform")
            await db.teams.add_member(team.id, owner_id, "lead")
        orgs[name] = (owner, email, team)
        say(f"{name}: owner {email} registered, team {team.name!r} created")
    initech, initech_email, _ = orgs["Initech"]
    hooli, _, hooli_team = orgs["Hooli"]
    async with dl.session(initech) as db:
        issued = await db.api_keys.create("ci", scopes=["workflows:read"])
    say(f"issued API key {issued.key.prefix}…{issued.key.last4} "
        "(the full key is shown once; only its sha256 is stored)")
    async with dl.session(Context(None)) as db:
        found = await db.api_keys.verify(issued.secret)
        last = issued.secret[-1]
        forged = await db.api_keys.verify(issued.secret[:-1] + ("1" if last == "0" else "0"))
    assert found is not None
    say(f"verified without a context: org={found.org_id} role={found.role} "
        f"scopes={found.scopes}; a forged key verifies as {forged}")
    async with dl.session(Context(None)) as db:
        for attempt in range(1, 6):
            result = await db.auth.login(initech_email, f"wrong password {attempt}")
            say(f"login attempt {attempt} with a wrong password: {result.outcome}")
        right = await db.auth.login(initech_email, "Initech owner password")
        say(f"the right password while locked: {right.outcome} "
            f"(until {right.locked_until:%H:%M:%S}; attempts while locked are not counted)")
    async with dl.session(initech, readonly=True) as db:
        foreign_team = await db.teams.get(hooli_team.id)
        user = await db.users.get(hooli.user_id)  # type: ignore[arg-type]
        allowed = await db.permissions.check(initech.user_id, "delete",  # type: ignore[arg-type]
                                             "organization")
    say(f"Initech reads Hooli's team: {foreign_team}; Hooli's owner: {user}")
    say(f"may Initech's owner delete the organization? {allowed}")
    say()


async def _workflows(dl: DataLayer, out: TextIO) -> None:
    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    say("== Workflows: versions on every content change, restore, export/import, templates ==")
    owners = {}
    for name in ("Umbrella", "Soylent"):
        org_id, owner_id = uuid.uuid4(), uuid.uuid4()
        owner = Context(org_id, user_id=owner_id, role="owner", request_id=f"demo-{run}")
        async with dl.session(owner) as db:
            await db.orgs.create(slug=f"{name.lower()}-{run}", name=name)
            await db.users.create(email=f"owner-{run}@{name.lower()}.example")
            await db.memberships.add(owner_id, "owner")
        owners[name] = owner
    umbrella, soylent = owners["Umbrella"], owners["Soylent"]
    nodes = [{"id": "in", "type": "trigger", "position": {"x": 0, "y": 0}, "data": {}},
             {"id": "llm", "type": "llm", "position": {"x": 200, "y": 0},
              "data": {"prompt": "Classify the ticket"}}]
    edges = [{"id": "e1", "source": "in", "target": "llm"}]
    async with dl.session(umbrella) as db:
        wf = await db.workflows.create("Support triage", nodes=nodes, edges=edges,
                                       tags=["support", "llm"])
        say(f"created {wf.name!r}: version {wf.current_version}, {len(wf.nodes)} nodes")
        more = [*nodes, {"id": "out", "type": "output", "position": {"x": 400, "y": 0}}]
        wf = await db.workflows.update(wf.id, nodes=more,
                                       edges=[*edges, {"source": "llm", "target": "out"}])
        say(f"edit 1 (a node added): version {wf.current_version}")
        wf = await db.workflows.update(wf.id, settings={"timeout_s": 60})
        say(f"edit 2 (settings): version {wf.current_version}")
        wf = await db.workflows.update(wf.id, name="Support triage (EU)")
        say(f"rename: still version {wf.current_version} (names are not content)")
        wf = await db.workflows.restore(wf.id, 1)
        v1 = await db.workflows.get_version(wf.id, 1)
        assert v1 is not None
        say(f"restore version 1: version {wf.current_version}, same content as version 1: "
            f"{wf.content_hash == v1.content_hash} (history is never rewritten)")
        history = [v.version for v in (await db.workflows.versions(wf.id)).items]
        say(f"versions, newest first: {history}")
        hits = await db.workflows.search("triage")
        say(f"search 'triage': {[(h.name, round(h.rank, 3)) for h in hits.items]}")
        document = await db.workflows.export_json(wf.id)
        tpl = await db.workflows.create("Ticket classifier", nodes=nodes, edges=edges,
                                        is_template=True, visibility="public")
    async with dl.session(soylent) as db:
        say(f"Soylent reads Umbrella's workflow by id: {await db.workflows.get(wf.id)}")
        copy = await db.workflows.import_(document)
        say(f"Soylent imports the export ({len(document)} bytes): new id {copy.id}, "
            f"version {copy.current_version}, "
            f"{len((await db.workflows.versions(copy.id)).items)} versions")
        mine = await db.workflows.instantiate(tpl.id, name="Our classifier")
        say(f"Soylent instantiates Umbrella's public template: {mine.name!r} "
            f"({len(mine.nodes)} nodes, a draft of its own)")
    say()


async def _executions(dl: DataLayer, out: TextIO) -> None:
    import asyncio
    import itertools
    from typing import Any

    from datalayer.live import LiveStatus
    from datalayer.queue import Worker
    from datalayer.repos.executions import Execution, LeaseLost

    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    say("== Executions: a work queue, two workers, one dies mid-run and is recovered ==")
    org_id, owner_id = uuid.uuid4(), uuid.uuid4()
    owner = Context(org_id, user_id=owner_id, role="owner", request_id=f"demo-{run}")
    steps = ["fetch", "transform", "store"]
    async with dl.session(owner) as db:
        await db.orgs.create(slug=f"initrode-{run}", name="Initrode")
        await db.users.create(email=f"owner-{run}@initrode.example")
        await db.memberships.add(owner_id, "owner")
        wf = await db.workflows.create(
            "Nightly export", nodes=[{"id": n, "type": "code"} for n in steps],
            edges=[{"source": x, "target": y} for x, y in itertools.pairwise(steps)],
            settings={"retry": {"enabled": True, "max_attempts": 3, "base_delay_ms": 500}})
        queued = [await db.executions.enqueue(wf.id, input={"batch": i}) for i in range(3)]
    say(f"enqueued {len(queued)} executions of {wf.name!r} (retry enabled: up to 3 attempts)")
    lease = 1.0
    live = LiveStatus(dl, prefix=f"demo:{run}:", ttl_s=600)
    watched = queued[0].id
    sub = await live.subscribe(owner, execution_id=watched)
    seen: list[str] = []

    async def watch() -> None:
        async for update in sub:
            seen.append(update.status + (f"@{update.node_id}" if update.node_id else ""))

    watcher = asyncio.create_task(watch())

    async def run_nodes(worker: Worker, e: Execution, die_after: str | None = None) -> Any:
        async with worker.session() as db:
            snap = await db.executions.latest_snapshot(e.id, org_id=e.org_id)
        done: list[str] = list(snap.state["done"]) if snap is not None else []
        if snap is not None:
            say(f"  {worker.worker_id} resumes attempt {e.attempt} from snapshot {snap.seq}: "
                f"{done} already done")
        for step in steps:
            if step in done:
                continue
            async with worker.session() as db:
                node = await db.executions.start_node(e, step, name=step.title(), type="code")
            await worker.progress(e, len(done) / len(steps), node_id=step)
            if step == die_after:
                return None  # the process dies here, with the node still running
            await asyncio.sleep(0.05)
            done.append(step)
            async with worker.session() as db:
                await db.executions.finish_node(e, node, output={"rows": 100 * len(done)})
                await db.executions.checkpoint(e, {"done": done}, reason=f"after {step}")
        return {"exported": len(done)}

    a = Worker(dl, f"worker-a-{run}", lease_s=lease, maintain_partitions=False, live=live)
    await a.start()
    (victim,) = await a.claim(1)
    while victim.id != watched:  # other tenants' queued work may come first: just finish it
        await a.complete(victim)
        (victim,) = await a.claim(1)
    say(f"worker-a claims {victim.id} (attempt {victim.attempt}, lease {lease:g}s)")
    await run_nodes(a, victim, die_after="transform")
    await a.abort()
    say("worker-a dies during 'transform', after checkpointing 'fetch' (no more heartbeats)")
    mine = {e.id for e in queued}
    finished: set[uuid.UUID] = set()
    stop = asyncio.Event()

    async def handler(e: Execution) -> Any:
        try:
            if e.id not in mine:
                return None
            if e.id == watched:
                say(f"  worker-b claims it after the reaper requeued it: attempt {e.attempt}")
            return await run_nodes(b, e)
        finally:
            finished.add(e.id)
            if mine <= finished:
                stop.set()

    async with Worker(dl, f"worker-b-{run}", lease_s=lease, poll_interval_s=0.2,
                      maintain_partitions=False, live=live) as b:
        try:
            await asyncio.wait_for(b.run(handler, stop=stop), 30)
        except (TimeoutError, LeaseLost):
            say("  (worker-b did not finish in time)")
    await asyncio.sleep(0.2)
    watcher.cancel()
    await sub.close()
    async with dl.session(owner, readonly=True) as db:
        for e in queued:
            got = await db.executions.get(e.id)
            assert got is not None
            say(f"{got.id}: {got.status}, attempt {got.attempt}, output {got.output}")
        timeline = await db.executions.timeline(watched)
        stats = await db.workflows.stats(wf.id)
    say(f"live updates seen for {watched} ({'Redis' if dl.redis else 'NOTIFY'}): {seen}")
    say(f"timeline of {watched}:")
    start = timeline[0].at
    for t in timeline[1:]:
        offset = (t.at - start).total_seconds() if t.at and start else 0.0
        if t.kind == "transition":
            held = f"[{t.worker_id}]" if t.worker_id else ""
            why = f" {t.reason}" if t.reason else ""
            say(f"  +{offset:6.3f}s  {t.from_status or '-':>9} -> {t.status:<9} {held}{why}")
        else:
            took = f"{t.duration_ms} ms" if t.duration_ms is not None else "-"
            say(f"  +{offset:6.3f}s  node {t.node_id:<9} {t.status:<9} {took}")
    if stats is not None:
        say(f"workflow statistics: {stats.executions} finished, {stats.successes} succeeded")
    say()


async def _webhooks(dl: DataLayer, out: TextIO) -> None:
    import json
    import time

    from datalayer.repos.webhooks import sign

    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    say("== Webhooks: a signed delivery received twice (stored once), processed into an "
        "execution ==")
    owner = Context(uuid.uuid4(), user_id=uuid.uuid4(), role="owner", request_id=f"demo-{run}")
    async with dl.session(owner) as db:
        await db.orgs.create(slug=f"hooks-{run}", name="Hooks Inc")
        await db.users.create(email=f"owner-{run}@hooks.example")
        await db.memberships.add(owner.user_id, "owner")  # type: ignore[arg-type]
        wf = await db.workflows.create("On order", nodes=[{"id": "notify", "type": "http"}])
        created = await db.webhooks.create(wf.id, name="orders")
    say(f"webhook {created.webhook.name!r} for workflow {wf.name!r}: POST /hooks/"
        f"{created.token[:8]}… (token and signing secret shown once; stored: sha256 of the "
        f"token, the secret encrypted)")
    body = json.dumps({"order": 1042, "total": 99.5}).encode()
    ts = int(time.time())
    headers = {"X-Datalayer-Timestamp": str(ts),
               "X-Datalayer-Signature": sign(created.secret, body, ts),
               "Authorization": "Bearer sender-token", "Idempotency-Key": f"order-1042-{run}"}
    org_id = created.webhook.org_id
    for delivery in (1, 2):
        async with dl.system() as db:  # the HTTP handler: no tenant context yet
            route = await db.webhooks.route(created.token)
            assert route is not None
            ok = db.webhooks.verify_signature(route, body, headers)
            tampered = db.webhooks.verify_signature(route, body + b" ", headers)
            got = await db.webhooks.ingest(
                route.webhook_id, org_id=route.org_id, idempotency_key=headers["Idempotency-Key"],
                event_type="order.created", payload=json.loads(body), headers=headers,
                source_ip="203.0.113.10")
        outcome = "stored" if got.created else "already stored: the original comes back"
        say(f"delivery {delivery}: signature {'valid' if ok else 'INVALID'} (tampered body: "
            f"{'valid' if tampered else 'rejected'}); event {str(got.event.id)[:8]} {outcome}; "
            f"authorization stored as {got.event.headers['authorization']!r}")
    async with dl.system() as db:  # a worker
        [event] = await db.webhooks.claim(f"demo-{run}", org_id=org_id)
        done = await db.webhooks.process(event)
        assert done is not None and done.execution_id is not None
        ex = await db.executions.get(done.execution_id, org_id=org_id)
        assert ex is not None
    say(f"processed: event {done.status}, execution {str(ex.id)[:8]} {ex.status} "
        f"(trigger {ex.trigger!r}, input {ex.input})")
    async with dl.session(owner, readonly=True) as db:
        stats = await db.webhooks.stats(created.webhook.id)
        hook = await db.webhooks.get(created.webhook.id)
        assert hook is not None
    say(f"stats: received {stats.received}, processed {stats.processed}, dead {stats.dead}; "
        f"trigger count {hook.trigger_count}")
    async with dl.system() as db:  # leave no queued executions for other workers
        await db.connection.execute(
            "DELETE FROM executions WHERE org_id = $1 AND status = 'queued'", org_id)
    say()


async def _ratelimit(dl: DataLayer, out: TextIO) -> None:
    import asyncio
    from datetime import UTC, datetime, timedelta

    from datalayer.core.errors import RateLimited
    from datalayer.ratelimit import Limit

    say = _printer(out)

    limiter = dl.limiter
    limit = Limit(2, 1.0, burst=3)  # 2 a second, and a fresh key may spend 5 at once
    user = uuid.uuid4()
    say(f"== Rate limiting: a burst, then rejections with retry-after "
        f"({limiter.backend.name} backend) ==")
    say(f"limit 'demo.api': {limit.rate} per {limit.period_s:g}s, burst {limit.burst} "
        f"({limit.algorithm}), keyed by user")
    for i in range(1, limit.capacity + 2):
        d = await limiter.check("demo.api", user_id=user, limit=limit)
        verdict = (f"allowed, {d.remaining} remaining" if d.allowed
                   else f"rejected, retry after {d.retry_after:.3f}s")
        say(f"request {i}: {verdict}")
    try:
        await limiter.enforce("demo.api", user_id=user, limit=limit)
    except RateLimited as exc:
        say(f"enforce(): {type(exc).__name__}: {exc} (retry_after={exc.retry_after:.3f})")
        await asyncio.sleep(exc.retry_after)
    d = await limiter.check("demo.api", user_id=user, limit=limit)
    say(f"after waiting that long: {'allowed' if d.allowed else 'rejected'}")
    other = await limiter.check("demo.api", user_id=uuid.uuid4(), limit=limit)
    say(f"another user meanwhile: {'allowed' if other.allowed else 'rejected'} "
        f"({other.remaining} remaining)")
    await limiter.flush()  # also done every second in the background
    since = datetime.now(UTC) - timedelta(minutes=2)
    async with dl.system() as db:
        rows = await db.many("ratelimit.violations", since=since, limit=1000)
    for r in rows:
        if r["key"].endswith(f"|u={user}"):
            say(f"rate_limit_violations: {r['count']} rejections of {r['key']} in the "
                f"{r['window_s']}s window from {r['window_start']:%H:%M:%S} (one row per key "
                "and window)")
    say()


async def _cache(dl: DataLayer, out: TextIO) -> None:
    import time

    from datalayer.cache import Namespace

    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    cache = dl.cache
    say(f"== Cache: a cached lookup, fresh after a write, and a tag invalidation "
        f"({cache.backend.name} backend) ==")
    org_id, owner_id = uuid.uuid4(), uuid.uuid4()
    owner = Context(org_id, user_id=owner_id, role="owner", request_id=f"demo-{run}")
    async with dl.session(owner) as db:
        await db.orgs.create(slug=f"umbrella-{run}", name="Umbrella")
        await db.users.create(email=f"owner-{run}@umbrella.example", display_name="Alice")
        await db.memberships.add(owner_id, "owner")
    viewer = Context(org_id, user_id=uuid.uuid4(), role="viewer")

    def counts() -> tuple[int, int]:
        s = cache.stats().get("users")
        return (s.hits, s.misses) if s else (0, 0)

    for attempt in ("first", "second"):
        before = counts()
        async with dl.session(viewer, readonly=True) as db:
            started = time.perf_counter()
            user = await db.users.get(owner_id)
            took = (time.perf_counter() - started) * 1000
        after = counts()
        outcome = "hit" if after[0] > before[0] else "miss (read from PostgreSQL, stored)"
        say(f"{attempt} read of Alice's account: {outcome}, {took:.2f} ms, "
            f"display name {user.display_name if user else None!r}")
    async with dl.session(owner) as db:
        await db.users.update_profile(owner_id, display_name="Alice Abernathy")
    async with dl.session(viewer, readonly=True) as db:
        user = await db.users.get(owner_id)
    name = user.display_name if user else None
    say(f"after she renames herself (invalidated on commit): {name!r}")
    reports = cache.namespace(Namespace("demo.reports", ttl=60))
    team = f"team:{run}"
    await reports.set(f"{run}:weekly", {"rows": 120}, tags=[team])
    await reports.set(f"{run}:monthly", {"rows": 480}, tags=[team])
    await reports.set(f"{run}:yearly", {"rows": 5200}, tags=[f"team:other-{run}"])
    keys = [f"{run}:{k}" for k in ("weekly", "monthly", "yearly")]
    say(f"cached reports: {sorted(k.split(':')[1] for k in await reports.get_many(keys))}")
    await cache.invalidate_tags(team)
    say(f"after invalidating tag {team!r}: "
        f"{sorted(k.split(':')[1] for k in await reports.get_many(keys))}")
    s = cache.stats()["users"]
    say(f"users namespace in this process: {s.hits} hits, {s.misses} misses, "
        f"{s.loads} loads ({s.load_ms:.1f} ms loading)")
    say()


async def _notifications(dl: DataLayer, out: TextIO) -> None:
    from datalayer.repos.notifications import NotificationFeed

    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    say("== Notifications: direct, team and organization fan-out, unread count, push ==")
    org_id, owner_id, alice_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    owner = Context(org_id, user_id=owner_id, role="owner", request_id=f"demo-{run}")
    alice = Context(org_id, user_id=alice_id, role="member", request_id=f"demo-{run}")
    alice_email = f"alice-{run}@umbrella.example"
    async with dl.session(owner) as db:
        await db.orgs.create(slug=f"umbrella-{run}", name="Umbrella")
        await db.users.create(email=f"owner-{run}@umbrella.example")
        await db.memberships.add(owner_id, "owner")
        token = await db.auth.invite(alice_email, "member")
    async with dl.session(Context(None, user_id=alice_id)) as db:
        await db.users.create(email=alice_email, display_name="Alice")
        await db.auth.consume_token("invitation", token)
    async with dl.session(owner) as db:
        team = await db.teams.create("On-call")
        await db.teams.add_member(team.id, alice_id)
    feed = NotificationFeed(dl)
    how = "Redis pub/sub" if dl.redis is not None else "PostgreSQL NOTIFY"
    async with await feed.subscribe(alice_id) as sub:
        async with dl.session(owner) as db:
            await db.notifications.create(alice_id, "workflow.failed", "Nightly export failed",
                                          message="node 'transform' timed out",
                                          data={"workflow": "Nightly export"},
                                          priority="urgent")
            team_sent = await db.notifications.fan_out_team(team.id, "oncall.handover",
                                                            "You are on call this week")
            org_sent = await db.notifications.fan_out_org("org.announcement",
                                                          "Maintenance on Sunday", priority="low")
        say(f"the owner notifies Alice directly, fans out to team {team.name!r} "
            f"({len(team_sent)} recipients) and to the organization ({len(org_sent)})")
        pushed = [e for e in [await sub.get(timeout_s=2) for _ in range(3)] if e is not None]
        say(f"Alice's subscription ({how}) received {len(pushed)} events: "
            f"{[f'{e.type}/{e.priority}' for e in pushed]} (ids only, no message bodies)")
    async with dl.session(alice, readonly=True) as db:
        page = await db.notifications.list(limit=10)
    say(f"Alice's list, one statement: {page.unread} unread of {len(page.items)}")
    for n in page.items:
        say(f"  [{n.priority:>6}] {n.title}{' — ' + n.message if n.message else ''}")
    async with dl.session(alice) as db:
        marked = await db.notifications.mark_read([page.items[-1].id])
        left = await db.notifications.unread_count()
        say(f"Alice marks {marked} read: {left} unread; "
            f"mark all read: {await db.notifications.mark_all_read()} more")
        say(f"unread now: {await db.notifications.unread_count()}")
    async with dl.session(owner, readonly=True) as db:
        mine = await db.notifications.list()
    say(f"the owner's own list: {[n.title for n in mine.items]}; Alice's notifications are "
        "readable by Alice only (RLS)")
    say()


async def _credentials(dl: DataLayer, out: TextIO) -> None:
    import os

    from datalayer.security.rotation import rotate

    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    say("== Credentials: encrypted at rest, listed without secrets, audited decrypt, "
        "online key rotation ==")
    owner = Context(uuid.uuid4(), user_id=uuid.uuid4(), role="owner", request_id=f"demo-{run}")
    async with dl.session(owner) as db:
        await db.orgs.create(slug=f"vault-{run}", name="Vault Co")
        await db.users.create(email=f"owner-{run}@vault.example")
        await db.memberships.add(owner.user_id, "owner")  # type: ignore[arg-type]
        cred = await db.credentials.create(
            "GitHub", "oauth2", {"access_token": f"gho_{uuid.uuid4().hex}",
                                 "refresh_token": f"ghr_{uuid.uuid4().hex}",
                                 "scopes": ["repo", "workflow"]},
            metadata={"account": "vault-co"})
    say(f"stored credential {cred.name!r} ({cred.type}); at rest it is one AES-256-GCM blob")
    async with dl.session(owner, readonly=True) as db:
        for c in (await db.credentials.list()).items:
            say(f"listed: {c!r}")
    async with dl.system() as db:
        kid = await db.connection.fetchval(
            "SELECT app.keyring_kid(secret) FROM credentials WHERE id = $1", cred.id)
    say(f"the stored blob is under key {kid!r}")

    async def show() -> None:
        async with dl.session(owner) as db:
            secret = await db.credentials.decrypt(cred.id)
            log = await db.credentials.access_log(cred.id)
        token = secret.payload["access_token"]
        say(f"decrypt(): access_token {token[:8]}… scopes={secret.payload['scopes']} "
            f"(repr: {secret!r}); access records so far: {len(log)}")

    await show()
    # The demo rotates only its own organization's rows to a throwaway key and back; the
    # real thing, `datalayer keys rotate`, covers every registered column of every tenant.
    original, org = dl.keyring, owner.org_id
    new_kid = f"demo-{run}"
    ring = original.with_new_key(new_kid, os.urandom(32))
    try:
        dl.keyring = ring
        report = await rotate(dl, batch=200, org_id=org)
        say(f"rotated Vault Co to key {new_kid!r}: {report.total_rotated} rows re-encrypted "
            f"in {report.batches} batches; none of its rows references the old key")
        async with dl.system() as db:
            kid = await db.connection.fetchval(
                "SELECT app.keyring_kid(secret) FROM credentials WHERE id = $1", cred.id)
        say(f"the stored blob is now under key {kid!r}")
        await show()
        report = await rotate(dl, batch=200, org_id=org)
        say(f"a second rotation changes nothing: {report.total_rotated} rows")
    finally:
        # back to the configured key (also after an error), so that the demo's rows stay
        # readable with DATALAYER_KEYS once the throwaway key is gone
        dl.keyring = ring.with_active(original.active_kid)
        try:
            report = await rotate(dl, batch=200, org_id=org, check=False)
        finally:
            dl.keyring = original
    say(f"rotated back to the configured key {original.active_kid!r} "
        f"({report.total_rotated} rows)")
    say()


async def _audit(dl: DataLayer, out: TextIO) -> None:
    from datalayer.repos.audit import anchor, verify_chain

    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    say("== Audit: a change with its before/after row, a hash chain, tampering detected ==")
    org_id, owner_id = uuid.uuid4(), uuid.uuid4()
    owner = Context(org_id, user_id=owner_id, role="owner", request_id=f"demo-{run}",
                    ip="198.51.100.20", user_agent="demo-browser/1.0")
    async with dl.session(owner) as db:
        await db.orgs.create(slug=f"initrode-{run}", name="Initrode")
        await db.users.create(email=f"owner-{run}@initrode.example", display_name="Bill")
        await db.memberships.add(owner_id, "owner")
        wf = await db.workflows.create("Invoice sync", nodes=[{"id": "a", "type": "http"}])
    async with dl.session(owner.with_(request_id=f"demo-{run}-edit")) as db:
        await db.workflows.update(wf.id, name="Invoice sync (EU)")
    async with dl.session(owner, readonly=True) as db:
        change = (await db.audit.changes_for("workflows", {"org_id": org_id, "id": wf.id},
                                             limit=1)).items[0]
        events = (await db.audit.by_resource("membership", owner_id)).items
    assert change.before is not None and change.after is not None
    say(f"UPDATE of workflow {wf.id} by {change.actor_user_id} (request "
        f"{change.request_id}): changed {change.changed_columns}")
    say(f"  before name={change.before.get('name')!r}  after name={change.after.get('name')!r}"
        f"  (chain position {change.seq})")
    say(f"explicit events too: {[(e.action, e.risk, str(e.ip)) for e in events]}")
    saved = await anchor(dl, org_id)
    report = await verify_chain(dl, org_id)
    say(f"verify_chain: ok={report.ok}, rows={report.rows}; anchor {saved.digest[:16]}…")
    # The maintenance role owns the audit tables and can change them: the chain shows it.
    async with dl.system() as db:
        await db.connection.execute("SELECT set_config('app.audit_bypass', 'redact', true)")
        await db.connection.execute(
            "UPDATE data_changes SET after = after || '{\"name\": \"Invoice sync\"}' "
            "WHERE org_id = $1 AND seq = $2", org_id, change.seq)
    say("the maintenance role quietly rewrites that change row's 'after' ...")
    report = await verify_chain(dl, org_id, saved=saved)
    say(f"verify_chain: ok={report.ok}: {report.problems}")
    say()


async def _gdpr(dl: DataLayer, out: TextIO) -> None:
    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    say("== GDPR: consent, masking, a subject export, erasure ==")
    org_id, owner_id, dana_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    owner = Context(org_id, user_id=owner_id, role="owner", request_id=f"demo-{run}")
    dana_email = f"dana-{run}@wayne.example"
    async with dl.session(owner) as db:
        await db.orgs.create(slug=f"wayne-{run}", name="Wayne")
        await db.users.create(email=f"owner-{run}@wayne.example", display_name="Bruce")
        await db.memberships.add(owner_id, "owner")
        token = await db.auth.invite(dana_email, "member")
    async with dl.session(Context(None, user_id=dana_id)) as db:
        await db.users.create(email=dana_email, display_name="Dana Scully")
        await db.auth.consume_token("invitation", token)
    dana = Context(org_id, user_id=dana_id, role="member", request_id=f"demo-{run}")
    async with dl.session(dana) as db:
        await db.gdpr.record_consent("marketing", granted=True, notice_version="2026-01")
        await db.gdpr.record_consent("marketing", granted=False, notice_version="2026-03")
        await db.gdpr.record_consent("analytics", granted=True, notice_version="2026-03")
        state = await db.gdpr.consents()
        await db.workflows.create("Dana's report")
        say("Dana's consent state (latest record per purpose): "
            + ", ".join(f"{p}={'granted' if c.granted else 'withdrawn'} ({c.notice_version})"
                        for p, c in sorted(state.items())))
        members = {m.display_name: m.email for m in await db.gdpr.members()}
        say(f"Dana (member) sees the members as {members}")
    async with dl.session(owner, readonly=True) as db:
        members = {m.display_name: m.email for m in await db.gdpr.members()}
        say(f"the owner sees them as {members}")
    async with dl.session(owner) as db:
        export = await db.gdpr.export(dana_id)
    say(f"subject export of Dana by the owner: profile {export['profile']['email']!r}, "
        f"{len(export['memberships'])} membership, {len(export['workflows'])} workflow, "
        f"{len(export['consents'])} consent records, other: {sorted(export['other'])}")
    async with dl.session(owner) as db:
        erased = await db.gdpr.erase(dana_id)
    say(f"erasure in Wayne: {erased.affected}; profile erased: {erased.profile_erased} "
        f"(Dana belonged to no other organization), pseudonym {erased.pseudonym!r}")
    async with dl.system() as db:
        left = await db.connection.fetchval(
            "SELECT count(*) FROM users WHERE email = $1 OR display_name = 'Dana Scully'",
            dana_email)
    say(f"rows still holding Dana's email or name: {left}")
    say()


async def _stats_and_health(dl: DataLayer, out: TextIO) -> None:
    say = _printer(out)

    say("== Stats: the queries this demo ran, by total time; maintenance; health ==")
    figures = dl.metrics.snapshot()
    say(f"{len(figures)} registry queries ran, {sum(f.calls for f in figures)} executions")
    say(format_stats(await dl.stats(explain=False), top=8))
    results = await dl.maintain(["partitions", "notifications.expired", "web_sessions.sweep"])
    for r in results:
        say(f"maintain {r.job:22} {r.status:7} "
            + ", ".join(f"{k}={v}" for k, v in r.counts.items()))
    report = await dl.health()
    say(f"health: {'healthy' if report['ok'] else 'UNHEALTHY'}; database "
        f"{report['database'].get('latency_ms')} ms, migrations applied "
        f"{report['migrations'].get('applied')}, pool in use {report['pool'].get('in_use')}"
        f"/{report['pool'].get('size')}, oldest transaction "
        f"{report.get('transactions', {}).get('oldest_s')} s, replicas "
        f"{report.get('replication', {}).get('replicas')}")


async def _analytics_search(dl: DataLayer, out: TextIO) -> None:
    from datetime import UTC, datetime, timedelta

    from datalayer.repos.analytics import refresh_analytics

    say = _printer(out)
    run = uuid.uuid4().hex[:6]
    say("== Analytics and search: daily roll-ups as executions finish, a dashboard from "
        "materialized views, tenant-scoped search ==")
    org_id, owner_id = uuid.uuid4(), uuid.uuid4()
    owner = Context(org_id, user_id=owner_id, role="owner", request_id=f"demo-{run}")
    node = [{"id": "a", "type": "code"}]
    async with dl.session(owner) as db:
        await db.orgs.create(slug=f"vandelay-{run}", name="Vandelay")
        await db.users.create(email=f"owner-{run}@vandelay.example")
        await db.memberships.add(owner_id, "owner")
        sync = await db.workflows.create("Invoice sync to ledger", nodes=node,
                                         description="copies paid invoices into the ledger")
        alert = await db.workflows.create("Slack alert on failed payment", nodes=node,
                                          tags=["payments", "chat"])
        for wf, n in ((sync.id, 6), (alert.id, 4)):
            for _ in range(n):
                await db.executions.enqueue(wf)
    async with dl.session(owner) as db:  # a worker of this organization only
        for k, ex in enumerate(await db.executions.claim(f"demo-{run}", limit=10)):
            if k % 3 == 2:
                await db.executions.fail(ex, error="ledger API answered 503 Service Unavailable")
            else:
                await db.executions.complete(ex)
    await refresh_analytics(dl)  # the maintenance job (CONCURRENTLY: readers never wait)
    async with dl.session(owner, readonly=True) as db:
        d = await db.analytics.dashboard(days=7)
        one = await db.analytics.workflow_range(sync.id, d.from_day, d.to_day)
        hits = await db.search.query("ledg")
        fuzzy = await db.search.query("invoce sync")
    t = d.totals
    say(f"last 7 days: {t.executions} executions, {t.successes} succeeded, {t.failures} "
        f"failed; p95 {t.p95_duration_ms or 0:.1f} ms")
    say(f"per day: {[(x.day.isoformat(), x.executions) for x in d.per_day]}; busiest UTC "
        f"hour: {d.busiest_hours[0].hour if d.busiest_hours else '-'}")
    say(f"top failing: {[(f.name, f.failures) for f in d.top_failing]}; "
        f"{sync.name!r} alone: {one.executions} runs, {one.failures} failed")
    say(f"search 'ledg' (prefix): {[(h.kind, h.snippet) for h in hits]}")
    say(f"search 'invoce sync' (typos, {'pg_trgm' if dl.search_fuzzy else 'no pg_trgm'}): "
        f"{[(h.kind, h.title, round(h.rank, 2)) for h in fuzzy]}")
    async with dl.session(Context(None), readonly=True) as db:
        say(f"the same search without a tenant context: {await db.search.query('ledg')}")
    async with dl.system() as db:
        from datalayer.repos.metrics import Point

        now = datetime.now(UTC)
        await db.metrics.record([Point("demo.search_ms", 1.0 + k % 3, now - timedelta(
            seconds=k), {"run": run}) for k in range(60)])
        s = await db.metrics.series("demo.search_ms", labels={"run": run},
                                    start=now - timedelta(minutes=5))
    say(f"system metric demo.search_ms over 5 minutes at {s.resolution!r}: "
        f"{sum(b.count for b in s.buckets)} points in {len(s.buckets)} buckets")
    say()


async def _plugins(dl: DataLayer, out: TextIO) -> None:
    from datetime import timedelta

    from datalayer.core.errors import DataLayerError
    from datalayer.resolver import ResolutionConflict

    say = _printer(out)
    run = uuid.uuid4().hex[:6]
    say("== Plugins: SemVer catalog, dependency resolution, approvals, policies, exemptions ==")
    pub = Context(uuid.uuid4(), user_id=uuid.uuid4(), role="owner")
    use = Context(uuid.uuid4(), user_id=uuid.uuid4(), role="owner")
    for ctx, slug, name in ((pub, f"plugsmith-{run}", "Plugsmith"),
                            (use, f"pluguser-{run}", "Plug User")):
        async with dl.session(ctx) as db:
            await db.orgs.create(slug=slug, name=name)
            await db.users.create(email=f"owner-{slug}@plugins.example")
            await db.memberships.add(ctx.user_id, "owner")  # type: ignore[arg-type]

    def manifest(name: str) -> dict[str, object]:
        return {"name": name, "entry_point": f"{name.replace('-', '_')}.main:run",
                "permissions": ["http:execute"],
                "config_schema": {"type": "object", "required": ["endpoint"],
                                  "properties": {"endpoint": {"type": "string"},
                                                 "api_key": {"type": "string",
                                                             "secret": True}}}}

    checksum = "sha256:" + "0" * 64
    versions: dict[str, uuid.UUID] = {}
    async with dl.session(pub) as db:
        http = await db.plugins.create(f"http-core-{run}", summary="HTTP client core",
                                       visibility="public", license="MIT")
        crm = await db.plugins.create(f"crm-sync-{run}", summary="Sync CRM contacts",
                                      visibility="public", license="MIT", tags=["crm"])
        for v in ("1.0.0", "1.4.2", "2.0.0", "2.1.0-beta.1"):
            pv = await db.plugins.publish_version(http.id, v, manifest(http.name),
                                                  checksum=checksum, size_bytes=4096)
            versions[f"http {v}"] = (await db.plugins.approve_version(pv.id)).id
        for v, rng in (("1.0.0", "^1.2"), ("1.1.0", "~1.4"), ("2.0.0", ">=2.0 <3.0")):
            pv = await db.plugins.publish_version(crm.id, v, manifest(crm.name),
                                                  checksum=checksum, size_bytes=2048,
                                                  dependencies={http.id: rng})
            versions[f"crm {v}"] = (await db.plugins.approve_version(pv.id)).id
        for p in (http, crm):
            await db.plugins.set_status(p.id, "in_review")
            await db.plugins.set_status(p.id, "approved")
        ordered = [x.version for x in await db.plugins.versions(http.id)]
    say(f"published {http.name} {ordered} (SQL orders them by SemVer precedence)")
    say(f"published {crm.name}: 1.0.0 needs ^1.2, 1.1.0 needs ~1.4, 2.0.0 needs >=2.0 <3.0")
    async with dl.session(use, readonly=True) as db:
        hits = (await db.plugins.search("crm contacts")).items
        say(f"Plug User searches 'crm contacts': {[h.name for h in hits]}")
        res = await db.plugins.resolve({crm.id: "^1"})
        say(f"resolve {crm.name} ^1: {[(r.plugin_name, r.version) for r in res.installs]}")
        try:
            await db.plugins.resolve({crm.id: "^1", http.id: "^2"})
        except ResolutionConflict as exc:
            say(f"resolve {crm.name} ^1 with {http.name} ^2: conflict:")
            for c in exc.constraints:
                say(f"    {c}")
    v_crm = versions["crm 1.1.0"]
    async with dl.session(use) as db:
        security = await db.plugins.add_stage(1, "security review", required_role="admin",
                                              environments=["staging", "production"])
        admin_stage = await db.plugins.add_stage(2, "admin sign-off", required_role="owner",
                                                 environments=["production"])
        await db.plugins.set_policy("license_allowlist", licenses=["Apache-2.0"])
        await db.plugins.set_policy("no_critical_vulnerability")
        say("Plug User: stages [security review -> admin sign-off], policies "
            "[license_allowlist (Apache-2.0), no_critical_vulnerability]")
        for stage in (security, admin_stage):
            d = await db.plugins.decide(crm.id, v_crm, stage.id, "approved")
            say(f"stage {stage.name!r}: {d.decision} by role {d.decided_role}")
    try:
        async with dl.session(use) as db:
            await db.plugins.install(crm.id, v_crm, "production",
                                     config={"endpoint": "https://crm.example"},
                                     secrets={"api_key": "sk-demo"})
    except DataLayerError as exc:
        say(f"install {crm.name} 1.1.0 in production: {type(exc).__name__}: {exc}")
    async with dl.session(use) as db:
        ex = await db.plugins.grant_exemption(crm.id, "license_allowlist",
                                              "legal reviewed the MIT license for this plugin",
                                              ttl=timedelta(days=30))
        say(f"exemption for license_allowlist until {ex.expires_at:%Y-%m-%d} "
            f"(approved by the owner; expires by itself)")
        inst = await db.plugins.install(crm.id, v_crm, "production",
                                        config={"endpoint": "https://crm.example"},
                                        secrets={"api_key": "sk-demo"})
        say(f"installed {crm.name} {inst.version} in production, config={inst.config}, "
            f"secrets encrypted (id {inst.secret_id})")
        history = await db.plugins.deployments(crm.id, "production")
        say(f"deployment records: {[d.action for d in history]}")
    say()


async def _digitwin(dl: DataLayer, out: TextIO) -> None:
    from datalayer.core.errors import LimitExceeded

    say = _printer(out)

    run = uuid.uuid4().hex[:6]
    say("== DigiTwin: voice and face models, knowledge documents, search, a conversation ==")
    me = Context(uuid.uuid4(), user_id=uuid.uuid4(), role="owner", request_id=f"demo-{run}")
    async with dl.session(me) as db:
        await db.orgs.create(slug=f"twin-{run}", name="Twin Labs")
        await db.users.create(email=f"ada-{run}@twin.example", display_name="Ada")
        await db.memberships.add(me.user_id, "owner")  # type: ignore[arg-type]
        profile = await db.models.set_profile(
            personality_traits=["curious", "direct", "warm"],
            conversation_preferences={"tone": "casual", "language": "en"})
        say(f"Ada's twin profile: traits {profile.personality_traits}, "
            f"tier {profile.subscription_tier}")
        models = {}
        for kind, provider in (("voice", "elevenlabs"), ("face", "heygen")):
            m = await db.models.create(kind, provider=provider, name=f"{kind} v1",
                                       storage_uri=f"s3://twin-models/{run}/{kind}-v1.bin")
            await db.models.set_status(m.id, "training")
            m = await db.models.set_status(m.id, "ready", quality_metrics={"score": 0.91})
            models[kind] = await db.models.activate(m.id)
            say(f"{kind} model {m.name!r} ({provider}) is ready and active; the row keeps "
                f"{m.storage_uri}, never the weights")
    # Free tier: 2 models. A third one is refused by the database, naming the limit.
    try:
        async with dl.session(me) as db:
            await db.models.create("voice", provider="elevenlabs", name="voice v2",
                                   storage_uri=f"s3://twin-models/{run}/voice-v2.bin")
    except LimitExceeded as exc:
        say(f"a third model on the free tier: {exc.constraint}: {exc.message}")
    async with dl.system() as db:  # billing upgrades the user: the tier is not theirs to set
        await db.users.update_profile(me.user_id, subscription_tier="pro")  # type: ignore[arg-type]
    async with dl.session(me) as db:
        v2 = await db.models.create("voice", provider="elevenlabs", name="voice v2",
                                    storage_uri=f"s3://twin-models/{run}/voice-v2.bin")
        await db.models.set_status(v2.id, "training")
        await db.models.set_status(v2.id, "ready", quality_metrics={"score": 0.95})
        await db.models.activate(v2.id)
        active = await db.models.active("voice")
        old = await db.models.get(models["voice"].id)
    say(f"upgraded to pro and switched voices: active is now {active.name if active else None!r}"
        f", {old.name if old else None!r} is inactive ({old.is_active if old else None})")
    docs = {
        "Product roadmap": ("The roadmap for spring: ship the voice engine, cut first-answer "
                            "latency below 800 ms, and open the beta to fifty customers."),
        "Family recipes": ("Grandma's bread: flour, water, salt and a long, patient rise. "
                           "Bake hot, then let it rest before slicing."),
    }
    async with dl.session(me) as db:
        for title, text in docs.items():
            got = await db.knowledge.create(title, content=text)
            say(f"document {title!r}: {got.document.status}, {got.document.size_bytes} bytes")
        again = await db.knowledge.create("Roadmap copy", content=docs["Product roadmap"])
        say(f"the same content again is not stored twice: created={again.created}, "
            f"returned {again.document.title!r}")
    async with dl.system() as db:  # a worker, across tenants
        claimed = await db.knowledge.claim(f"demo-worker-{run}", limit=10, org_id=me.org_id)
        for d in claimed:
            sentences = [s.strip() + "." for s in (d.content or "").split(".") if s.strip()]
            n = await db.knowledge.store_chunks(d.id, f"demo-worker-{run}", sentences,
                                                org_id=d.org_id)
            say(f"worker split {d.title!r} into {n} chunks and marked it ready")
    async with dl.session(me) as db:
        hits = await db.knowledge.search("voice latency roadmap", limit=3)
        for h in hits:
            say(f"search hit in {h.title!r} (rank {h.rank:.3f}): {h.snippet}")
        conv = await db.conversations.start(channel="voice", title="Planning chat")
        await db.conversations.append_turn(
            conv.id, input_text="What is on the spring roadmap?",
            response_text="Shipping the voice engine and getting latency under 800 ms.",
            asr_ms=140, retrieval_ms=22, llm_ms=610, tts_ms=190, tokens_in=31, tokens_out=48,
            source_chunk_ids=[h.chunk_id for h in hits if h.chunk_id is not None])
        await db.conversations.append_turn(
            conv.id, input_text="And who gets the beta?",
            response_text="Fifty customers, when the beta opens.", asr_ms=120,
            retrieval_ms=18, llm_ms=420, tts_ms=150, tokens_in=22, tokens_out=19,
            source_chunk_ids=[hits[0].chunk_id] if hits and hits[0].chunk_id else [])
        view = await db.conversations.with_turns(conv.id, turns=50)
    if view is not None:
        s = view.session
        say(f"session {s.title!r} ({s.channel}, voice model {s.voice_model_id == v2.id and 'v2'})"
            f": {s.turn_count} turns, avg {s.avg_latency_ms:.0f} ms, p95 {s.p95_latency_ms} ms, "
            f"{s.tokens_in}/{s.tokens_out} tokens")
        for t in view.turns:
            say(f"  turn: {t.input_text!r} -> {t.response_text!r} "
                f"(total {t.total_ms} ms, cites chunks {t.source_chunk_ids})")
    say()
