"""GDPR: consent records, the personal-data registry, subject export, erasure, masking."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from datalayer import Context, DataLayer, DataLayerError, PermissionDenied, ValidationError
from datalayer.repos.gdpr import SECTIONS, pseudonym
from tests.conftest import MemberFactory, Tenant, TenantFactory


def uid(ctx: Context) -> uuid.UUID:
    assert ctx.user_id is not None
    return ctx.user_id


async def join(dl: DataLayer, t: Tenant, user_id: uuid.UUID, email: str,
               role: str = "member") -> Context:
    """Bring an existing account into ``t`` (invitation, accepted)."""
    async with dl.session(t.owner) as db:
        token = await db.auth.invite(email, role)
    async with dl.session(Context(None, user_id=user_id)) as db:
        assert await db.auth.consume_token("invitation", token) is not None
    return Context(t.org_id, user_id=user_id, role=role)  # type: ignore[arg-type]


# -- consents -----------------------------------------------------------------------------------

async def test_consent_current_state_is_the_latest_record(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant("Consent")
    member = await add_member(t, "member")
    viewer = await add_member(t, "viewer")
    async with dl.session(member) as db:
        await db.gdpr.record_consent("marketing", granted=True, notice_version="v1")
        await db.gdpr.record_consent("analytics", granted=True, notice_version="v1",
                                     source="mobile")
        await db.gdpr.record_consent("marketing", granted=False, notice_version="v2")
        state = await db.gdpr.consents()
        assert {p: (c.granted, c.notice_version) for p, c in state.items()} == {
            "marketing": (False, "v2"), "analytics": (True, "v1")}
        assert state["analytics"].source == "mobile"
        assert state["marketing"].recorded_by == uid(member)
        assert not await db.gdpr.has_consent("marketing")
        assert await db.gdpr.has_consent("analytics")
        assert not await db.gdpr.has_consent("never-asked")
        assert [c.purpose for c in await db.gdpr.consent_history()] == [
            "marketing", "analytics", "marketing"]
        # another member's records are not visible to a member
        assert await db.gdpr.consents(user_id=uid(viewer)) == {}
    async with dl.session(viewer) as db:  # consenting is self-service, viewers included
        await db.gdpr.record_consent("marketing", granted=True, notice_version="v2")
    with pytest.raises(PermissionDenied):  # a member cannot record for someone else
        async with dl.session(member) as db:
            await db.gdpr.record_consent("marketing", granted=True, notice_version="v2",
                                         user_id=uid(viewer))
    async with dl.session(t.owner) as db:  # an admin records for and reads every member
        await db.gdpr.record_consent("analytics", granted=False, notice_version="v2",
                                     source="support", user_id=uid(viewer))
        state = await db.gdpr.consents(user_id=uid(viewer))
        assert {p: c.granted for p, c in state.items()} == {"marketing": True,
                                                             "analytics": False}
        assert state["analytics"].recorded_by == t.owner_id
    with pytest.raises(PermissionDenied):  # the subject must be a member
        async with dl.session(t.owner) as db:
            await db.gdpr.record_consent("marketing", granted=True, notice_version="v1",
                                         user_id=uuid.uuid4())
    with pytest.raises(PermissionDenied):  # read-only contexts record nothing
        async with dl.session(Context(t.org_id, user_id=uid(member), read_only=True)) as db:
            await db.gdpr.record_consent("marketing", granted=True, notice_version="v3")


async def test_consents_are_append_only_for_every_role(
    dl: DataLayer, make_tenant: TenantFactory, admin_conn: asyncpg.Connection,
) -> None:
    t = await make_tenant("Append")
    async with dl.session(t.owner) as db:
        c = await db.gdpr.record_consent("marketing", granted=True, notice_version="v1")
    for sql in ("UPDATE consents SET granted = false", "DELETE FROM consents",
                "TRUNCATE consents"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with dl.session(t.owner) as db:
                await db.connection.execute(sql)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with dl.system() as db:
                await db.connection.execute(sql)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await admin_conn.execute(sql)  # even the superuser meets the trigger
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # recorded_by cannot be forged
        async with dl.session(t.owner) as db:
            await db.connection.execute(
                "INSERT INTO consents (org_id, user_id, purpose, notice_version, granted, "
                "source, recorded_by) VALUES ($1, $2, 'x', 'v', true, 'web', $3)",
                t.org_id, t.owner_id, uuid.uuid4())
    assert await admin_conn.fetchval("SELECT count(*) FROM consents WHERE org_id = $1 "
                                     "AND id = $2 AND granted", t.org_id, c.id) == 1


async def test_consent_state_is_one_index_walk(
    dl: DataLayer, make_tenant: TenantFactory,
) -> None:
    t = await make_tenant("Plan")
    async with dl.session(t.owner) as db:
        for i in range(5):
            await db.gdpr.record_consent(f"p{i % 2}", granted=bool(i % 3),
                                         notice_version="v1")
        sql = db.dl.registry["gdpr.consent_state"].sql
        await db.connection.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in await db.connection.fetch(
            "EXPLAIN " + sql, None, None))
    assert "consents_state_idx" in plan, plan
    assert "Sort" not in plan, plan


# -- registry -----------------------------------------------------------------------------------

_USER_REFERENCES = """
SELECT c.relname AS table_name, a.attname AS column_name
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname IN ('public', 'app')
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND c.relname NOT IN ('personal_data', 'personal_data_exempt')
  AND (a.attname ~ '(user_id|_by|^owner_id|^actor_id)$'
       OR EXISTS (SELECT 1 FROM pg_constraint k
                  WHERE k.conrelid = c.oid AND k.contype = 'f' AND a.attnum = ANY (k.conkey)
                    AND (k.confrelid = 'users'::regclass
                         OR (k.confrelid = 'memberships'::regclass
                             AND (SELECT f.attname FROM pg_attribute f
                                  WHERE f.attrelid = k.confrelid
                                    AND f.attnum = k.confkey[array_position(k.conkey, a.attnum)])
                                 = 'user_id'))))
