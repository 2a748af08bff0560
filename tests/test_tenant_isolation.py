"""Tenant isolation, adversarially: the catalog, every registry query, roles and plans.

Everything is discovered: tables, columns, keys, policies, views and functions from
pg_catalog; queries and their parameter types from the registry (``dl.validate()``). A table
or a query added later joins these tests without editing them. The exception lists below are
explicit and tiny, and each entry says why.

``KNOWN_HOLES`` lists the holes this suite found that are still open in the schema. A test
that observes only known holes (after asserting everything else) ends as XFAIL naming them;
a known hole that is no longer observed fails its test, so the entry goes when the schema is
fixed. Empty ``KNOWN_HOLES`` to make every open hole a plain failure.
"""

from __future__ import annotations

import asyncio
import decimal
import hashlib
import ipaddress
import json
import os
import re
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, ClassVar, NamedTuple, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from datalayer import (
    Context,
    DataLayer,
    DataLayerError,
    NotFound,
    PermissionDenied,
    Session,
    ValidationError,
)
from datalayer.core import migrations
from datalayer.core.context import APP_ROLE, ROLES, Role
from datalayer.core.errors import translate
from datalayer.core.registry import QueryInfo, Registry
from datalayer.core.resources import resource_dir
from datalayer.core.sqlfile import Shape
from datalayer.repos._base import Page
from datalayer.repos.api_keys import IssuedKey
from datalayer.repos.orgs import Organization
from datalayer.repos.plugins import UsageEvent
from datalayer.repos.users import User
from tests.conftest import (
    RUN_ID,
    create_database,
    drop_database,
    make_settings,
    nested_plans,
    plan_nodes,
)

T = TypeVar("T")

# -- explicit exceptions (keep tiny; every entry says why) ---------------------------------------

# yoyo's and the migration runner's own tables: no RLS, and datalayer_app must not reach them.
BOOKKEEPING = frozenset(
    {"_yoyo_migration", "_yoyo_log", "_yoyo_version", "yoyo_lock", "_datalayer_checksums"})

# The tenant root: its primary key `id` *is* the org_id of every tenant row.
TENANT_ROOT, TENANT_ROOT_KEY = "organizations", "id"

# Unique keys allowed not to lead with the tenant key.
GLOBAL_UNIQUE_KEYS: dict[str, str] = {
    "organizations_slug_key": "slugs are a documented global namespace (they appear in URLs); "
                              "a taken slug reveals only that it is taken",
}

# Tables with an org_id that are not tenant tables; datalayer_app must hold no privilege on
# them (asserted), so nothing but their SECURITY DEFINER functions reaches them.
DEFINER_ONLY_TABLES: dict[str, str] = {
    "auth_tokens": "global token store (user tokens have no organization); reached only "
                   "through the SECURITY DEFINER login-path functions",
    "audit_heads": "audit hash-chain heads and retention checkpoints (app schema); reached "
                   "only through the SECURITY DEFINER audit triggers and functions",
    "twin_usage": "DigiTwin limit counters (the row every limit check locks); written only by "
                  "the SECURITY DEFINER limit triggers, read through app.twin_usage()",
}

# Tables datalayer_app reaches that have no org_id: global by design. The value selects the
# rows that belong to tenant $1 (for the before/after snapshots of the other tenant).
GLOBAL_TABLES: dict[str, str] = {
    "users": "id IN (SELECT user_id FROM memberships WHERE org_id = $1)",
}

# Registry queries that work across tenants on purpose (SECURITY DEFINER functions of the
# pre-context login path). They are called with values that are not the other tenant's
# (phantoms) and must return and change nothing of it; see also the pre-context hole test.
GLOBAL_BY_DESIGN: dict[str, str] = {
    "auth.login_lookup": "login by email, before a context exists",
    "auth.record_login": "records a login attempt for a user id, before a context exists",
    "auth.issue_user_token": "email verification / password reset by email, no context",
    "auth.consume_token": "single-use tokens found by hash, in any organization",
    "auth.totp_state": "second factor of a user id during login, before a context exists",
    "auth.totp_accept": "second factor of a user id during login, before a context exists",
    "auth.recovery_code_use": "recovery code of a user id during login, no context",
    "api_keys.verify": "API-key authentication: finds the key's organization by hash",
    "api_keys.verify_until": "api_keys.verify plus the key's expiry (read-through caching)",
    "webhooks.route": "webhook routing: finds the webhook's organization by path-token hash "
                      "(app.webhook_route), before a context exists",
    "audit.auth_event": "login-path audit event for a user id, before a context exists "
                        "(app.audit_auth_event refuses a tenant context)",
}

# Query namespaces not named after their table.
NAMESPACE_TABLES = {"orgs": "organizations"}

# Writes a viewer / guest may make: (table, command) -> (actor column, why).
SELF_SERVICE_WRITES: dict[tuple[str, str], tuple[str, str]] = {
    ("memberships", "DELETE"): ("user_id", "anyone may leave an organization "
                                           "(memberships_delete); only their own row"),
}

# Tenant tables that every organization context reads by design: table -> why. Nothing of
# another tenant may be read anywhere else; test_public_template_catalog_is_the_only_crossing
# checks that, and that nobody writes these tables. (The pair's tenants publish nothing,
# so every other test here sees no crossing at all.)
# Not here by design: the plugin catalog and the marketplace (schema/0020, 0021). Their
# tables are tenant-only; public, listed plugins and listings reach other organizations only
# through SECURITY DEFINER functions with an explicit filter (listed, or the caller's own).
# make_tenant gives every tenant a *private* plugin, listing, installation and governance
# rows, so every plugins.* / marketplace.* query runs here against real rows that must not
# cross; tests/test_plugins.py and tests/test_marketplace.py cover the public side.
CROSS_TENANT_READABLE: dict[str, str] = {
    "workflow_public_templates": "the public template catalog: copies, kept by a trigger, of "
                                 "live public templates (visibility 'public', is_template, "
                                 "not deleted); no owner, team, shares or history",
}

# Holes found by this suite and still open. (kind, subject) -> what and why it matters.
KNOWN_HOLES: dict[tuple[str, str], str] = {
}


class Finding(NamedTuple):
    kind: str
    subject: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} {self.subject}: {self.detail}"


def settle(found: Iterable[Finding], scope: Callable[[tuple[str, str]], bool]) -> None:
    """Fail on any finding not in KNOWN_HOLES and on known holes in ``scope`` that are gone;
    end as XFAIL when only known holes remain."""
    found = list(found)
    unexpected = [f for f in found if (f.kind, f.subject) not in KNOWN_HOLES]
    assert not unexpected, "isolation problems:\n  " + "\n  ".join(map(str, unexpected))
    seen = {(f.kind, f.subject) for f in found}
    fixed = sorted(k for k in KNOWN_HOLES if scope(k) and k not in seen)
    assert not fixed, f"known holes no longer observed; remove them from KNOWN_HOLES: {fixed}"
    if seen:
        pytest.xfail("open (KNOWN_HOLES): " + "; ".join(
            f"{kind} {subject}: {KNOWN_HOLES[kind, subject]}" for kind, subject in sorted(seen)))


def kinds(*names: str) -> Callable[[tuple[str, str]], bool]:
    return lambda key: key[0] in names


# -- catalog --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Col:
    name: str
    type: str  # typname; arrays as elem[]
    notnull: bool
    has_default: bool
    app_select: bool
    app_insert: bool
    app_update: bool


@dataclass(frozen=True)
class Table:
    oid: int
    schema: str
    name: str
    qname: str
    kind: str
    partition: bool
    rls: bool
    force: bool
    policies: int
    app_priv: bool
    app_delete: bool
    pk: tuple[str, ...]
    cols: tuple[Col, ...] = ()

    def col(self, name: str) -> Col | None:
        return next((c for c in self.cols if c.name == name), None)

    @property
    def tenant_key(self) -> str | None:
        """The column holding the org id: org_id, or id for the tenant root."""
        if self.name == TENANT_ROOT and self.schema == "public":
            return TENANT_ROOT_KEY
        return "org_id" if self.col("org_id") else None

    @property
    def is_tenant(self) -> bool:
        return self.tenant_key is not None and self.name not in DEFINER_ONLY_TABLES


