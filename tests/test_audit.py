"""Audit trail: change capture, explicit events, append-only, hash chains and tampering,
redaction, retention, reports (schema/0015_audit.sql, datalayer/repos/audit.py)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from datalayer import Context, DataLayer
from datalayer.core.errors import DataLayerError, PermissionDenied, ValidationError
from datalayer.repos.audit import (
    GLOBAL_ORG,
    Anchor,
    anchor,
    audit_retention,
    compliance_report,
    verify_chain,
)
from tests.conftest import MemberFactory, TenantFactory

PASSWORD = "correct horse battery staple 1"


async def _tamper(admin_conn: asyncpg.Connection, sql: str, *args: object) -> str:
    """Run ``sql`` with triggers off (the maintenance role's power over its own tables)."""
    async with admin_conn.transaction():
        await admin_conn.execute("SET LOCAL session_replication_role = replica")
        status: str = await admin_conn.execute(sql, *args)
    return status


# -- change capture -------------------------------------------------------------------------------

async def test_update_has_one_change_row_with_only_changed_columns(
        dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    ctx = t.owner.with_(request_id="req-capture-1")
    async with dl.session(ctx) as db:
        team = await db.teams.create("Ops", "first")
        await db.teams.rename(team.id, description="second")
    async with dl.session(t.owner, readonly=True) as db:
        page = await db.audit.changes_for("teams", {"org_id": t.org_id, "id": team.id})
    upd, ins = page.items
    assert (ins.op, upd.op) == ("INSERT", "UPDATE")
    # (updated_at = now() is the transaction's time: unchanged within one transaction)
    assert upd.changed_columns == ["description"]
    assert upd.before == {"description": "first"} and upd.after == {"description": "second"}
    assert ins.after is not None and ins.after["name"] == "Ops" and ins.before is None
    assert upd.actor_user_id == t.owner_id and upd.request_id == "req-capture-1"
    assert upd.seq == ins.seq + 1


async def test_bulk_update_yields_one_change_row_per_row(
        dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        await db.connection.execute(
            "INSERT INTO teams (org_id, name) SELECT $1, 'team ' || g "
            "FROM generate_series(1, 60) g", t.org_id)
        status = await db.connection.execute(
            "UPDATE teams SET description = 'bulk' WHERE org_id = $1", t.org_id)
    assert status == "UPDATE 60"
    async with dl.system() as db:
        rows = await db.connection.fetch(
            "SELECT op, seq, after FROM data_changes WHERE org_id = $1 AND table_name = 'teams' "
            "ORDER BY seq", t.org_id)
    updates = [r for r in rows if r["op"] == "UPDATE"]
    assert len(updates) == 60 and all(r["after"]["description"] == "bulk" for r in updates)
    assert len({r["seq"] for r in rows}) == len(rows) == 120
    assert (await verify_chain(dl, t.org_id)).ok


HEAD_UPDATES = ("SELECT n_tup_upd FROM pg_stat_xact_all_tables "
                "WHERE schemaname = 'app' AND relname = 'audit_heads'")
TEAMS = ("INSERT INTO teams (org_id, name) SELECT $1, $2 || g "
         "FROM generate_series($3::int, $4::int) g")


async def test_a_bulk_statement_moves_the_chain_head_once_not_per_row(
        dl: DataLayer, make_tenant: TenantFactory) -> None:
    """Every change used to update the head row: n versions of it in one transaction, and
    every later change walked them (8,000 workflows in one statement took 6.7 s, 100,000
    about 20 minutes). Now the first change moves it, the rest at commit."""
    t = await make_tenant()
    before = (await verify_chain(dl, t.org_id)).heads["changes"]
    async with dl.session(t.owner) as db:
        # (the backend's counts include earlier transactions not yet reported: a difference)
        start = await db.connection.fetchval(HEAD_UPDATES)
        await db.connection.execute(TEAMS, t.org_id, "team ", 1, 400)
        await db.connection.execute("UPDATE teams SET description = 'bulk' WHERE org_id = $1",
                                    t.org_id)
        assert await db.connection.fetchval(HEAD_UPDATES) - start == 1
    report = await verify_chain(dl, t.org_id)
    assert report.ok, report.problems
    assert report.heads["changes"] == report.rows["changes"] == before + 800


class _Undo(Exception):
    pass


async def test_chain_stays_whole_across_savepoints_early_checks_and_a_forged_tail(
        dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    before = (await verify_chain(dl, t.org_id)).heads["changes"]
    async with dl.session(t.owner) as db:
        conn = db.connection
        await conn.execute(TEAMS, t.org_id, "a", 1, 20)
        newest = await conn.fetchval("SELECT max(seq) FROM data_changes WHERE org_id = $1",
                                     t.org_id)
        # The session can set the tail hint; a false one (a row past the head that is not
        # the newest, one that does not exist, another organization's) is not followed.
        for i, seq in enumerate((newest - 5, newest + 1000, newest)):
            org = uuid.uuid4() if i == 2 else t.org_id
            await conn.execute("SELECT set_config('app.audit_changes_tail', $1, true)",
                               f"{org}/{seq}")
            await conn.execute(TEAMS, t.org_id, f"d{i}-", 1, 3)
        with pytest.raises(_Undo):
            async with db.savepoint():  # its rows, their head events and its tail go back
                await conn.execute(TEAMS, t.org_id, "b", 1, 20)
                raise _Undo
        await conn.execute("SET CONSTRAINTS ALL IMMEDIATE")  # the head moves now ...
        await conn.execute(TEAMS, t.org_id, "c", 1, 20)     # ... and after each change
        await conn.execute("SET CONSTRAINTS ALL DEFERRED")
        await conn.execute(TEAMS, t.org_id, "e", 1, 20)
    report = await verify_chain(dl, t.org_id)
    assert report.ok, report.problems
    assert report.heads["changes"] == report.rows["changes"] == before + 20 + 9 + 20 + 20


async def test_interleaved_organizations_and_concurrent_bulk_writers_keep_their_chains(
        dl: DataLayer, make_tenant: TenantFactory) -> None:
    a, b = await make_tenant(), await make_tenant()
    start = {t.org_id: (await verify_chain(dl, t.org_id)).heads["changes"] for t in (a, b)}
    async with dl.system() as db:  # one statement alternating between two organizations
        await db.connection.execute(
            "INSERT INTO teams (org_id, name) SELECT CASE WHEN g % 2 = 0 THEN $1::uuid "
            "ELSE $2::uuid END, 'mixed ' || g FROM generate_series(1, 60) g",
            a.org_id, b.org_id)

    async def writer(i: int) -> None:
        async with dl.session(a.owner) as db:
            await db.connection.execute(TEAMS, a.org_id, f"w{i}-", 1, 50)

    await asyncio.gather(*(writer(i) for i in range(4)))
    for t, added in ((a, 30 + 200), (b, 30)):
        report = await verify_chain(dl, t.org_id)
        assert report.ok, report.problems
        assert report.heads["changes"] == report.rows["changes"] == start[t.org_id] + added


async def test_skipped_columns_are_listed_without_values_and_noop_updates_write_nothing(
        dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        conn = db.connection
        wid = await conn.fetchval(
            "INSERT INTO workflows (org_id, name, owner_id) VALUES ($1, 'alpha', $2) "
            "RETURNING id", t.org_id, t.owner_id)
        await conn.execute("UPDATE workflows SET name = 'beta' WHERE org_id = $1 AND id = $2",
                           t.org_id, wid)
        await conn.execute("UPDATE teams SET description = description WHERE org_id = $1",
                           t.org_id)
        await conn.execute("UPDATE workflows SET name = name WHERE org_id = $1", t.org_id)
    async with dl.system() as db:
        rows = await db.connection.fetch(
            "SELECT op, changed_columns, before, after FROM data_changes "
            "WHERE org_id = $1 AND table_name = 'workflows' ORDER BY seq", t.org_id)
    assert [r["op"] for r in rows] == ["INSERT", "UPDATE"]
    ins, upd = rows
    # The generated search vector is listed (it changed) but never copied.
    assert {"search", "name", "nodes"} <= set(ins["changed_columns"])
    assert "search" not in ins["after"] and ins["after"]["name"] == "alpha"
    assert upd["changed_columns"] == ["name", "search"]
    assert upd["before"] == {"name": "alpha"} and upd["after"] == {"name": "beta"}
    assert (await verify_chain(dl, t.org_id)).ok


async def test_update_capture_compares_each_column_by_its_type(
        dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory) -> None:
    """The compiled per-column comparisons: an array column (compared as text), a jsonb
    column rewritten with another key order (equal: nothing written), a secret-only change
    (named, no values), and a personal column split out of before/after."""
    t = await make_tenant()
    member = await add_member(t, "member")
    uid = member.user_id
    async with dl.system() as db:
        conn = db.connection
        await conn.execute("UPDATE users SET preferences = '{\"a\": 1, \"b\": 2}', "
                           "personality_traits = '{calm}' WHERE id = $1", uid)
        start = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM data_changes "
                                    "WHERE org_id = $1", GLOBAL_ORG)
        for sql in ("UPDATE users SET preferences = '{\"b\": 2, \"a\": 1}' WHERE id = $1",
                    "UPDATE users SET personality_traits = '{calm,kind}' WHERE id = $1",
                    "UPDATE users SET password_hash = 'not-a-real-hash' WHERE id = $1",
                    "UPDATE users SET subscription_tier = 'pro', first_name = 'Zed' "
                    "WHERE id = $1"):
            await conn.execute(sql, uid)
        rows = await conn.fetch(
            "SELECT changed_columns, before, after, personal, pii_salt IS NOT NULL AS salted "
            "FROM data_changes WHERE org_id = $1 AND table_name = 'users' AND seq > $2 "
            "AND row_pk = jsonb_build_object('id', $3::uuid) ORDER BY seq",
            GLOBAL_ORG, start, uid)
    assert [r["changed_columns"] for r in rows] == [
        ["personality_traits"], ["password_hash"], ["first_name", "subscription_tier"]]
    traits, secret, tier = rows
    assert traits["personal"] == {"before": {"personality_traits": ["calm"]},
                                  "after": {"personality_traits": ["calm", "kind"]}}
    assert traits["salted"] and traits["before"] == {} and traits["after"] == {}
    assert secret["before"] is None and secret["after"] is None
    assert secret["personal"] is None and not secret["salted"]
    assert tier["before"] == {"subscription_tier": "free"}
    assert tier["after"] == {"subscription_tier": "pro"}
    assert tier["personal"] == {"before": {}, "after": {"first_name": "Zed"}}  # was NULL
    assert (await verify_chain(dl, GLOBAL_ORG)).ok


async def test_secret_values_never_reach_change_rows(
        dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
        admin_conn: asyncpg.Connection) -> None:
    t = await make_tenant()
    member = await add_member(t, "member", password=PASSWORD)
    async with dl.session(member) as db:
        await db.api_keys.create("ci")
        await db.auth.enable_2fa(account="m@example.test")
        await db.credentials.create("db", "basic", {"username": "u", "password": "hunter22"})
    async with dl.session(t.owner) as db:
        await db.auth.invite("new-person@example.test", "member")
        wf = await db.workflows.create("wf")
        await db.webhooks.create(wf.id, name="hook")
    # Every value of every registered secret column (hashes, ciphertexts, PHC strings)...
    secrets: set[str] = set()
    cols = await admin_conn.fetch(
        "SELECT table_name, column_name FROM app.secret_columns "
        "UNION SELECT table_name, column_name FROM app.encrypted_columns")
    assert len(cols) >= 9
    for c in cols:
        if await admin_conn.fetchval("SELECT to_regclass($1)", f"public.{c['table_name']}") \
                is None:
            continue
        for (v,) in await admin_conn.fetch(
                f'SELECT "{c["column_name"]}"::text FROM "{c["table_name"]}" '
                f'WHERE "{c["column_name"]}" IS NOT NULL'):
            secrets.add(v)
            if v.startswith("\\x"):
                secrets.add(v[2:])  # hex without the prefix
            if v.startswith("{"):  # arrays: each element
                secrets.update(x for x in v.strip("{}").split(",") if len(x) > 8)
    assert len(secrets) > 5
    changes = await admin_conn.fetch(
        "SELECT table_name, coalesce(before::text, '') || coalesce(after::text, '') "
        "|| coalesce(personal::text, '') AS body, before, after FROM data_changes")
    assert changes
    names = {(c["table_name"], c["column_name"]) for c in cols}
    for ch in changes:
        leaked = [s for s in secrets if s in ch["body"]]
        assert not leaked, (ch["table_name"], "secret value copied")
        for side in (ch["before"], ch["after"]):
            assert not {(ch["table_name"], k) for k in (side or {})} & names
    assert "hunter22" not in "".join(ch["body"] for ch in changes)


# -- explicit events ------------------------------------------------------------------------------

async def test_login_failures_lockout_and_success_are_audited(
        dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory) -> None:
    t = await make_tenant()
    email = f"login-{uuid.uuid4().hex[:8]}@example.test"
    member = await add_member(t, "member", password=PASSWORD, email=email)
    assert member.user_id is not None
    anon = Context(None, ip="203.0.113.9", user_agent="pytest-agent/1", request_id="r-login")
    async with dl.session(anon) as db:
        for _ in range(5):
            await db.auth.login(email, "wrong password")
    async with dl.session(anon) as db:
        await db.auth.login("nobody-" + email, "x")
    await asyncio.sleep(1.1)
    async with dl.session(anon) as db:
        assert (await db.auth.login(email, PASSWORD)).ok
    async with dl.session(t.owner, readonly=True) as db:
        events = (await db.audit.events_about(member.user_id)).items
        now = datetime.now(UTC)
        failed = await db.audit.report("failed_logins", from_at=now - timedelta(hours=1),
                                       to_at=now + timedelta(hours=1))
    actions = [(e.action, e.result) for e in reversed(events)]
    assert actions.count(("auth.login", "failure")) == 5
    assert ("auth.lockout", "success") in actions and actions[-1] == ("auth.login", "success")
    fail = next(e for e in events if e.result == "failure")
    assert (str(fail.ip), fail.user_agent, fail.request_id) == \
        ("203.0.113.9", "pytest-agent/1", "r-login")
    assert fail.risk == "medium" and "SOX" in fail.frameworks
    lock = next(e for e in events if e.action == "auth.lockout")
    assert lock.risk == "high"
    assert {e.id for e in failed} >= {e.id for e in events if e.result == "failure"}
    assert all(e.org_id == t.org_id for e in failed)


async def test_role_changes_api_keys_and_decrypts_are_audited(
        dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory) -> None:
    t = await make_tenant()
    member = await add_member(t, "member")
    assert member.user_id is not None
    owner = t.owner.with_(ip="198.51.100.7", user_agent="ua-owner", request_id="r-1")
    async with dl.session(owner) as db:
        await db.memberships.set_role(member.user_id, "admin")
        cred = await db.credentials.create("db", "basic", {"username": "u", "password": "p"})
        key = await db.api_keys.create("deploy")
    async with dl.session(owner) as db:
        await db.credentials.decrypt(cred.id)
    async with dl.session(Context(None)) as db:
        assert await db.api_keys.verify(key.secret) is not None
    async with dl.session(t.owner, readonly=True) as db:
        role = (await db.audit.by_resource("membership", member.user_id)).items
        dec = (await db.audit.by_resource("credential", cred.id)).items
        used = (await db.audit.by_resource("api_key", key.key.id)).items
        now = datetime.now(UTC)
        perms = await db.audit.report("permission_changes", from_at=now - timedelta(hours=1),
                                      to_at=now + timedelta(hours=1), framework="SOX")
        sensitive = await db.audit.report("sensitive_access",
                                          from_at=now - timedelta(hours=1),
                                          to_at=now + timedelta(hours=1), framework="HIPAA")
    rc = next(e for e in role if e.action == "membership.role_changed")
    assert rc.details == {"role": "admin"} and rc.subject_user_id == member.user_id
    assert (rc.actor_user_id, str(rc.ip), rc.user_agent, rc.request_id) == \
        (t.owner_id, "198.51.100.7", "ua-owner", "r-1")
    assert rc.risk == "high"
    assert [e.action for e in dec] == ["credential.decrypt"] and dec[0].risk == "high"
    assert {"credential.decrypt"} == {e.action for e in sensitive}
    assert {e.action for e in used} == {"api_key.used", "api_key.created"}
    assert {"membership.role_changed", "api_key.created"} <= {e.action for e in perms}
    report = await compliance_report(dl, t.org_id, from_at=now - timedelta(hours=1),
                                     to_at=now + timedelta(hours=1))
    assert [e.id for e in report["sensitive_access"]] == [dec[0].id]
    assert any(e.action == "credential.decrypt" for e in report["high_risk"])


async def test_record_checks_and_context_columns(dl: DataLayer, make_tenant: TenantFactory
                                                 ) -> None:
    t = await make_tenant()
    async with dl.session(t.owner.with_(user_agent="ua-ctx")) as db:
        e = await db.audit.record("data.export", resource_type="workflow", resource_id="w1",
                                  details={"format": "json"}, personal={"email": "x@y.z"})
        assert e.user_agent == "ua-ctx" and e.risk == "high"
        assert sorted(e.frameworks) == ["GDPR", "HIPAA"]
        with pytest.raises(ValidationError):
            await db.audit.record("data.export", org_id=uuid.uuid4())
        with pytest.raises(ValidationError):
            await db.audit.record("nodot")
    async with dl.system() as db:
        g = await db.audit.record("security.key_rotated", org_id=GLOBAL_ORG, ip="10.1.2.3")
        assert g.risk == "critical" and str(g.ip) == "10.1.2.3"


# -- isolation and append-only --------------------------------------------------------------------

async def test_other_tenant_no_context_and_viewers_read_nothing(
        dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory) -> None:
    a, b = await make_tenant(), await make_tenant()
    viewer = await add_member(a, "viewer")
    async with dl.session(a.owner) as db:
        await db.audit.record("data.export", resource_type="thing", resource_id="1")
    for ctx in (b.owner, Context(None), viewer):
        async with dl.session(ctx, readonly=True) as db:
            assert await db.connection.fetchval(
                "SELECT count(*) FROM audit_events WHERE org_id = $1", a.org_id) == 0
            assert await db.connection.fetchval(
                "SELECT count(*) FROM data_changes WHERE org_id = $1", a.org_id) == 0
            page = await db.audit.by_resource("thing", "1", org_id=a.org_id)
            assert page.items == []
    async with dl.session(a.owner, readonly=True) as db:
        assert await db.connection.fetchval("SELECT count(*) FROM data_changes") > 0
    with pytest.raises((PermissionDenied, asyncpg.InsufficientPrivilegeError)):
        async with dl.session(b.owner) as db:  # writing into A's chain
            await db.connection.execute(
                "INSERT INTO audit_events (org_id, action) VALUES ($1, 'x.y')", a.org_id)


@pytest.mark.parametrize("sql", [
    "UPDATE audit_events SET result = 'failure'",
    "DELETE FROM audit_events",
    "TRUNCATE audit_events",
    "UPDATE data_changes SET op = 'DELETE'",
    "DELETE FROM data_changes",
    "TRUNCATE data_changes",
    "SELECT set_config('app.audit_bypass', 'redact', true); UPDATE audit_events SET ip = NULL",
    "SELECT set_config('app.audit_bypass', 'retention', true); DELETE FROM data_changes",
    "SELECT app.audit_redact_subject(app.org_id(), app.user_id())",
    "SELECT app.audit_retention_delete(app.org_id(), 'audit_events', 100, 100)",
    "UPDATE app.audit_heads SET seq = 0",
])
async def test_app_role_cannot_change_audit_rows(
        sql: str, dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        await db.audit.record("data.export")
    with pytest.raises((PermissionDenied, asyncpg.InsufficientPrivilegeError)):
        async with dl.session(t.owner) as db:
            await db.connection.execute(sql)


async def test_bypass_flag_is_honoured_only_for_the_maintenance_role(
        dl: DataLayer, make_tenant: TenantFactory, admin_conn: asyncpg.Connection) -> None:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        await db.audit.record("data.export")
    # A role with the privilege (the superuser) is still refused by the trigger.
    async with admin_conn.transaction():
        await admin_conn.execute("SELECT set_config('app.audit_bypass', 'redact', true)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await admin_conn.execute("UPDATE audit_events SET ip = NULL WHERE org_id = $1",
                                     t.org_id)


# -- the chain ------------------------------------------------------------------------------------

async def _busy_tenant(dl: DataLayer, make_tenant: TenantFactory, n: int = 6) -> uuid.UUID:
    t = await make_tenant()
    async with dl.session(t.owner) as db:
        for i in range(n):
            await db.audit.record("data.export", resource_type="doc", resource_id=str(i),
                                  personal={"email": f"p{i}@example.test"})
            await db.teams.create(f"team {i}")
    return t.org_id


async def test_concurrent_writers_produce_a_gap_free_valid_chain(
        dl: DataLayer, make_tenant: TenantFactory) -> None:
    t = await make_tenant()

    async def writer(i: int) -> None:
        async with dl.session(t.owner.with_(request_id=f"w{i}")) as db:
            for j in range(4):
                await db.audit.record("data.export", resource_id=f"{i}-{j}")
                await db.teams.create(f"t{i}-{j}")

    await asyncio.gather(*(writer(i) for i in range(8)))
    report = await verify_chain(dl, t.org_id)
    assert report.ok, report.problems
    # 32 and the owner's membership.added
    assert report.rows["events"] == 33 and report.heads["events"] == 33
    assert report.rows["changes"] >= 32


async def test_edited_row_is_detected(dl: DataLayer, make_tenant: TenantFactory,
                                      admin_conn: asyncpg.Connection) -> None:
    org = await _busy_tenant(dl, make_tenant)
    assert (await verify_chain(dl, org)).ok
    await _tamper(admin_conn, "UPDATE audit_events SET details = '{\"format\": \"csv\"}' "
                              "WHERE org_id = $1 AND seq = 3", org)
    await _tamper(admin_conn, "UPDATE data_changes SET after = after || '{\"name\": \"evil\"}' "
                              "WHERE org_id = $1 AND seq = 2", org)
    await _tamper(admin_conn, "UPDATE audit_events SET personal = '{\"email\": \"z@z.z\"}' "
                              "WHERE org_id = $1 AND seq = 5", org)
    report = await verify_chain(dl, org)
    assert report.problems == ["changes: seq 2 was altered", "events: seq 3 was altered",
                               "events: seq 5 was altered"]


async def test_deleted_row_and_gap_are_detected(dl: DataLayer, make_tenant: TenantFactory,
                                                admin_conn: asyncpg.Connection) -> None:
    org = await _busy_tenant(dl, make_tenant)
    await _tamper(admin_conn, "DELETE FROM audit_events WHERE org_id = $1 AND seq = 2", org)
    report = await verify_chain(dl, org)
    assert report.problems == ["events: gap, seq 2..2 missing"]
    # re-linking the chain over the hole (renumbering) still fails: the hashes cover seq
    await _tamper(admin_conn, "UPDATE audit_events SET seq = seq - 1, prev_hash = "
                              "(SELECT row_hash FROM audit_events WHERE org_id = $1 AND seq = 1)"
                              " WHERE org_id = $1 AND seq = 3", org)
    report = await verify_chain(dl, org)
    assert "events: seq 2 was altered" in report.problems


async def test_truncated_newest_rows_are_detected_against_an_anchor(
        dl: DataLayer, make_tenant: TenantFactory, admin_conn: asyncpg.Connection) -> None:
    org = await _busy_tenant(dl, make_tenant)
    saved = await anchor(dl, org)
    assert Anchor.loads(saved.dumps()) == saved and len(saved.digest) == 64
    assert (await verify_chain(dl, org, saved=saved)).ok
    # The newest rows go, and the head is rewound to match: consistent without the anchor.
    await _tamper(admin_conn, "DELETE FROM audit_events WHERE org_id = $1 AND seq > 4", org)
    await _tamper(admin_conn, "UPDATE app.audit_heads SET seq = 4, head = (SELECT row_hash "
                              "FROM audit_events WHERE org_id = $1 AND seq = 4) "
                              "WHERE org_id = $1 AND chain = 'events'", org)
    assert (await verify_chain(dl, org)).ok
    report = await verify_chain(dl, org, saved=saved)
    assert report.problems == [f"events: seq {saved.events_seq} of the saved anchor is missing "
                               "(the newest rows were truncated)"]
    # Without rewinding the head, truncation shows even without an anchor.
    await _tamper(admin_conn, "DELETE FROM data_changes WHERE org_id = $1 AND seq > 3", org)
    assert "changes: the chain ends at seq 3, its head says" in \
        " ".join((await verify_chain(dl, org)).problems)


# -- redaction ------------------------------------------------------------------------------------

async def test_redaction_removes_personal_data_and_keeps_the_chain(
        dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
        admin_conn: asyncpg.Connection) -> None:
    t = await make_tenant()
    email = f"subject-{uuid.uuid4().hex[:8]}@example.test"
    member = await add_member(t, "member", password=PASSWORD, email=email)
    assert member.user_id is not None
    async with dl.session(Context(None, ip="192.0.2.55", user_agent="subject-agent")) as db:
        await db.auth.login(email, "wrong")
    async with dl.session(member.with_(ip="192.0.2.55", user_agent="subject-agent")) as db:
        await db.users.update_profile(member.user_id, display_name="Subject Person")
        await db.audit.record("data.export", subject_user_id=member.user_id,
                              personal={"email": email})
    body = ("SELECT string_agg(coalesce(host(ip), '') || coalesce(user_agent, '') || "
            "coalesce(personal::text, ''), ' ') FROM audit_events WHERE org_id = ANY($1)")
    changes = ("SELECT string_agg(coalesce(before::text, '') || coalesce(after::text, '') || "
               "coalesce(personal::text, ''), ' ') FROM data_changes WHERE org_id = ANY($1)")
    orgs = [t.org_id, GLOBAL_ORG]
    assert email in (await admin_conn.fetchval(body, orgs) or "")
    assert "Subject Person" in await admin_conn.fetchval(changes, orgs)
    async with dl.system() as db:
        n = await db.audit.redact_subject(t.org_id, member.user_id)
    assert n >= 3
    for sql in (body, changes):
        text = await admin_conn.fetchval(sql, orgs) or ""
        for value in (email, "Subject Person", "192.0.2.55", "subject-agent"):
            assert value not in text
    for org in orgs:
        report = await verify_chain(dl, org)
        assert report.ok, report.problems
    # A "redacted" row whose personal fields were then forged fails verification.
    await _tamper(admin_conn, "UPDATE audit_events SET personal = '{\"email\": \"forged\"}' "
                              "WHERE org_id = $1 AND redacted_at IS NOT NULL", t.org_id)
    assert not (await verify_chain(dl, t.org_id)).ok


# -- retention ------------------------------------------------------------------------------------

class _Org:
    def __init__(self) -> None:
        self.org_id = uuid.uuid4()
        self.owner = Context(self.org_id, user_id=uuid.uuid4(), role="owner")


async def test_retention_removes_an_expired_prefix_logs_it_and_keeps_verification(
        dl: DataLayer, admin_conn: asyncpg.Connection) -> None:
    old, held = _Org(), _Org()  # organizations whose chains start with imported history
    for t in (old, held):
        for i in range(5):  # history imported by maintenance: 400 days old, no framework
            await admin_conn.execute(
                "INSERT INTO audit_events (org_id, action, at) "
                "VALUES ($1, 'legacy.event', now() - interval '400 days' + $2 * interval '1s')",
                t.org_id, i)
        await admin_conn.execute(
            "INSERT INTO audit_events (org_id, action, at) "
            "VALUES ($1, 'credential.decrypt', now() - interval '399 days')", t.org_id)
        await admin_conn.execute(
            "INSERT INTO audit_events (org_id, action) VALUES ($1, 'legacy.recent')", t.org_id)
    async with dl.session(held.owner) as db:
        assert await db.audit.set_legal_hold("litigation")
    async with dl.session(old.owner) as db:
        await db.audit.set_policy("NONE", "events", 30)
    result = await audit_retention(dl, batch=2)
    assert result["rows_deleted"] >= 5  # the 5 legacy rows; the SOX row stays 7 years
    async with dl.system() as db:
        remaining = await db.connection.fetch(
            "SELECT org_id, action FROM audit_events WHERE org_id = ANY($1) ORDER BY seq",
            [old.org_id, held.org_id])
    by_org = {o: [r["action"] for r in remaining if r["org_id"] == o]
              for o in (old.org_id, held.org_id)}
    assert len(by_org[held.org_id]) > len(by_org[old.org_id])
    assert by_org[old.org_id] == ["credential.decrypt", "legacy.recent"]
    assert (await verify_chain(dl, old.org_id)).ok
    assert (await verify_chain(dl, held.org_id)).ok
    async with dl.session(old.owner, readonly=True) as db:
        log = await db.audit.retention_log()
    assert sum(e.removed for e in log if e.table_name == "audit_events") == 5


async def test_sox_and_hipaa_retention_cannot_be_shortened(
        dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory) -> None:
    t = await make_tenant()
    member = await add_member(t, "member")
    with pytest.raises(DataLayerError):
        async with dl.session(t.owner) as db:
            await db.audit.set_policy("SOX", "events", 30)  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied):
        async with dl.session(member) as db:
            await db.audit.set_policy("GDPR", "events", 30)
    async with dl.session(t.owner) as db:
        p = await db.audit.set_policy("GDPR", "changes", 90)
        assert (p.org_id, p.keep_days) == (t.org_id, 90)
        p = await db.audit.set_policy("GDPR", "changes", 120)
        assert p.keep_days == 120


async def test_partition_maintenance_keeps_audit_rows_and_their_chain(
        dl: DataLayer, make_tenant: TenantFactory) -> None:
    org = await _busy_tenant(dl, make_tenant, n=2)
    async with dl.system() as db:
        await db.connection.execute("SELECT app.ensure_partitions(3)")
        dropped = await db.connection.fetch(
            "SELECT * FROM app.drop_partitions_before(date_trunc('month', now())::date)")
    assert not [r for r in dropped if str(r[0]).startswith(("audit_events", "data_changes"))]
    assert (await verify_chain(dl, org)).ok


async def test_cli_report_and_verify(dl: DataLayer, make_tenant: TenantFactory,
                                     database_url: str) -> None:
    from tests.test_cli import cli

    t = await make_tenant()
    async with dl.session(t.owner) as db:
        await db.audit.record("data.export", resource_type="workflow", resource_id="w9")
    out = await asyncio.to_thread(cli, "audit", "report", "--org", str(t.org_id), "--json",
                                  "--framework", "GDPR", DATABASE_URL=database_url)
    assert out.returncode == 0, out.stderr
    import orjson

    data = orjson.loads(out.stdout)
    assert [e["action"] for e in data["reports"]["sensitive_access"]] == ["data.export"]
    assert data["reports"]["failed_logins"] == []
    ok = await asyncio.to_thread(cli, "audit", "verify", "--org", str(t.org_id),
                                 DATABASE_URL=database_url)
    assert ok.returncode == 0 and "chain ok" in ok.stdout