ORDER BY 1, 2
"""


async def test_every_user_reference_is_registered_or_exempt(
    admin_conn: asyncpg.Connection,
) -> None:
    """A table that points at users (a foreign key to users or to memberships.user_id, or a
    column named *user_id, *_by, owner_id, actor_id) is either in app.personal_data (and so
    exported and erased) or in app.personal_data_exempt with a reason."""
    refs = {(r["table_name"], r["column_name"])
            for r in await admin_conn.fetch(_USER_REFERENCES)}
    assert {("api_keys", "user_id"), ("workflows", "owner_id")} <= refs  # not vacuous
    registered = {(r["table_name"], r["subject_column"]) for r in await admin_conn.fetch(
        "SELECT table_name, subject_column FROM app.personal_data WHERE match = 'id'")}
    exempt = {(r["table_name"], r["column_name"]) for r in await admin_conn.fetch(
        "SELECT table_name, column_name FROM app.personal_data_exempt")}
    missing = sorted(refs - registered - exempt - {("users", "id")})
    assert not missing, (
        "columns that point at a user are neither in app.personal_data nor in "
        f"app.personal_data_exempt: {missing}; add one row to your migration")
    assert not registered & exempt, "a column is both registered and exempt"


async def test_registry_names_real_columns(admin_conn: asyncpg.Connection) -> None:
    rows = await admin_conn.fetch(
        "SELECT p.table_name, col, kind FROM app.personal_data p "
        "CROSS JOIN LATERAL (SELECT p.subject_column, 'subject' UNION ALL "
        "  SELECT p.org_column, 'org' WHERE p.org_column IS NOT NULL UNION ALL "
        "  SELECT unnest(p.columns), 'personal' UNION ALL "
        "  SELECT unnest(p.secret_columns), 'secret') AS x (col, kind) "
        "WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = "
        "  to_regclass(p.table_name) AND a.attname = x.col AND NOT a.attisdropped)")
    assert not rows, [dict(r) for r in rows]
    anonymized = await admin_conn.fetch(
        "SELECT table_name FROM app.personal_data WHERE erase_action = 'anonymize' "
        "AND columns = '{}'")
    assert not anonymized, "anonymize entries must name their personal columns"


# -- a subject in every registered table ----------------------------------------------------

@dataclass
class World:
    a: Tenant
    b: Tenant
    c: Tenant
    subject: uuid.UUID
    email: str
    name: str
    in_a: Context
    in_b: Context
    bystander: Context


async def seed_subject(dl: DataLayer, make_tenant: TenantFactory,
                       add_member: MemberFactory) -> World:
    """A subject (admin in A, member in B, invited to C) with a row in every registered
    table, their email and name written where a careless implementation would keep them."""
    a, b, c = await make_tenant("Alpha"), await make_tenant("Bravo"), await make_tenant("Charlie")
    h = uuid.uuid4().hex[:8]
    email, name = f"Zed.Q-{h}@Example.test", f"Zed Quinlan {h}"
    in_a = await add_member(a, "admin", email=email, password="correct horse battery")
    s = uid(in_a)
    in_b = await join(dl, b, s, email)
    bystander = await add_member(a, "member")
    async with dl.session(Context(None, user_id=s)) as db:
        await db.users.update_profile(s, display_name=name, first_name="Zed",
                                      last_name=f"Quinlan{h}")
        assert await db.auth.issue_token("password_reset", email) is not None
    await dl.web_sessions.create(s, {"email": email, "name": name})
    async with dl.session(c.owner) as db:
        await db.auth.invite(email.upper(), "member")  # pending invitation to the address
    async with dl.session(a.owner) as db:
        team = await db.teams.create(f"Team {h}")
        await db.teams.add_member(team.id, s)
        owned = await db.workflows.create(f"Owner flow {h}")
        await db.workflows.share(owned.id, user_id=s)
        await db.notifications.create(s, "hello", f"Welcome {name}", message=f"mail {email}",
                                      data={"to": email})
    async with dl.session(in_a) as db:
        await db.api_keys.create(f"{name}'s laptop")
        wf = await db.workflows.create(f"Flow {h}", status="active",
                                       nodes=[{"id": "a", "type": "http"}])
        await db.workflows.update(wf.id, nodes=[{"id": "b", "type": "http"}])
        await db.workflows.share(wf.id, user_id=uid(bystander))
        ex = await db.executions.enqueue(wf.id, input={"n": 1})
        await db.executions.cancel(ex.id)
        cred = await db.credentials.create(f"Cred {h}", "basic",
                                           {"username": "svc", "password": "pw"})
        await db.credentials.decrypt(cred.id)
        await db.webhooks.create(wf.id, name=f"Hook {h}")
        await db.gdpr.record_consent("marketing", granted=True, notice_version="v1")
        await db.gdpr.record_consent("marketing", granted=True, notice_version="v1",
                                     user_id=a.owner_id)
    async with dl.session(in_b) as db:
        await db.gdpr.record_consent("analytics", granted=False, notice_version="v3")
    async with dl.session(b.owner) as db:  # a paid listing in B the subject reviews and buys
        sold = await db.plugins.create(f"sold-{h}")
        listing = await db.marketplace.create_listing(f"Sold {h}", plugin_id=sold.id,
                                                      price="5.00")
    async with dl.session(in_a) as db:  # plugins published, approved and installed by them
        plug = await db.plugins.create(f"plug-{h}", summary="a plugin", license="MIT")
        pv = await db.plugins.publish_version(
            plug.id, "1.0.0", {"name": plug.name, "entry_point": "p.m:run", "permissions": [],
                               "config_schema": {"type": "object", "properties": {
                                   "token": {"type": "string", "secret": True}}}},
            checksum="sha256:" + hashlib.sha256(h.encode()).hexdigest(), size_bytes=1)
        await db.plugins.approve_version(pv.id)
        stage = await db.plugins.add_stage(1, f"review {h}")
        await db.plugins.decide(plug.id, pv.id, stage.id, "approved")
        await db.plugins.grant_exemption(plug.id, "no_critical_vulnerability",
                                         f"exemption {h}", ttl=timedelta(hours=1))
        await db.plugins.install(plug.id, pv.id, "development", secrets={"token": h})
        await db.marketplace.review(listing.id, 4, f"Great, says {name} ({email})")
        await db.marketplace.buy(listing.id)
        # DigiTwin: profile, a model, a processed document, a conversation, the usage meter.
        await db.models.set_profile(personality_traits=[f"curious like {name}"])
        await db.models.create("voice", provider="prov", name=f"{name}'s voice",
                               storage_uri=f"s3://twin/{h}.bin")
        doc = await db.knowledge.create(f"Notes of {name}", content=f"{name} <{email}>")
        await db.knowledge.claim(f"worker-{h}")
        await db.knowledge.store_chunks(doc.document.id, f"worker-{h}",
                                        [f"{name} writes from {email}"])
        conv = await db.conversations.start(title=f"Chat with {name}")
        await db.conversations.append_turn(conv.id, input_text=f"I am {name}",
                                           response_text=f"Hello {name}", total_ms=12)
    return World(a, b, c, s, email, name, in_a, in_b, bystander)


def registry_keys(export: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """An export's rows by registry entry ``"<table>.<column>"``."""
    by_section = {section: f"{t}.{c}" for (t, c), section in SECTIONS.items()}
    out: dict[str, list[dict[str, Any]]] = dict(export["other"])
    for section, key in by_section.items():
        value = export[section]
        out[key] = ([value] if value else []) if section == "profile" else value
    return out