_TABLES_SQL = """
SELECT c.oid::int8 AS oid, n.nspname AS schema, c.relname AS name,
       format('%I.%I', n.nspname, c.relname) AS qname, c.relkind::text AS kind,
       c.relispartition AS partition, c.relrowsecurity AS rls, c.relforcerowsecurity AS force,
       (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid)::int AS policies,
       (has_table_privilege($1, c.oid,
                            'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER')
        OR has_any_column_privilege($1, c.oid, 'SELECT, INSERT, UPDATE, REFERENCES'))
         AS app_priv,
       has_table_privilege($1, c.oid, 'DELETE') AS app_delete,
       coalesce((SELECT array_agg(a.attname ORDER BY k.ord)
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}') AS pk
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
ORDER BY 4
"""

_COLUMNS_SQL = """
SELECT a.attrelid::int8 AS rel, a.attname AS name,
       CASE WHEN t.typcategory = 'A' THEN et.typname || '[]' ELSE t.typname END AS type,
       a.attnotnull AS notnull,
       (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS has_default,
       has_column_privilege($1, a.attrelid, a.attnum, 'SELECT') AS app_select,
       has_column_privilege($1, a.attrelid, a.attnum, 'INSERT') AS app_insert,
       has_column_privilege($1, a.attrelid, a.attnum, 'UPDATE') AS app_update
FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid LEFT JOIN pg_type et ON et.oid = t.typelem
WHERE a.attrelid = ANY($2::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""


async def load_tables(conn: asyncpg.Connection) -> list[Table]:
    rows = await conn.fetch(_TABLES_SQL, APP_ROLE)
    cols: dict[int, list[Col]] = {}
    for r in await conn.fetch(_COLUMNS_SQL, APP_ROLE, [r["oid"] for r in rows]):
        cols.setdefault(r["rel"], []).append(Col(
            r["name"], r["type"], r["notnull"], r["has_default"], r["app_select"],
            r["app_insert"], r["app_update"]))
    return [Table(r["oid"], r["schema"], r["name"], r["qname"], r["kind"], r["partition"],
                  r["rls"], r["force"], r["policies"], r["app_priv"], r["app_delete"],
                  tuple(r["pk"]), tuple(cols.get(r["oid"], ()))) for r in rows]


@pytest.fixture(scope="module")
async def tables(database_url: str) -> list[Table]:
    conn = await asyncpg.connect(database_url)
    try:
        return await load_tables(conn)
    finally:
        await conn.close()


def _reachable(tables: list[Table]) -> list[Table]:
    return [t for t in tables if t.name not in BOOKKEEPING or t.schema != "public"]


def _tenant_tables(tables: list[Table], *, partitions: bool = True) -> list[Table]:
    return [t for t in tables if t.is_tenant and (partitions or not t.partition)]


async def test_every_reachable_table_forces_rls_with_a_policy(
    admin_conn: asyncpg.Connection, tables: list[Table],
) -> None:
    names = {t.name for t in tables}
    assert {"organizations", "users", "memberships", "_yoyo_migration"} <= names  # not vacuous
    problems = []
    for t in _reachable(tables):
        if not (t.app_priv or t.col("org_id")):
            continue
        if not (t.rls and t.force):
            problems.append(f"{t.qname}: RLS enabled={t.rls} forced={t.force}")
        if t.policies == 0:
            problems.append(f"{t.qname}: no policy")
    for t in tables:
        if t.schema == "public" and t.name in BOOKKEEPING and t.app_priv:
            problems.append(f"{t.qname}: migration bookkeeping reachable by {APP_ROLE}")
        if t.name in DEFINER_ONLY_TABLES and t.app_priv:
            problems.append(f"{t.qname}: definer-only table reachable by {APP_ROLE}")
        if (t.app_priv and not t.tenant_key and t.name not in GLOBAL_TABLES
                and not (t.schema == "public" and t.name in BOOKKEEPING)):
            problems.append(f"{t.qname}: reachable, no org_id, not in GLOBAL_TABLES: decide "
                            "whether it is a tenant table (add org_id) or global (list it)")
    assert not problems, "\n".join(problems)


_INDEXES_SQL = """
SELECT i.indrelid::int8 AS rel, c.relname AS index, i.indisprimary AS is_primary,
       i.indisunique AS is_unique, i.indisexclusion AS is_exclusion,
       (SELECT a.attname FROM pg_attribute a
        WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[0]) AS first_col
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = ANY($1::oid[])
"""


async def test_tenant_tables_lead_every_key_and_an_index_with_org_id(
    admin_conn: asyncpg.Connection, tables: list[Table],
) -> None:
    tenant = _tenant_tables(tables)
    assert {"organizations", "memberships", "teams", "api_keys"} <= {t.name for t in tenant}
    indexes = await admin_conn.fetch(_INDEXES_SQL, [t.oid for t in tenant])
    problems = []
    for t in tenant:
        key = t.tenant_key
        assert key is not None
        col = t.col(key)
        if col is None or not col.notnull:
            problems.append(f"{t.qname}.{key} is nullable")
        if not t.pk or t.pk[0] != key:
            problems.append(f"{t.qname}: primary key {t.pk} does not start with {key}")
        mine = [r for r in indexes if r["rel"] == t.oid]
        if not any(r["first_col"] == key for r in mine):
            problems.append(f"{t.qname}: no index led by {key} (the policy's index)")
        for r in mine:
            if ((r["is_unique"] or r["is_exclusion"]) and r["first_col"] != key
                    and r["index"] not in GLOBAL_UNIQUE_KEYS):
                problems.append(f"{t.qname}: unique/exclusion index {r['index']} does not "
                                f"start with {key} (a cross-tenant duplicate-key oracle)")
    assert not problems, "\n".join(problems)
    stale = set(GLOBAL_UNIQUE_KEYS) - {r["index"] for r in indexes}
    assert not stale, f"GLOBAL_UNIQUE_KEYS names indexes that do not exist: {stale}"


_BARE_HELPER = re.compile(r"(?<!SELECT )\bapp\.\w+\(\)")


async def test_policies_are_never_true_and_call_helpers_once_per_statement(
    admin_conn: asyncpg.Connection,
) -> None:
    rows = await admin_conn.fetch(
        "SELECT schemaname, tablename, policyname, qual, with_check FROM pg_policies")
    assert rows
    problems = []
    for r in rows:
        where = f"{r['schemaname']}.{r['tablename']} policy {r['policyname']}"
        for part in ("qual", "with_check"):
            text: str | None = r[part]
            if text is None:
                continue
            if text.strip().strip("()").strip().lower() == "true":
                problems.append(f"{where}: {part} is 'true'")
            for m in _BARE_HELPER.finditer(text):
                problems.append(f"{where}: {part} calls {m.group()} per row; wrap it as "
                                f"(SELECT {m.group()}) so it runs once as an InitPlan")
            if "current_setting(" in text:
                problems.append(f"{where}: {part} reads current_setting() directly; "
                                "use the app.* helpers in a sub-select")
    assert not problems, "\n".join(problems)


async def test_views_are_security_invoker_and_matviews_unreadable(
    admin_conn: asyncpg.Connection,
) -> None:
    rows = await admin_conn.fetch(
        "SELECT format('%I.%I', n.nspname, c.relname) AS name, c.relkind::text AS kind, "
        "       coalesce(c.reloptions, '{}') AS options, "
        "       has_table_privilege($1, c.oid, 'SELECT') AS app_select "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('v', 'm') AND n.nspname IN ('public', 'app')", APP_ROLE)
    on = {"security_invoker=true", "security_invoker=on", "security_invoker=1",
          "security_invoker=yes"}
    problems = [f"view {r['name']} is not security_invoker"
                for r in rows if r["kind"] == "v" and not on & {o.lower() for o in r["options"]}]
    problems += [f"materialized view {r['name']} is readable by {APP_ROLE}"
                 for r in rows if r["kind"] == "m" and r["app_select"]]
    assert not problems, "\n".join(problems)


async def test_security_definer_functions_are_pinned_and_not_public(
    admin_conn: asyncpg.Connection,
) -> None:
    probe = f"dl_probe_{uuid.uuid4().hex[:12]}"
    found: list[Finding] = []
    tx = admin_conn.transaction()
    await tx.start()
    try:
        await admin_conn.execute(f'CREATE ROLE "{probe}" NOLOGIN')  # no grants at all
        rows = await admin_conn.fetch(
            "SELECT p.oid::regprocedure::text AS sig, coalesce(p.proconfig, '{}') AS config, "
            "       has_function_privilege($1, p.oid, 'EXECUTE') AS public_exec, "
            "       o.rolsuper AS owner_super "
            "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "JOIN pg_roles o ON o.oid = p.proowner "
            "WHERE p.prosecdef AND n.nspname IN ('app', 'public')", probe)
        creatable = {r["nspname"] for r in await admin_conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE has_schema_privilege($1, oid, 'CREATE')",
            APP_ROLE)}
    finally:
        await tx.rollback()  # the probe role goes with it
    assert await admin_conn.fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1",
                                     probe) == 0
    assert rows, "no SECURITY DEFINER functions found: the check would be vacuous"
    for r in rows:
        sig = r["sig"].replace(", ", ",")
        paths = [c.partition("=")[2] for c in r["config"] if c.startswith("search_path=")]
        if not paths:
            found.append(Finding("secdef-no-search-path", sig, "no SET search_path"))
        else:
            path = [s.strip().strip('"') for s in paths[0].split(",")]
            # Unless pg_temp is listed, it is searched FIRST for tables: a caller's temp
            # table would shadow the definer's (PostgreSQL docs, "Writing SECURITY DEFINER
            # Functions Safely").
            if path[-1] != "pg_temp":
                found.append(Finding("secdef-search-path", sig, f"search_path={paths[0]}"))
            for schema in set(path) & creatable:
                found.append(Finding("secdef-writable-path", sig,
                                     f"{APP_ROLE} may CREATE in {schema}"))
        if r["public_exec"]:
            found.append(Finding("secdef-public", sig, "PUBLIC may EXECUTE it"))
        if r["owner_super"]:
            found.append(Finding("secdef-superuser", sig, "owned by a superuser"))
    settle(found, kinds("secdef-no-search-path", "secdef-search-path", "secdef-writable-path",
                        "secdef-public", "secdef-superuser"))


async def test_app_role_is_powerless_and_owns_nothing(admin_conn: asyncpg.Connection) -> None:
    role = await admin_conn.fetchrow(
        "SELECT oid, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolcanlogin "
        "FROM pg_roles WHERE rolname = $1", APP_ROLE)
    assert role is not None
    assert not role["rolsuper"] and not role["rolbypassrls"]
    assert not role["rolcreaterole"] and not role["rolcreatedb"] and not role["rolcanlogin"]
    owned = await admin_conn.fetch(
        "SELECT 'relation' AS kind, oid::regclass::text AS name FROM pg_class "
        "WHERE relowner = $1 "
        "UNION ALL SELECT 'function', oid::regprocedure::text FROM pg_proc WHERE proowner = $1 "
        "UNION ALL SELECT 'schema', nspname FROM pg_namespace WHERE nspowner = $1 "
        "UNION ALL SELECT 'type', oid::regtype::text FROM pg_type WHERE typowner = $1 "
        "UNION ALL SELECT 'database', datname FROM pg_database WHERE datdba = $1", role["oid"])
    assert not owned, f"{APP_ROLE} owns {[tuple(r) for r in owned]}"
    powers = await admin_conn.fetch(
        "SELECT rolname FROM pg_roles WHERE oid <> $1 AND pg_has_role($2, oid, 'MEMBER') "
        "AND (rolsuper OR rolbypassrls)", role["oid"], APP_ROLE)
    assert not powers, f"{APP_ROLE} is a member of {[r['rolname'] for r in powers]}"
    creatable = await admin_conn.fetch(
        "SELECT nspname FROM pg_namespace WHERE has_schema_privilege($1, oid, 'CREATE')",
        APP_ROLE)
    assert not creatable, f"{APP_ROLE} may CREATE in {[r['nspname'] for r in creatable]}"


# -- two tenants ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tenant:
    tag: str
    org_id: uuid.UUID
    owner_id: uuid.UUID
    viewer_id: uuid.UUID
    guest_id: uuid.UUID
    email: str

    def ctx(self, role: Role = "owner", *, read_only: bool = False) -> Context:
        user = {"viewer": self.viewer_id, "guest": self.guest_id}.get(role, self.owner_id)
        return Context(self.org_id, user_id=user, role=role, read_only=read_only)

    @property
    def owner(self) -> Context:
        return self.ctx("owner")


async def register(dl: DataLayer, email: str) -> uuid.UUID:
    """A new global account (the registration context carries its id, no organization)."""
    uid = uuid.uuid4()
    async with dl.session(Context(None, user_id=uid)) as db:
        await db.users.create(email=email, password_hash=f"$argon2id$fake${uid.hex}")
    return uid


async def join(dl: DataLayer, owner: Context, uid: uuid.UUID, role: str) -> None:
    """Bring ``uid`` into the owner's organization the only way there is: an invitation
    (owners: invited as admin, then promoted)."""
    if uid == owner.user_id:
        async with dl.session(owner) as db:
            await db.memberships.add(uid, role)
        return
    async with dl.session(Context(None, user_id=uid), readonly=True) as db:
        me = await db.users.get(uid)
    assert me is not None
    async with dl.session(owner) as db:
        token = await db.auth.invite(me.email, "admin" if role == "owner" else role)
    async with dl.session(Context(None, user_id=uid)) as db:
        assert await db.auth.consume_token("invitation", token) is not None
    if role == "owner":
        async with dl.session(owner) as db:
            await db.memberships.set_role(uid, "owner")


async def make_tenant(dl: DataLayer, tag: str) -> Tenant:
    """An organization with an owner (TOTP set up), a viewer, a guest, a team, an API key
    and a pending invitation: a row in every table of the identity schema; and a private
    workflow with two versions, shares and statistics; a credential, a webhook with an
    event, and a consent record."""
    org_id, h = uuid.uuid4(), uuid.uuid4().hex[:10]
    email = f"{tag}-owner-{h}@example.test"
    owner_id = uuid.uuid4()
    owner = Context(org_id, user_id=owner_id, role="owner")
    async with dl.session(owner) as db:
        await db.orgs.create(slug=f"{tag}-{h}", name=f"{tag} org {h}")
        await db.users.create(email=email, password_hash=f"$argon2id$fake${h}",
                              display_name=f"{tag} owner {h}")
        await db.memberships.add(owner_id, "owner")
        team = await db.teams.create(f"{tag} team {h}", description=f"{tag} team about {h}")
        await db.teams.add_member(team.id, owner_id, "lead")
        await db.api_keys.create(f"{tag} key {h}")
        assert await db.scalar("auth.totp_store", secret=os.urandom(48),
                               recovery_codes=[os.urandom(16).hex() for _ in range(3)])
        await db.scalar("auth.issue_invitation", email=f"{tag}-invitee-{h}@example.test",
                        role="member", token_hash=os.urandom(32), ttl_s=3600.0)
    viewer_id = await register(dl, f"{tag}-viewer-{h}@example.test")
    guest_id = await register(dl, f"{tag}-guest-{h}@example.test")
    await join(dl, owner, viewer_id, "viewer")
    await join(dl, owner, guest_id, "guest")
    async with dl.session(owner) as db:
        wf = await db.workflows.create(f"{tag} flow {h}", description=f"{tag} secret {h}",
                                       visibility="private", tags=[tag],
                                       nodes=[{"id": f"n{h}", "type": "http"}])
        await db.workflows.update(wf.id, settings={"rev": h})
        await db.workflows.share(wf.id, user_id=viewer_id)
        await db.workflows.share(wf.id, team_id=team.id, permission="edit")
        await db.connection.execute("SELECT app.workflow_stats_record($1, $2, 'succeeded', 42)",
                                    org_id, wf.id)
        cred = await db.credentials.create(f"{tag} cred {h}", "basic",
                                           {"username": f"{tag}-u-{h}", "password": h},
                                           metadata={"tag": tag})
        await db.credentials.decrypt(cred.id)
        hook = await db.webhooks.create(wf.id, name=f"{tag} hook {h}")
        await db.webhooks.ingest(hook.webhook.id, idempotency_key=f"{tag}-evt-{h}",
                                 event_type=f"{tag}.event", payload={"h": h},
                                 source_ip="192.0.2.7")
        await db.gdpr.record_consent(f"{tag}-purpose", granted=True, notice_version=f"v-{h}")
        # Plugins (private: nothing of them may cross), governance, an installation.
        plug = await db.plugins.create(f"{tag}-plug-{h}", summary=f"{tag} plugin {h}",
                                       tags=[tag], license="MIT")
        pv = await db.plugins.publish_version(
            plug.id, "1.0.0", {"name": plug.name, "entry_point": "p.m:run", "permissions": [],
                               "config_schema": {"type": "object", "properties": {
                                   "token": {"type": "string", "secret": True}}}},
            checksum="sha256:" + hashlib.sha256(h.encode()).hexdigest(), size_bytes=1,
            dependencies={uuid.uuid4(): "^1.0.0"})
        await db.plugins.approve_version(pv.id)
        await db.plugins.add_advisory(plug.id, f"CVE-{h}", "high", "<2.0.0")
        stage = await db.plugins.add_stage(1, f"{tag} review {h}")
        await db.plugins.decide(plug.id, pv.id, stage.id, "approved")
        await db.plugins.set_policy("license_allowlist", licenses=["MIT"])
        await db.plugins.approve_publisher(uuid.uuid4())
        await db.plugins.grant_exemption(plug.id, "no_critical_vulnerability",
                                         f"{tag} exemption {h}", ttl=timedelta(hours=1))
        await db.plugins.install(plug.id, pv.id, "development", secrets={"token": h})
        await db.plugins.ingest_usage([UsageEvent(plug.id, "invocation", 5.0)])
        await db.marketplace.create_listing(f"{tag} listing {h}", plugin_id=plug.id,
                                            price="9.99", status="draft")
        # DigiTwin: a model, a processed document with chunks, a session with a turn.
        await db.models.set_profile(personality_traits=[f"{tag}-trait-{h}"])
        model = await db.models.create("voice", provider=f"{tag}-prov",
                                       storage_uri=f"s3://{tag}/{h}.bin")
        await db.models.set_status(model.id, "training")
        await db.models.set_status(model.id, "ready")
        await db.models.activate(model.id)
        doc = await db.knowledge.create(f"{tag} doc {h}", content=f"{tag} knowledge {h}")
        await db.knowledge.claim(f"{tag}-worker")
        await db.knowledge.store_chunks(doc.document.id, f"{tag}-worker",
                                        [f"{tag} chunk {h}", f"{tag} more {h}"])
        chunk = (await db.knowledge.chunks(doc.document.id))[0]
        conv = await db.conversations.start(title=f"{tag} chat {h}")
        await db.conversations.append_turn(conv.id, input_text=f"{tag} asks {h}",
                                           response_text=f"{tag} answer {h}", total_ms=42,
                                           source_chunk_ids=[chunk.id])
    return Tenant(tag, org_id, owner_id, viewer_id, guest_id, email)


@pytest.fixture
async def pair(dl: DataLayer) -> tuple[Tenant, Tenant]:
    """Tenant A (the actor) and tenant B (the target), fresh for each test."""
    return await make_tenant(dl, "alpha"), await make_tenant(dl, "bravo")


Rows = dict[str, list[dict[str, Any]]]


async def snapshot(conn: asyncpg.Connection, tables: list[Table], org_id: uuid.UUID) -> Rows:
    """Every row of the tenant, read as the superuser: tenant tables by their key, global
    tables by GLOBAL_TABLES (partitions are read through their parent)."""
    out: Rows = {}
    for t in tables:
        if t.partition:
            continue
        key = t.tenant_key
        if key is not None:
            where = f"{key} = $1"
        elif t.name in GLOBAL_TABLES:
            where = GLOBAL_TABLES[t.name]
        else:
            continue
        rows = await conn.fetch(f"SELECT * FROM {t.qname} WHERE {where}", org_id)
        out[t.name] = sorted((dict(r) for r in rows), key=repr)
    return out


def flatten(value: object) -> Iterator[object]:
    """Every uuid, string and bytes value inside records, rows, lists and dicts."""
    if isinstance(value, asyncpg.Record | list | tuple | set | frozenset):
        for v in value:
            yield from flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from flatten(v)
    elif isinstance(value, uuid.UUID | bytes) or (isinstance(value, str) and len(value) >= 4):
        yield value


def distinctive(mine: Rows, others: Rows) -> set[object]:
    """Values of ``mine`` that the other tenant's rows do not also hold (ids, emails,
    names, hashes), i.e. values whose appearance would reveal this tenant."""
    return set(flatten(list(mine.values()))) - set(flatten(list(others.values())))


def phantom(value: object) -> object:
    """A value of the same type and (nearly) the same sort position that exists nowhere."""
    if isinstance(value, uuid.UUID):
        return uuid.UUID(int=value.int ^ 1)
    if isinstance(value, str):  # same length and shape: only the last letter or digit moves
        for i in range(len(value) - 1, -1, -1):
            c = value[i]
            if c.isdigit() or ("a" <= c.lower() <= "z"):
                other = {"0": "1", "a": "b", "A": "B"}.get(c, "0" if c.isdigit() else "a")
                return value[:i] + (other.upper() if c.isupper() else other) + value[i + 1:]
        return value + "0"
    if isinstance(value, bytes):
        return value[:-1] + bytes([value[-1] ^ 1]) if value else b"\x01"
    if isinstance(value, list):
        return [phantom(v) for v in value]
    return value


def default_for(pg_type: str) -> object:
    """A harmless value of a PostgreSQL type (NULL for types this table does not know)."""
    if pg_type.endswith("[]") or pg_type.startswith("_"):
        return []
    base = pg_type.rpartition(".")[2]
    now = datetime.now(UTC)
    defaults: dict[str, object] = {
        "text": "x", "varchar": "x", "bpchar": "x", "citext": "x", "name": "x",
        "int2": 10, "int4": 10, "int8": 10, "float4": 60.0, "float8": 60.0,
        "numeric": decimal.Decimal(10), "bool": True, "timestamptz": now,
        "timestamp": now.replace(tzinfo=None), "date": date.today(),
        "interval": timedelta(minutes=1), "jsonb": {}, "json": {}, "bytea": bytes(32),
        "inet": ipaddress.ip_address("192.0.2.1"), "uuid": uuid.uuid4(),
    }
    return defaults.get(base)


def param_value(query: str, param: str, pg_type: str, rows: Rows, org_id: uuid.UUID) -> object:
    """The other tenant's value for a parameter: by name from the query namespace's table,
    then ``<x>_id`` as the id of table ``<x>s``, then by column name anywhere, then by type
    (uuid: the other tenant's org id)."""
    ns = query.partition(".")[0]
    base = re.sub(r"^(after|before|from|to|min|max)_", "", param)

    def first(table: str, col: str) -> object:
        for row in rows.get(table, []):
            if row.get(col) is not None:
                return row[col]
        return None

    table = NAMESPACE_TABLES.get(ns, ns)
    candidates: list[tuple[str, str]] = [(table, base)]
    if base.endswith("_id"):
        x = base[:-3]
        candidates += [(NAMESPACE_TABLES.get(x + "s", x + "s"), "id"), (x, "id")]
        if x == "org":
            candidates.append((TENANT_ROOT, TENANT_ROOT_KEY))
    candidates += [(t, base) for t in sorted(rows)]
    for t, col in candidates:
        v = first(t, col)
        if v is not None:
            return v
    if pg_type == "uuid":
        return org_id
    return default_for(pg_type)


class Outcome(NamedTuple):
    value: Any
    error: DataLayerError | None


class _Rollback(Exception):
    pass


async def attempt(dl: DataLayer, ctx: Context, fn: Callable[[Session], Awaitable[T]], *,
                  commit: bool) -> Outcome:
    """Run ``fn`` in a session; roll back unless ``commit``. Driver errors of raw statements
    are mapped like the registry maps them; anything but a DataLayerError propagates."""
    box: list[T] = []
    try:
        async with dl.session(ctx) as db:
            try:
                box.append(await fn(db))
            except asyncpg.PostgresError as exc:
                err = translate(exc)
                assert err is not None
                raise err from exc
            if not commit:
                raise _Rollback
    except _Rollback:
        pass
    except DataLayerError as exc:
        return Outcome(None, exc)
    return Outcome(box[0] if box else None, None)


def execute(sql: str, *args: object) -> Callable[[Session], Awaitable[str]]:
    """A raw statement on the session's connection (its status: 'UPDATE 0')."""

    async def run(db: Session) -> str:
        status: str = await db.connection.execute(sql, *args)
        return status

    return run


def fetchval(sql: str, *args: object) -> Callable[[Session], Awaitable[Any]]:
    async def run(db: Session) -> Any:
        return await db.connection.fetchval(sql, *args)

    return run


def summary(shape: Shape, out: Outcome) -> tuple[object, ...]:
    """What a caller learns from an outcome, values aside."""
    if out.error is not None:
        return ("error", type(out.error).__name__, out.error.sqlstate, out.error.constraint)
    v = out.value
    if shape is Shape.MANY:
        return ("many", len(v))
    if shape in (Shape.ONE, Shape.SCALAR):
        return (shape.value, v is None)
    return (shape.value, v)


_REGISTRY = Registry.load(resource_dir("queries"))
TENANT_QUERIES = sorted(n for n, q in _REGISTRY.items()
                        if q.shape is not Shape.COPY and n not in GLOBAL_BY_DESIGN)
GLOBAL_QUERIES = sorted(n for n in GLOBAL_BY_DESIGN if n in _REGISTRY)


@pytest.fixture(scope="module")
async def query_infos(dl: DataLayer) -> dict[str, QueryInfo]:
    infos = {i.name: i for i in await dl.validate()}
    assert set(GLOBAL_BY_DESIGN) <= set(infos), "GLOBAL_BY_DESIGN names unknown queries"
    return infos


def fill(info: QueryInfo, rows: Rows, org_id: uuid.UUID, secret: set[object],
         ) -> tuple[dict[str, object], dict[str, object]]:
    """(the other tenant's values, phantoms of them): the phantom set differs only where a
    value is distinctive of the other tenant."""
    real: dict[str, object] = {}
    fake: dict[str, object] = {}
    for name, pg_type in info.params:
        v = param_value(info.name, name, pg_type, rows, org_id)
        real[name] = v
        fake[name] = phantom(v) if set(flatten([v])) & secret else v
    return real, fake


@pytest.mark.parametrize("name", TENANT_QUERIES)
async def test_registry_query_cannot_reach_another_tenant(
    name: str, dl: DataLayer, admin_conn: asyncpg.Connection, tables: list[Table],
    query_infos: dict[str, QueryInfo], pair: tuple[Tenant, Tenant],
) -> None:
    """Tenant A's owner runs the query with tenant B's ids and values: nothing of B comes
    back, nothing of B changes, and the outcome is the same as with values that exist
    nowhere (no existence oracle)."""
    a, b = pair
    info = query_infos[name]
    assert info.ok, info.error
    rows_a, rows_b = await snapshot(admin_conn, tables, a.org_id), \
        await snapshot(admin_conn, tables, b.org_id)
    secret = distinctive(rows_b, rows_a)
    assert {b.org_id, b.owner_id, b.email} <= secret
    real, fake = fill(info, rows_b, b.org_id, secret)
    echoed = set(flatten(list(real.values())))
    q = _REGISTRY[name]

    def call(params: dict[str, object]) -> Callable[[Session], Awaitable[Any]]:
        return lambda db: db.run(name, **params)

    found: list[Finding] = []
    with_b = await attempt(dl, a.owner, call(real), commit=False)
    with_nothing = await attempt(dl, a.owner, call(fake), commit=False)
    if summary(q.shape, with_b) != summary(q.shape, with_nothing):
        found.append(Finding("oracle", name, f"B's values: {summary(q.shape, with_b)}, "
                                             f"values that exist nowhere: "
                                             f"{summary(q.shape, with_nothing)}"))
    committed = await attempt(dl, a.owner, call(real), commit=True)
    # B's values the caller passed in may come back (an echo reveals nothing); any other
    # distinctive value of B is a leak. Existence leaks show up as the oracle above.
    leaked = set(flatten([with_b.value, committed.value])) & (secret - echoed)
    if leaked:
        found.append(Finding("leak", name, f"returned B's {sorted(map(str, leaked))}"))
    after = await snapshot(admin_conn, tables, b.org_id)
    if after != rows_b:
        changed = sorted(t for t in after if after[t] != rows_b.get(t))
        found.append(Finding("changed", name, f"B's rows changed in {changed}"))
    settle(found, lambda key: key[1] == name and key[0] in ("oracle", "leak", "changed"))


@pytest.mark.parametrize("name", GLOBAL_QUERIES)
async def test_global_query_returns_and_changes_nothing_of_another_tenant(
    name: str, dl: DataLayer, admin_conn: asyncpg.Connection, tables: list[Table],
    query_infos: dict[str, QueryInfo], pair: tuple[Tenant, Tenant],
) -> None:
    """Cross-tenant by design (GLOBAL_BY_DESIGN): given values that are not B's (phantoms of
    B's ids, emails and hashes), from A's session and with no context, nothing of B comes
    back or changes."""
    a, b = pair
    info = query_infos[name]
    assert info.ok, info.error
    rows_a, rows_b = await snapshot(admin_conn, tables, a.org_id), \
        await snapshot(admin_conn, tables, b.org_id)
    secret = distinctive(rows_b, rows_a)
    _, fake = fill(info, rows_b, b.org_id, secret)
    for ctx in (a.owner, Context(None)):
        out = await attempt(dl, ctx, lambda db: db.run(name, **fake), commit=True)
        leaked = set(flatten([out.value])) & secret
        assert not leaked, f"{name} returned B's {leaked}"
    assert await snapshot(admin_conn, tables, b.org_id) == rows_b


async def test_pre_context_functions_cannot_take_over_another_tenants_account(
    dl: DataLayer, admin_conn: asyncpg.Connection, pair: tuple[Tenant, Tenant],
) -> None:
    """From tenant A's session, with only B's owner's id or email (not a secret): the
    login-path functions must not change B's credentials or return B's secrets."""
    a, b = pair

    async def creds() -> asyncpg.Record:
        row = await admin_conn.fetchrow(
            "SELECT password_hash, totp_secret, totp_last_step, totp_enabled_at, "
            "recovery_codes, failed_logins, locked_until FROM users WHERE id = $1", b.owner_id)
        assert row is not None
        return row

    found: list[Finding] = []
    before = await creds()
    out = await attempt(dl, a.owner, lambda db: db.one("auth.totp_state", user_id=b.owner_id),
                        commit=True)
    if out.value is not None and out.value["secret"] == before["totp_secret"]:
        found.append(Finding("pre-context", "auth.totp_state", "returned B's TOTP secret"))
    await attempt(dl, a.owner, lambda db: db.scalar("auth.totp_accept", user_id=b.owner_id,
                                                    step=2**40), commit=True)
    if (await creds())["totp_last_step"] != before["totp_last_step"]:
        found.append(Finding("pre-context", "auth.totp_accept", "changed B's TOTP state"))
    await attempt(dl, a.owner, lambda db: db.scalar(
        "auth.record_login", user_id=b.owner_id, success=True, new_hash="$attacker$1"),
        commit=True)
    if (await creds())["password_hash"] == "$attacker$1":
        found.append(Finding("pre-context", "auth.record_login", "set B's password hash"))
    token = os.urandom(32)

    async def reset(db: Session) -> object:
        await db.scalar("auth.issue_user_token", kind="password_reset", email=b.email,
                        token_hash=token, ttl_s=600.0)
        return await db.one("auth.consume_token", kind="password_reset", token_hash=token,
                            new_hash="$attacker$2")

    await attempt(dl, a.owner, reset, commit=True)
    if (await creds())["password_hash"] == "$attacker$2":
        found.append(Finding("pre-context", "auth.issue_user_token+consume_token",
                             "reset B's password"))
    settle(found, kinds("pre-context"))


async def test_secdef_functions_ignore_the_callers_temp_tables(
    dl: DataLayer, pair: tuple[Tenant, Tenant],
) -> None:
    """A session that shadows api_keys with a temp table must not make verify_api_key (run
    as its BYPASSRLS owner) vouch for an organization of the attacker's choosing."""
    a, b = pair
    secret = "dl_test_" + uuid.uuid4().hex

    async def hijack(db: Session) -> Any:
        conn = db.connection
        await conn.execute("CREATE TEMP TABLE api_keys (org_id uuid, id uuid, user_id uuid, "
                           "scopes text[], last_used_at timestamptz, key_hash bytea, "
                           "revoked_at timestamptz, expires_at timestamptz) ON COMMIT DROP")
        await conn.execute("GRANT ALL ON pg_temp.api_keys TO datalayer_maint")
        await conn.execute("INSERT INTO pg_temp.api_keys (org_id, id, user_id, key_hash, scopes) "
                           "VALUES ($1, $2, $3, $4, '{admin}')", b.org_id, uuid.uuid4(),
                           b.owner_id, hashlib.sha256(secret.encode()).digest())
        return await db.api_keys.verify(secret)

    out = await attempt(dl, a.owner, hijack, commit=False)
    found = []
    if out.value is not None and out.value.org_id == b.org_id:
        found.append(Finding("temp-shadow", "app.verify_api_key(bytea)",
                             f"vouched for B as {out.value.role} with a forged key"))
    settle(found, kinds("temp-shadow"))


# -- raw writes with the other tenant's org id ----------------------------------------------------

def _json_default(pg_type: str) -> object:
    v = default_for(pg_type)
    if isinstance(v, bytes):
        return "\\x" + v.hex()
    if isinstance(v, datetime | date | uuid.UUID | decimal.Decimal | timedelta):
        return str(v)
    if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(v)
    return v


async def row_for(conn: asyncpg.Connection, t: Table, org_id: uuid.UUID) -> dict[str, Any]:
    """A row of ``t`` for tenant ``org_id`` as JSON: a real row of that tenant with fresh ids,
    or one built from the catalog (NOT NULL columns without default, filled by type)."""
    key = t.tenant_key
    where = f"{key} = $1" if key else GLOBAL_TABLES[t.name]
    text = await conn.fetchval(f"SELECT to_jsonb(x) FROM {t.qname} x WHERE {where} LIMIT 1",
                               org_id)
    row: dict[str, Any]
    if text is not None:
        row = json.loads(text)
    else:
        row = {c.name: _json_default(c.type) for c in t.cols
               if c.notnull and not c.has_default}
    for c in t.cols:  # fresh ids and keys, so that only the tenant could make it fail
        if c.name in t.pk and c.name != key and c.type == "uuid":
            row[c.name] = str(uuid.uuid4())
        if c.name == "email":
            row[c.name] = f"fresh-{uuid.uuid4().hex[:12]}@example.test"
        if c.name == "slug":
            row[c.name] = f"fresh-{uuid.uuid4().hex[:12]}"
    if key:
        row[key] = str(org_id)
    return row


def insert_sql(t: Table, row: dict[str, Any]) -> tuple[str, bool]:
    """INSERT of ``row`` through json_populate_record, in the columns datalayer_app may
    insert (all of them when it may insert none); and whether RLS is what must refuse it."""
    granted = [c.name for c in t.cols if c.name in row and c.app_insert]
    cols = granted or [c.name for c in t.cols if c.name in row]
    names = ", ".join(f'"{c}"' for c in cols)
    return (f"INSERT INTO {t.qname} ({names}) SELECT {names} "
            f"FROM json_populate_record(NULL::{t.qname}, $1::json)"), bool(granted)


def _denied(err: DataLayerError | None, *, by_rls: bool) -> bool:
    return isinstance(err, PermissionDenied) and (not by_rls or "row-level security" in str(err))


async def test_writing_another_tenants_org_id_is_refused(
    dl: DataLayer, admin_conn: asyncpg.Connection, tables: list[Table],
    pair: tuple[Tenant, Tenant],
) -> None:
    """From A's owner session, for every tenant table (partitions included): INSERT a row
    carrying B's org id, move A's rows to B, and touch B's rows. RLS refuses or sees
    nothing; B's rows do not change."""
    a, b = pair
    before = await snapshot(admin_conn, tables, b.org_id)
    problems = []
    for t in _tenant_tables(tables):
        key = t.tenant_key
        assert key is not None
        row = await row_for(admin_conn, t, b.org_id)
        sql, by_rls = insert_sql(t, row)
        out = await attempt(dl, a.owner, execute(sql, row), commit=True)
        if not _denied(out.error, by_rls=by_rls):
            problems.append(f"INSERT into {t.qname} with B's {key}: {out}")
        # Move A's rows to B.
        count_a = await admin_conn.fetchval(
            f"SELECT count(*) FROM {t.qname} WHERE {key} = $1", a.org_id)
        col = t.col(key)
        assert col is not None
        out = await attempt(dl, a.owner, execute(
            f"UPDATE {t.qname} SET {key} = $1 WHERE {key} = $2", b.org_id, a.org_id),
            commit=True)
        if not (_denied(out.error, by_rls=col.app_update)
                or (out.error is None and out.value == "UPDATE 0" and count_a == 0)):
            problems.append(f"UPDATE {t.qname} SET {key} = B (A has {count_a} rows): {out}")
        # Touch B's rows.
        upd = next((c.name for c in t.cols if c.app_update), None)
        stmts = [f"UPDATE {t.qname} SET \"{upd}\" = \"{upd}\" WHERE {key} = $1"] if upd else []
        stmts += [f"DELETE FROM {t.qname} WHERE {key} = $1"] if t.app_delete else []
        for sql in stmts:
            out = await attempt(dl, a.owner, execute(sql, b.org_id), commit=True)
            if not (isinstance(out.error, PermissionDenied)
                    or (out.error is None and str(out.value).endswith(" 0"))):
                problems.append(f"{sql} (B): {out}")
    after = await snapshot(admin_conn, tables, b.org_id)
    assert not problems, "\n".join(problems)
    assert after == before


async def test_no_context_reads_nothing_and_writes_nothing(
    dl: DataLayer, admin_conn: asyncpg.Connection, tables: list[Table],
    pair: tuple[Tenant, Tenant],
) -> None:
    """Context(None): every table under RLS reads zero rows (or is not readable at all),
    and an INSERT of a copy of an existing row is refused."""
    _, b = pair
    nobody = Context(None)
    problems = []
    for t in _reachable(tables):
        if not t.rls:
            continue
        total = await admin_conn.fetchval(f"SELECT count(*) FROM {t.qname}")
        out = await attempt(dl, nobody, fetchval(f"SELECT count(*) FROM {t.qname}"),
                            commit=False)
        if not (out.value == 0 or _denied(out.error, by_rls=False)):
            problems.append(f"{t.qname}: no context reads {out} (of {total})")
        if t.is_tenant or t.name in GLOBAL_TABLES:
            row = await row_for(admin_conn, t, b.org_id)
            sql, _ = insert_sql(t, row)
            out = await attempt(dl, nobody, execute(sql, row), commit=True)
            if not _denied(out.error, by_rls=False):
                problems.append(f"{t.qname}: no context INSERT: {out}")
    assert not problems, "\n".join(problems)
    assert await admin_conn.fetchval("SELECT count(*) FROM organizations") > 0


class _Touched(Exception):
    def __init__(self, rows: list[Any]) -> None:
        super().__init__(f"{len(rows)} rows")
        self.rows = rows


async def test_read_only_roles_cannot_write(
    dl: DataLayer, admin_conn: asyncpg.Connection, tables: list[Table],
    pair: tuple[Tenant, Tenant],
) -> None:
    """A viewer, a guest and a read-only owner of A: UPDATE (a column set to itself) and
    DELETE of every A row affect nothing or are refused, except SELF_SERVICE_WRITES, which
    may touch only the actor's own rows; A's rows are unchanged afterwards."""
    a, _ = pair
    tenant = _tenant_tables(tables, partitions=False)
    before = await snapshot(admin_conn, tables, a.org_id)
    assert all(before[n] for n in ("organizations", "memberships", "teams"))  # not vacuous
    assert {t.name for t in tenant} <= set(before)
    problems = []
    for ctx in (a.ctx("viewer"), a.ctx("guest"), a.ctx("owner", read_only=True)):
        for t in _tenant_tables(tables):
            key = t.tenant_key
            visible = [f'"{c.name}"' for c in t.cols if c.app_select]
            returning = f" RETURNING {', '.join(visible)}" if visible else ""
            upd = next((c.name for c in t.cols if c.app_update), None)
            stmts: list[tuple[str, str]] = []
            if upd:
                stmts.append(("UPDATE", f'UPDATE {t.qname} SET "{upd}" = "{upd}" '
                                        f"WHERE {key} = $1{returning}"))
            if t.app_delete:
                stmts.append(("DELETE", f"DELETE FROM {t.qname} WHERE {key} = $1{returning}"))
            for command, sql in stmts:
                allowed = SELF_SERVICE_WRITES.get((t.name, command))

                async def run(db: Session, sql: str = sql, ctx: Context = ctx,
                              allowed: tuple[str, str] | None = allowed) -> list[Any]:
                    rows = await db.connection.fetch(sql, a.org_id)
                    if rows:  # keep A intact for the next statements either way
                        own = allowed is not None and all(
                            r[allowed[0]] == ctx.user_id for r in rows)
                        raise _Rollback if own else _Touched(rows)
                    return rows

                try:
                    out = await attempt(dl, ctx, run, commit=True)
                except _Touched as touched:
                    problems.append(f"{ctx.role} (read_only={ctx.read_only}) {command} "
                                    f"{t.qname}: touched {len(touched.rows)} rows")
                    continue
                if out.error is not None and not isinstance(out.error, PermissionDenied):
                    problems.append(f"{ctx.role} {command} {t.qname}: {out.error!r}")
    assert not problems, "\n".join(problems)
    assert await snapshot(admin_conn, tables, a.org_id) == before


async def test_public_template_catalog_is_the_only_crossing(
    dl: DataLayer, admin_conn: asyncpg.Connection, tables: list[Table],
    pair: tuple[Tenant, Tenant],
) -> None:
    """B publishes a template. Every role of A reads B's rows in CROSS_TENANT_READABLE
    tables and nowhere else; nobody writes those tables; no context reads nothing; B's rows do
    not change; unpublished, the template is gone from A's view."""
    a, b = pair
    async with dl.session(b.owner) as db:
        tpl = await db.workflows.create(f"bravo public {uuid.uuid4().hex[:8]}",
                                        is_template=True, visibility="public")
    before = await snapshot(admin_conn, tables, b.org_id)
    assert {t: len(before[t]) for t in CROSS_TENANT_READABLE} == {
        t: 1 for t in CROSS_TENANT_READABLE}  # not vacuous
    problems = []
    for ctx in (a.owner, a.ctx("viewer"), a.ctx("guest")):
        for t in _tenant_tables(tables, partitions=False):
            key = t.tenant_key
            out = await attempt(dl, ctx, fetchval(
                f"SELECT count(*) FROM {t.qname} WHERE {key} = $1", b.org_id), commit=False)
            expected = len(before[t.name]) if t.name in CROSS_TENANT_READABLE else 0
            if not (out.value == expected or (expected == 0 and _denied(out.error,
                                                                         by_rls=False))):
                problems.append(f"{ctx.role} reads {out} of B's {t.qname}, expected {expected}")
    for name in CROSS_TENANT_READABLE:
        t = next(x for x in tables if x.name == name)
        row = await row_for(admin_conn, t, a.org_id)
        sql, _ = insert_sql(t, row)
        for ctx in (a.owner, b.owner):
            for stmt, args in ((sql, (row,)),
                               (f"UPDATE {t.qname} SET {t.tenant_key} = {t.tenant_key}", ()),
                               (f"DELETE FROM {t.qname}", ())):
                out = await attempt(dl, ctx, execute(stmt, *args), commit=True)
                if not _denied(out.error, by_rls=False):
                    problems.append(f"{ctx.role} of {'A' if ctx is a.owner else 'B'}: "
                                    f"{stmt.split(' (')[0]}: {out}")
        out = await attempt(dl, Context(None), fetchval(f"SELECT count(*) FROM {t.qname}"),
                            commit=False)
        if out.value != 0:
            problems.append(f"no context reads {out} of {t.qname}")
    assert not problems, "\n".join(problems)
    assert await snapshot(admin_conn, tables, b.org_id) == before
    async with dl.session(b.owner) as db:
        await db.workflows.update(tpl.id, visibility="organization")
    out = await attempt(dl, a.owner, fetchval(
        "SELECT count(*) FROM workflow_public_templates WHERE org_id = $1", b.org_id),
        commit=False)
    assert out.value == 0


# -- stateful: random tenants, roles and operations ------------------------------------------------

ADMINS = ("owner", "admin")
WRITERS = ("owner", "admin", "member")


class LoopThread:
    """An event loop in a background thread, for driving async code from a sync machine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class ModelTenant:
    org_id: uuid.UUID
    users: dict[Role, uuid.UUID]  # role -> its member
    members: set[uuid.UUID]
    teams: set[uuid.UUID] = field(default_factory=set)
    keys: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)  # key id -> user id


@dataclass
class World:
    lt: LoopThread
    dl: DataLayer
    tenants: list[ModelTenant] = field(default_factory=list)

    def ctx(self, t: int, role: Role) -> Context:
        return Context(self.tenants[t].org_id, user_id=self.tenants[t].users[role], role=role)

    def call(self, ctx: Context, fn: Callable[[Session], Awaitable[T]]) -> Outcome:
        return self.lt.run(attempt(self.dl, ctx, fn, commit=True))

    @property
    def all_users(self) -> list[uuid.UUID]:
        return sorted({u for m in self.tenants for u in m.members})

    @property
    def all_teams(self) -> list[tuple[int, uuid.UUID]]:
        return sorted((i, x) for i, m in enumerate(self.tenants) for x in m.teams)


async def build_world(world: World) -> None:
    dl = world.dl
    shared = await register(dl, f"shared-{uuid.uuid4().hex[:10]}@example.test")
    for i in range(3):
        org_id, h = uuid.uuid4(), uuid.uuid4().hex[:8]
        users = {r: await register(dl, f"s{i}-{r}-{h}@example.test") for r in ROLES}
        owner = Context(org_id, user_id=users["owner"], role="owner")
        m = ModelTenant(org_id, users, set(users.values()))
        async with dl.session(owner) as db:
            await db.orgs.create(slug=f"s{i}-{h}", name=f"Stateful {i}")
        await join(dl, owner, users["owner"], "owner")
        for role, uid in users.items():
            if role != "owner":
                await join(dl, owner, uid, role)
        if i < 2:  # one account in two organizations
            await join(dl, owner, shared, "member")
            m.members.add(shared)
        async with dl.session(owner) as db:
            m.teams.add((await db.teams.create(f"first {h}")).id)
            m.keys[(await db.api_keys.create("first")).key.id] = users["owner"]
        world.tenants.append(m)


def _objects(value: object) -> Iterator[object]:
    if isinstance(value, Page):
        yield from value.items
    elif isinstance(value, list):
        yield from value
    elif isinstance(value, IssuedKey):
        yield value.key
    elif value is not None:
        yield value


TENANT = st.integers(0, 2)
ROLE = st.sampled_from(ROLES)
PICK = st.integers(0, 10_000)


class TenantMachine(RuleBasedStateMachine):
    """Random tenants, roles and operations through the repositories. After every step,
    everything returned belongs to the acting tenant (users: its members or the actor)."""

    world: ClassVar[World]  # set by a subclass per test run

    def __init__(self) -> None:
        super().__init__()
        self.w = self.world
        self.returned: list[tuple[int, Context, object]] = []

    def _call(self, t: int, role: Role, fn: Callable[[Session], Awaitable[Any]]) -> Outcome:
        ctx = self.w.ctx(t, role)
        out = self.w.call(ctx, fn)
        if out.error is not None:
            assert isinstance(out.error, ValidationError | PermissionDenied | NotFound), \
                repr(out.error)
        self.returned.append((t, ctx, out.value))
        return out

    @rule(t=TENANT, role=ROLE)
    def create_team(self, t: int, role: Role) -> None:
        out = self._call(t, role, lambda db: db.teams.create(f"t {uuid.uuid4().hex[:12]}"))
        assert (out.error is None) == (role in ADMINS), out
        if out.error is None:
            self.w.tenants[t].teams.add(out.value.id)

    @rule(t=TENANT, role=ROLE, pick=PICK)
    def rename_team(self, t: int, role: Role, pick: int) -> None:
        owner, team = self.w.all_teams[pick % len(self.w.all_teams)]
        out = self._call(t, role, lambda db: db.teams.rename(
            team, name=f"r {uuid.uuid4().hex[:12]}"))
        assert (out.error is None) == (role in ADMINS and owner == t), out

    @rule(t=TENANT, role=ROLE, pick=PICK, who=PICK)
    def add_team_member(self, t: int, role: Role, pick: int, who: int) -> None:
        owner, team = self.w.all_teams[pick % len(self.w.all_teams)]
        user = self.w.all_users[who % len(self.w.all_users)]
        out = self._call(t, role, lambda db: db.teams.add_member(team, user))
        ok = role in ADMINS and owner == t and user in self.w.tenants[t].members
        assert (out.error is None) == ok, out

    @rule(t=TENANT, role=ROLE)
    def create_api_key(self, t: int, role: Role) -> None:
        out = self._call(t, role, lambda db: db.api_keys.create("k"))
        assert (out.error is None) == (role in WRITERS), out
        if out.error is None:
            self.w.tenants[t].keys[out.value.key.id] = self.w.tenants[t].users[role]

    @rule(t=TENANT, role=ROLE)
    def list_teams(self, t: int, role: Role) -> None:
        out = self._call(t, role, lambda db: db.teams.list(limit=1000))
        assert {x.id for x in out.value.items} == self.w.tenants[t].teams

    @rule(t=TENANT, role=ROLE)
    def list_api_keys(self, t: int, role: Role) -> None:
        out = self._call(t, role, lambda db: db.api_keys.list(limit=1000))
        m = self.w.tenants[t]
        expected = {k for k, u in m.keys.items() if role in ADMINS or u == m.users[role]}
        assert {k.id for k in out.value.items} == expected

    @rule(t=TENANT, role=ROLE)
    def list_members(self, t: int, role: Role) -> None:
        users = self._call(t, role, lambda db: db.users.list_members(limit=1000))
        assert {u.id for u in users.value.items} == self.w.tenants[t].members
        ms = self._call(t, role, lambda db: db.memberships.list(limit=1000))
        assert {x.user_id for x in ms.value.items} == self.w.tenants[t].members

    @rule(t=TENANT, role=ROLE, other=TENANT)
    def get_org(self, t: int, role: Role, other: int) -> None:
        out = self._call(t, role, lambda db: db.orgs.get(self.w.tenants[other].org_id))
        assert (out.value is not None) == (other == t)

    @rule(t=TENANT, role=ROLE, who=PICK)
    def get_user(self, t: int, role: Role, who: int) -> None:
        user = self.w.all_users[who % len(self.w.all_users)]
        out = self._call(t, role, lambda db: db.users.get(user))
        visible = user in self.w.tenants[t].members or user == self.w.tenants[t].users[role]
        assert (out.value is not None) == visible

    @invariant()
    def everything_returned_belongs_to_the_acting_tenant(self) -> None:
        for t, ctx, value in self.returned:
            m = self.w.tenants[t]
            for obj in _objects(value):
                if isinstance(obj, Organization):
                    assert obj.id == m.org_id, obj
                elif isinstance(obj, User):
                    assert obj.id in m.members or obj.id == ctx.user_id, obj
                else:
                    assert getattr(obj, "org_id", m.org_id) == m.org_id, obj
                    assert getattr(obj, "user_id", ctx.user_id) in m.members | {ctx.user_id}
        self.returned.clear()


def test_random_operations_stay_inside_their_tenant(database_url: str) -> None:
    lt = LoopThread()
    try:
        dl = DataLayer(make_settings(database_url, migrate_on_start=False))
        lt.run(dl.start())
        try:
            built = World(lt, dl)
            lt.run(build_world(built))

            class Machine(TenantMachine):
                world = built

            run_state_machine_as_test(
                Machine,
                settings=hsettings(max_examples=15, stateful_step_count=12, deadline=None,
                                   database=None,
                                   suppress_health_check=[HealthCheck.too_slow]))
        finally:
            lt.run(dl.close())
    finally:
        lt.close()


# -- plans: policies run once per statement, lookups use indexes -----------------------------------

ORGS, USERS = 30, 3000


def _md5_uuid(text: str) -> uuid.UUID:
    return uuid.UUID(hashlib.md5(text.encode(), usedforsecurity=False).hexdigest())


@pytest.fixture(scope="module")
async def seeded_dl() -> AsyncIterator[DataLayer]:
    """A database of its own with 30 organizations, 3,000 users, memberships, teams and API
    keys, analyzed."""
    name = f"dl_test_{RUN_ID}_plans"
    url = await asyncio.to_thread(create_database, name)
    try:
        await asyncio.to_thread(migrations.apply, make_settings(url), resource_dir("schema"))
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"""
              INSERT INTO organizations (id, slug, name)
                SELECT md5('org' || g)::uuid, 'seed-' || g, 'Seed ' || g
                FROM generate_series(1, {ORGS}) g;
              INSERT INTO users (id, email)
                SELECT md5('user' || g)::uuid, 'user' || g || '@seed.test'
                FROM generate_series(1, {USERS}) g;
              INSERT INTO memberships (org_id, user_id, role)
                SELECT md5('org' || (g % {ORGS} + 1))::uuid, md5('user' || g)::uuid,
                       CASE WHEN g <= {ORGS} THEN 'owner' ELSE 'member' END
                FROM generate_series(1, {USERS}) g;
              INSERT INTO teams (org_id, name)
                SELECT md5('org' || (g % {ORGS} + 1))::uuid, 'team ' || g
                FROM generate_series(1, {USERS}) g;
              INSERT INTO api_keys (org_id, user_id, name, prefix, key_hash, last4)
                SELECT md5('org' || (g % {ORGS} + 1))::uuid, md5('user' || g)::uuid, 'k' || g,
                       'dl_test_', sha256(('key' || g)::bytea), 'abcd'
                FROM generate_series(1, {USERS}) g;
              ANALYZE;
            """)
        finally:
            await conn.close()
        async with DataLayer(make_settings(url, migrate_on_start=False)) as layer:
            yield layer
    finally:
        await asyncio.to_thread(drop_database, name)


def _plan_findings(query: str, plan: dict[str, Any], tables: set[str], *,
                   rls: bool) -> list[Finding]:
    found = []
    nodes = list(plan_nodes(plan))
    for n in nodes:
        if n["Node Type"] == "Seq Scan" and n.get("Relation Name") in tables:
            found.append(Finding("seq-scan", query, f"Seq Scan on {n['Relation Name']}"))
        for k in ("Filter", "Join Filter"):
            if "current_setting(" in str(n.get(k, "")):
                found.append(Finding("per-row-helper", query, f"{k}: {n[k]}"))
    if rls and not any(n.get("Parent Relationship") == "InitPlan"
                       or str(n.get("Subplan Name", "")).startswith("InitPlan") for n in nodes):
        found.append(Finding("no-initplan", query, "the policy helpers are not an InitPlan"))
    return found


async def _explain(conn: asyncpg.Connection, sql: str, args: list[object]) -> dict[str, Any]:
    raw = await conn.fetchval("EXPLAIN (FORMAT JSON) " + sql, *args)
    doc = json.loads(raw) if isinstance(raw, str) else raw
    plan: dict[str, Any] = doc[0]["Plan"]
    return plan


async def test_policy_lookups_use_indexes_and_initplans(seeded_dl: DataLayer) -> None:
    dl = seeded_dl
    org, user, other = _md5_uuid("org1"), _md5_uuid(f"user{ORGS}"), _md5_uuid(f"user{2 * ORGS}")
    ctx = Context(org, user_id=user, role="owner")
    cases: dict[str, dict[str, object]] = {
        "users.get_by_email": {"email": f"USER{2 * ORGS}@seed.test"},
        "memberships.get": {"user_id": other},
        "teams.list": {"after_name": "", "after_id": uuid.UUID(int=0), "limit": 50},
    }
    checked = {"users", "memberships", "teams", "api_keys"}
    found: list[Finding] = []
    async with dl.session(ctx, readonly=True) as db:
        for name, params in cases.items():
            q = dl.registry[name]
            plan = await _explain(db.connection, q.sql, q.bind(params))
            found += _plan_findings(name, plan, checked, rls=True)
            row = await db.run(name, **params)  # and the query finds what it should
            assert row, name
    # api_keys.verify: the statements inside its SECURITY DEFINER function, as run (no
    # policy applies there: the owner bypasses RLS), captured by auto_explain.
    key = hashlib.sha256(b"key60").digest()
    for plan in await nested_plans(dl.settings.database_url, Context(None),
                                    dl.registry["api_keys.verify"].sql, [key]):
        found += _plan_findings("api_keys.verify", plan, checked, rls=False)
    async with dl.session(Context(None)) as db:
        assert await db.run("api_keys.verify", key_hash=key) is not None
    settle(found, kinds("seq-scan", "per-row-helper", "no-initplan"))