async def test_export_lists_every_registered_table(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    w = await seed_subject(dl, make_tenant, add_member)
    entries = {f"{r['table_name']}.{r['subject_column']}" for r in await admin_conn.fetch(
        "SELECT table_name, subject_column FROM app.personal_data")}
    async with dl.system() as db:
        export = await db.gdpr.export(w.subject)
    text = json.dumps(export)  # JSON-serialisable as it is
    rows = registry_keys(export)
    empty = sorted(e for e in entries if not rows.get(e))
    assert not empty, f"the export lists nothing for {empty}"
    assert export["profile"]["email"] == w.email
    assert export["profile"]["display_name"] == w.name
    assert {m["org_id"] for m in export["memberships"]} == {str(w.a.org_id), str(w.b.org_id)}
    assert set(export["organizations"]) >= {str(w.a.org_id), str(w.b.org_id), str(w.c.org_id)}
    if await admin_conn.fetchval("SELECT to_regclass('public.audit_events') IS NULL"):
        assert export["audit_events"] == []  # no audit trail in this schema: the hook skips
    else:  # merged with the audit trail: the subject's events (membership, keys, …)
        assert export["audit_events"]
        assert all(str(w.subject) in (e.get("actor_user_id"), e.get("subject_user_id"))
                   for e in export["audit_events"])
    secrets = {"password_hash", "key_hash", "token_hash", "id_hash", "totp_secret",
               "recovery_codes", "secret", "path_token_hash"}
    for key, listed in rows.items():  # no secret column in any exported row
        for row in listed:
            assert not secrets & set(row), f"{key} exports {secrets & set(row)}"
    assert "password_hash" not in text and "totp_secret" not in text


async def test_export_is_limited_to_what_the_requester_may_see(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    w = await seed_subject(dl, make_tenant, add_member)
    async with dl.session(w.b.owner) as db:  # admin of B: B's part only
        from_b = await db.gdpr.export(w.subject)
    assert from_b["organizations"] == [str(w.b.org_id)]
    orgs = {r.get("org_id") for rows in registry_keys(from_b).values() for r in rows}
    assert orgs <= {str(w.b.org_id), None}
    assert [c["purpose"] for c in from_b["consents"]] == ["analytics"]
    assert from_b["workflows"] == [] and from_b["notifications"] == []
    assert from_b["profile"]["email"] == w.email  # B sees its member's profile anyway
    assert "web_sessions.user_id" not in from_b["other"]  # global rows: subject only
    async with dl.session(w.a.owner) as db:
        from_a = await db.gdpr.export(w.subject)
    assert len(from_a["notifications"]) == 1 and len(from_a["workflows"]) == 1
    assert [c["purpose"] for c in from_a["consents"]] == ["marketing"]
    async with dl.session(w.c.owner) as db:  # C: only its invitation
        from_c = await db.gdpr.export(w.subject)
    assert from_c["profile"] is None and from_c["memberships"] == []
    assert list(from_c["other"]) == ["auth_tokens.email"]
    with pytest.raises(PermissionDenied):  # a member may not export another member
        async with dl.session(w.bystander) as db:
            await db.gdpr.export(w.subject)
    with pytest.raises(PermissionDenied):
        async with dl.session(Context(None, user_id=uid(w.bystander))) as db:
            await db.gdpr.export(w.subject)
    with pytest.raises(ValidationError, match="read-write"):  # an export is audited
        async with dl.session(w.a.owner, readonly=True) as db:
            await db.gdpr.export(w.subject)
    # the subject themself, with no organization: their organizations and global rows
    async with dl.session(Context(None, user_id=w.subject)) as db:
        mine = await db.gdpr.export(w.subject)
    assert set(mine["organizations"]) == {str(w.a.org_id), str(w.b.org_id)}
    assert mine["other"]["web_sessions.user_id"][0]["data"]["email"] == w.email
    # the invitations they accepted; C's pending one is not of their organizations yet
    assert {r["org_id"] for r in mine["other"]["auth_tokens.email"]} == {
        str(w.a.org_id), str(w.b.org_id)}


# -- erasure ------------------------------------------------------------------------------------

_TEXT_COLUMNS = """
SELECT format('%I.%I', n.nspname, c.relname) AS qname, a.attname AS col
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type e ON e.oid = t.typelem AND t.typcategory = 'A'
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_'
  AND (t.typname IN ('text', 'varchar', 'bpchar', 'citext', 'name', 'inet', 'json', 'jsonb')
       OR e.typname IN ('text', 'varchar', 'bpchar', 'citext', 'json', 'jsonb'))
ORDER BY 1, 2
"""


async def scan(conn: asyncpg.Connection, *needles: str) -> list[str]:
    """Every (table, column) of the whole database holding one of ``needles``
    (case-insensitive), read as the superuser."""
    hits = []
    cols = await conn.fetch(_TEXT_COLUMNS)
    assert len(cols) > 50  # not vacuous
    for r in cols:
        for needle in needles:
            n = await conn.fetchval(
                f"SELECT count(*) FROM {r['qname']} "
                f"WHERE strpos(lower({_ident(r['col'])}::text), lower($1)) > 0", needle)
            if n:
                hits.append(f"{r['qname']}.{r['col']} holds {needle!r} ({n} rows)")
    return hits


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def test_erasure_leaves_no_email_or_name_anywhere(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    w = await seed_subject(dl, make_tenant, add_member)
    async with dl.session(w.in_a) as db:  # a soft-deleted row is erased too
        wf = await db.workflows.create("Soon deleted", status="active")
        await db.notifications.create(uid(w.bystander), "x", "t", data={})
    async with dl.session(w.a.owner) as db:
        await db.notifications.create(w.subject, "x", f"Old note for {w.name}")
        await db.workflows.delete(wf.id)
    assert await scan(admin_conn, w.email, w.name)  # the scan finds them before
    async with dl.system() as db:
        first = await db.gdpr.erase(w.subject)
    assert first.organization is None and first.profile_erased
    assert first.pseudonym == pseudonym(w.subject)
    assert first.affected["memberships.user_id"] == 2
    assert first.affected["notifications.user_id"] == 2
    assert first.affected["auth_tokens.email"] == 3  # accepted in A and B, pending in C
    assert first.affected["web_sessions.user_id"] == 1
    # redacted exactly when this database has the audit trail (the other half of the issue)
    assert first.audit_redacted == await admin_conn.fetchval(
        "SELECT to_regprocedure('app.audit_redact_subject(uuid, uuid)') IS NOT NULL")
    assert await scan(admin_conn, w.email, w.name) == []
    async with dl.system() as db:  # idempotent
        again = await db.gdpr.erase(w.subject)
    assert again.profile_erased and "memberships.user_id" not in again.affected
    assert await scan(admin_conn, w.email, w.name) == []
    user = await admin_conn.fetchrow("SELECT * FROM users WHERE id = $1", w.subject)
    assert user is not None
    assert user["email"] == f"{pseudonym(w.subject)}@erased.invalid"
    assert user["display_name"] == pseudonym(w.subject)
    assert user["password_hash"] is None and user["first_name"] is None
    assert user["deleted_at"] is not None and user["status"] == "suspended"
    # rows needed for integrity stay, under the pseudonymous id
    for table, col in (("workflows", "owner_id"), ("executions", "created_by"),
                       ("credentials", "created_by"), ("consents", "user_id")):
        assert await admin_conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE {col} = $1", w.subject)
    for table in ("api_keys", "web_sessions", "memberships", "notifications"):
        assert await admin_conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE user_id = $1", w.subject) == 0
    async with dl.session(Context(None)) as db:  # signed out, cannot sign in
        login = await db.auth.login(w.email, "correct horse battery")
    assert login.outcome == "invalid" and login.user_id is None


async def test_admin_erases_only_in_their_organization(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    w = await seed_subject(dl, make_tenant, add_member)
    with pytest.raises(PermissionDenied):  # members do not erase
        async with dl.session(w.bystander) as db:
            await db.gdpr.erase(w.subject)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with dl.session(Context(w.a.org_id, user_id=w.a.owner_id, role="owner",
                                      read_only=True)) as db:
            await db.connection.fetch("SELECT * FROM app.gdpr_erase($1)", w.subject)
    async with dl.session(w.c.owner) as db:  # not a member of C: only C's invitation
        from_c = await db.gdpr.erase(w.subject)
    assert from_c.affected == {"auth_tokens.email": 1} and not from_c.profile_erased
    async with dl.session(w.a.owner) as db:
        from_a = await db.gdpr.erase(w.subject)
    assert not from_a.profile_erased  # still a member of B
    assert from_a.organization == w.a.org_id
    assert {"memberships.user_id", "api_keys.user_id", "notifications.user_id"} <= set(
        from_a.affected)
    assert await admin_conn.fetchval(
        "SELECT array_agg(org_id) FROM memberships WHERE user_id = $1",
        w.subject) == [w.b.org_id]
    assert await admin_conn.fetchval("SELECT email FROM users WHERE id = $1",
                                     w.subject) == w.email
    assert await admin_conn.fetchval("SELECT count(*) FROM web_sessions WHERE user_id = $1",
                                     w.subject) == 1
    async with dl.session(w.a.owner) as db:  # idempotent: nothing left to do in A
        assert (await db.gdpr.erase(w.subject)).affected == {}
        after = await db.gdpr.export(w.subject)
    assert after["profile"] is None and after["memberships"] == []
    assert after["notifications"] == [] and len(after["workflows"]) == 1  # kept for A
    async with dl.session(w.b.owner) as db:  # B's erasure is the last: the profile goes
        from_b = await db.gdpr.erase(w.subject)
    assert from_b.profile_erased and from_b.affected["web_sessions.user_id"] == 1
    assert await scan(admin_conn, w.name) == []


async def test_erasure_is_all_or_nothing(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    """The subject is the last owner of an organization: the memberships step (the last)
    fails, and everything done before it (profile, sessions, notifications) is undone."""
    w = await seed_subject(dl, make_tenant, add_member)
    solo = Context(uuid.uuid4(), user_id=w.subject, role="owner")
    async with dl.session(solo) as db:
        await db.orgs.create(slug=f"solo-{uuid.uuid4().hex[:8]}", name="Solo")
        await db.memberships.add(w.subject, "owner")
    before = await scan(admin_conn, w.email, w.name)
    with pytest.raises(DataLayerError, match="at least one owner"):
        async with dl.system() as db:
            await db.gdpr.erase(w.subject)
    assert await scan(admin_conn, w.email, w.name) == before
    assert await admin_conn.fetchval("SELECT count(*) FROM memberships WHERE user_id = $1",
                                     w.subject) == 3


async def test_concurrent_erasures_of_one_subject(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    import asyncio

    w = await seed_subject(dl, make_tenant, add_member)

    async def erase() -> None:
        async with dl.system() as db:
            await db.gdpr.erase(w.subject)

    await asyncio.gather(erase(), erase(), erase())
    assert await scan(admin_conn, w.email, w.name) == []


# -- masking ------------------------------------------------------------------------------------

async def test_members_below_admin_see_masked_emails(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant("Mask")
    alice = await add_member(t, "member", email=f"alice-{uuid.uuid4().hex[:6]}@example.com")
    bob = await add_member(t, "viewer")
    admin = await add_member(t, "admin")
    async with dl.session(admin) as db:
        real = {m.user_id: m.email for m in await db.gdpr.members()}
    assert len(real) == 4 and "***" not in "".join(real.values())
    for ctx in (alice, bob):
        async with dl.session(ctx, readonly=True) as db:
            seen = {m.user_id: m.email for m in await db.gdpr.members()}
            view = {r["user_id"]: r["email"] for r in await db.connection.fetch(
                "SELECT user_id, email FROM org_members_masked")}
            ip_self = await db.gdpr.visible_ip("192.0.2.77", uid(ctx))
            ip_other = await db.gdpr.visible_ip("2001:db8:1:2::5", t.owner_id)
        assert seen == view
        assert seen[uid(ctx)] == real[uid(ctx)]  # their own: unmasked
        for user, email in seen.items():
            if user != uid(ctx):
                local, _, domain = real[user].partition("@")
                assert email == f"{local[0]}***@{domain}"
        assert ip_self == "192.0.2.77" and ip_other == "2001:db8:1::/48"
    async with dl.session(Context(t.org_id, user_id=uid(admin), role="admin",
                                  read_only=True), readonly=True) as db:
        assert await db.gdpr.visible_ip("192.0.2.77", uid(alice)) == "192.0.2.77"
        assert {m.user_id: m.email for m in await db.gdpr.members()} == real
    async with dl.session(alice, readonly=True) as db:
        assert await db.gdpr.visible_ip("192.0.2.77", uid(bob)) == "192.0.2.0/24"
        with pytest.raises(ValidationError, match="IPv4 or IPv6") as bad_ip:
            await db.gdpr.visible_ip("192.0.2.999", uid(bob))
        assert "192.0.2.999" not in str(bad_ip.value)  # an address is personal data
        assert bad_ip.value.__cause__ is None
        page = await db.gdpr.members(limit=2)
        rest = await db.gdpr.members(after=(page[-1].joined_at, page[-1].user_id))
    assert len(page) == 2 and len(rest) == 2


# -- the audit hooks ----------------------------------------------------------------------------

_AUDIT_STUB = """
CREATE TABLE audit_events (
  org_id uuid NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY,
  actor_user_id uuid, subject_user_id uuid, action text NOT NULL,
  detail jsonb NOT NULL DEFAULT '{}', PRIMARY KEY (org_id, id));
ALTER TABLE audit_events ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_events_org ON audit_events USING (org_id = (SELECT app.org_id()));
GRANT SELECT, INSERT (org_id, actor_user_id, subject_user_id, action, detail)
  ON audit_events TO datalayer_app;
CREATE FUNCTION app.audit_redact_subject(p_org uuid, p_user uuid) RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
  WITH r AS (UPDATE audit_events SET detail = '{"redacted": true}'
             WHERE org_id = p_org AND (subject_user_id = p_user OR actor_user_id = p_user)
             RETURNING 1)
  SELECT count(*) FROM r $$;
ALTER FUNCTION app.audit_redact_subject(uuid, uuid) OWNER TO datalayer_maint;
REVOKE ALL ON FUNCTION app.audit_redact_subject(uuid, uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION app.audit_redact_subject(uuid, uuid) TO datalayer_maint;
"""


async def test_audit_hooks_use_the_audit_trail_when_it_exists(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    """Once the audit trail is merged (audit_events, app.audit_redact_subject), export lists
    the events about the subject and erasure redacts them. On this branch alone a stand-in
    with the contract's shape is created for the test and dropped after it."""
    real = await admin_conn.fetchval("SELECT to_regclass('public.audit_events') IS NOT NULL")
    if not real:
        await admin_conn.execute(_AUDIT_STUB)
    try:
        w = await seed_subject(dl, make_tenant, add_member)
        if not real:
            await admin_conn.execute(
                "INSERT INTO audit_events (org_id, actor_user_id, subject_user_id, action, "
                "detail) VALUES ($1, $2, $3, 'role.changed', $4)",
                w.a.org_id, w.a.owner_id, w.subject, json.dumps({"email": w.email}))
        async with dl.session(w.a.owner) as db:
            export = await db.gdpr.export(w.subject)
        if not real:
            assert [e["action"] for e in export["audit_events"]] == ["role.changed"]
            assert export["audit_events"][0]["detail"] == {"email": w.email}
        async with dl.session(w.a.owner) as db:
            erased = await db.gdpr.erase(w.subject)
        assert erased.audit_redacted
        async with dl.system() as db:
            assert (await db.gdpr.erase(w.subject)).audit_redacted
        assert await scan(admin_conn, w.email, w.name) == []
        if not real:
            details = await admin_conn.fetch(
                "SELECT action, detail FROM audit_events WHERE org_id = $1 "
                "AND subject_user_id = $2 ORDER BY id", w.a.org_id, w.subject)
            assert [(r["action"], json.loads(r["detail"])) for r in details] == [
                ("role.changed", {"redacted": True})]
    finally:
        if not real:
            await admin_conn.execute("DROP FUNCTION app.audit_redact_subject(uuid, uuid); "
                                     "DROP TABLE audit_events")


# -- CLI ----------------------------------------------------------------------------------------

def test_cli_exports_and_erases(database_url: str) -> None:
    import asyncio

    from tests.conftest import make_layer, make_settings
    from tests.test_cli import cli

    async def world() -> tuple[Tenant, Context, Context]:
        async with make_layer(make_settings(database_url, migrate_on_start=False)) as dl:
            org_id, owner_id = uuid.uuid4(), uuid.uuid4()
            owner = Context(org_id, user_id=owner_id, role="owner")
            async with dl.session(owner) as db:
                await db.orgs.create(slug=f"cli-{org_id.hex[:10]}", name="Cli")
                await db.users.create(email=f"o-{owner_id.hex[:8]}@example.test")
                await db.memberships.add(owner_id, "owner")
            t = Tenant(org_id, f"cli-{org_id.hex[:10]}", owner)
            subject_id, other_id = uuid.uuid4(), uuid.uuid4()
            out = []
            for u in (subject_id, other_id):
                email = f"cli-{u.hex[:8]}@example.test"
                async with dl.session(Context(None, user_id=u)) as db:
                    await db.users.create(email=email, display_name=f"Cli {u.hex[:8]}")
                out.append(await join(dl, t, u, email))
            return t, out[0], out[1]

    t, subject, other = asyncio.run(world())
    env = {"DATABASE_URL": database_url}
    s = str(uid(subject))
    result = cli("gdpr", "export", "--user", s, **env)
    assert result.returncode == 0, result.stderr
    export = json.loads(result.stdout)
    assert export["scope"] == "all organizations"
    assert export["memberships"][0]["org_id"] == str(t.org_id)
    as_owner = cli("gdpr", "export", "--user", s, "--org", str(t.org_id),
                   "--as", str(t.owner_id), **env)
    assert json.loads(as_owner.stdout)["scope"] == str(t.org_id)
    denied = cli("gdpr", "export", "--user", s, "--org", str(t.org_id),
                 "--as", str(uid(other)), **env)
    assert denied.returncode == 1 and "admin or the subject" in denied.stderr
    assert cli("gdpr", "erase", "--user", s, **env).returncode == 1  # needs --yes
    erased = cli("gdpr", "erase", "--user", s, "--org", str(t.org_id), "--as",
                 str(t.owner_id), "--yes", **env)
    assert erased.returncode == 0, erased.stderr
    report = json.loads(erased.stdout)
    assert report["profile_erased"] is True and report["pseudonym"] == pseudonym(uid(subject))


async def test_erasure_drops_cached_lookups_and_owners_need_an_owner(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    t = await make_tenant("Cached")
    admin = await add_member(t, "admin")
    co_owner = await add_member(t, "owner")
    subject = await add_member(t, "member", email=f"cached-{uuid.uuid4().hex[:8]}@example.test")
    async with dl.session(subject) as db:
        key = await db.api_keys.create("laptop")
    async with dl.session(t.owner, readonly=True) as db:
        cached = await db.users.get(uid(subject))
        assert cached is not None and cached.email.startswith("cached-")
        assert await db.users.get(uid(subject)) == cached  # now served from the cache
    async with dl.session(Context(None), readonly=True) as db:
        assert await db.api_keys.verify(key.secret) is not None
    with pytest.raises(PermissionDenied, match="only an owner may erase an owner"):
        async with dl.session(admin) as db:
            await db.gdpr.erase(uid(co_owner))
    async with dl.session(admin) as db:
        await db.gdpr.erase(uid(subject))
    async with dl.session(t.owner, readonly=True) as db:
        assert await db.users.get(uid(subject)) is None
    async with dl.session(Context(None), readonly=True) as db:
        assert await db.api_keys.verify(key.secret) is None


async def test_erasure_reaches_soft_deleted_rows(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    t = await make_tenant("Soft")
    email = f"gone-{uuid.uuid4().hex[:8]}@example.test"
    subject = await add_member(t, "member", email=email)
    async with dl.session(Context(None, user_id=uid(subject))) as db:
        await db.users.update_profile(uid(subject), display_name=f"Gone {email[5:13]}")
        assert await db.users.soft_delete(uid(subject))  # the account was closed earlier
    assert await scan(admin_conn, email)
    async with dl.system() as db:
        erased = await db.gdpr.erase(uid(subject))
    assert erased.affected["users.id"] == 1
    assert await scan(admin_conn, email, f"Gone {email[5:13]}") == []


async def test_erasure_signs_out_redis_web_sessions(
    database_url: str, redis_url: str, redis_prefix: str, redis_client: Any,
    make_tenant: TenantFactory, add_member: MemberFactory,
) -> None:
    from datalayer.web_sessions import WebSessions
    from tests.conftest import make_layer, make_settings

    t = await make_tenant("Redis")
    subject = await add_member(t, "member")
    settings = make_settings(database_url, redis_url=redis_url, migrate_on_start=False,
                             cache_prefix=f"{redis_prefix}cache:", channel_prefix=redis_prefix,
                             ratelimit_prefix=redis_prefix)
    async with make_layer(settings) as layer:
        layer.web_sessions = WebSessions(layer, store="redis", prefix=redis_prefix)
        new = await layer.web_sessions.create(uid(subject), {"n": 1})
        assert await layer.web_sessions.get(new.token) is not None
        async with layer.system() as db:
            assert (await db.gdpr.erase(uid(subject))).profile_erased
        assert await layer.web_sessions.get(new.token) is None


async def test_concurrent_consent_records_keep_one_current_state(
    dl: DataLayer, make_tenant: TenantFactory, add_member: MemberFactory,
    admin_conn: asyncpg.Connection,
) -> None:
    import asyncio

    t = await make_tenant("Race")
    member = await add_member(t, "member")

    async def record(i: int) -> None:
        async with dl.session(member) as db:
            await db.gdpr.record_consent("marketing", granted=i % 2 == 0,
                                         notice_version=f"v{i}")

    await asyncio.gather(*(record(i) for i in range(12)))
    async with dl.session(member, readonly=True) as db:
        state = (await db.gdpr.consents())["marketing"]
        history = await db.gdpr.consent_history()
    assert len(history) == 12  # nothing lost
    latest = await admin_conn.fetchrow(
        "SELECT id, granted FROM consents WHERE org_id = $1 AND user_id = $2 "
        "ORDER BY at DESC, id DESC LIMIT 1", t.org_id, uid(member))
    assert latest is not None
    assert (state.id, state.granted) == (latest["id"], latest["granted"]) == (
        history[0].id, history[0].granted)
