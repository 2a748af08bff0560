"""GDPR: consent records, subject export, erasure and masked member lists
(``queries/gdpr.sql``, ``schema/0016_gdpr.sql``).

``db.gdpr`` records consents (append-only; the current state per purpose is the latest
record), exports everything stored about a user as a JSON-serialisable dict, erases or
anonymizes it, and lists the organization's members with other users' emails masked for
roles below admin.

Export and erasure are driven by the personal-data registry ``app.personal_data``: one row
per (table, column pointing at the subject). A later table opts in with one INSERT in its
migration and is then exported and erased with no code change here. Scope:

* a tenant session of an owner or admin: the part in the context organization (plus the
  profile when the subject is a member);
* the subject themself: their own data (every organization they belong to when the context
  has no organization);
* ``dl.system()``: everything, every organization.

Exports list the audit events about the subject that the session may read; exports and
erasures are themselves audited (``db.audit``).
"""

from __future__ import annotations

import builtins
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from datalayer.cache import lookups
from datalayer.core.errors import ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import FIRST, Repository, check_ip, check_limit
from datalayer.repos.audit import GLOBAL_ORG

if TYPE_CHECKING:
    from datalayer.core.session import Session

__all__ = ["SECTIONS", "Consent", "Erasure", "Gdpr", "MaskedMember", "pseudonym"]

# Registry entries with a section of their own in an export; every other entry goes under
# "other", keyed "<table>.<column>".
SECTIONS: dict[tuple[str, str], str] = {
    ("users", "id"): "profile",
    ("memberships", "user_id"): "memberships",
    ("workflows", "owner_id"): "workflows",
    ("executions", "created_by"): "executions",
    ("notifications", "user_id"): "notifications",
    ("consents", "user_id"): "consents",
}


def pseudonym(user_id: uuid.UUID) -> str:
    """The stable pseudonym erasure writes for a user (same as ``app.gdpr_pseudonym``)."""
    return "erased-" + hashlib.sha256(str(user_id).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True, kw_only=True)
class Consent:
    org_id: uuid.UUID
    id: uuid.UUID
    user_id: uuid.UUID
    purpose: str
    notice_version: str
    granted: bool
    source: str
    recorded_by: uuid.UUID | None
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskedMember:
    org_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    display_name: str
    email: str
    status: str
    joined_at: datetime


@dataclass(frozen=True, slots=True)
class Erasure:
    """What an erasure did. ``organization`` None: everywhere (maintenance). ``affected``:
    rows per registry entry ``"<table>.<column>"``; ``profile_erased``: the global profile
    (and sessions, tokens) went too; ``audit_redacted``: the audit trail was redacted (False
    when this database has no audit trail)."""

    user_id: uuid.UUID
    pseudonym: str
    organization: uuid.UUID | None
    affected: dict[str, int]
    profile_erased: bool
    audit_redacted: bool


RECORD = RowQuery("gdpr.record_consent", Consent)
STATE = RowQuery("gdpr.consent_state", Consent)
HISTORY = RowQuery("gdpr.consent_history", Consent)
MEMBERS = RowQuery("gdpr.members_masked", MaskedMember)


class Gdpr(Repository):
    """``db.gdpr``: consents, subject export and erasure, masked member lists."""

    __slots__ = ()

    # -- consents -------------------------------------------------------------------------
    async def record_consent(self, purpose: str, *, granted: bool, notice_version: str,
                             source: str = "web", user_id: uuid.UUID | None = None,
                             org_id: uuid.UUID | None = None) -> Consent:
        """Append a consent record (``granted=False`` records a withdrawal) for the context
        user, or for ``user_id`` (a member; admins only). ``PermissionDenied`` for anyone
        else's or a non-member. ``org_id`` is for maintenance sessions."""
        row = await self._db.fetch_one(RECORD, org_id=org_id, user_id=user_id,
                                       purpose=purpose, notice_version=notice_version,
                                       granted=granted, source=source)
        assert row is not None
        return row

    async def consents(self, *, user_id: uuid.UUID | None = None,
                       org_id: uuid.UUID | None = None) -> dict[str, Consent]:
        """The current state per purpose (the latest record of each), by purpose."""
        rows = await self._db.fetch_many(STATE, org_id=org_id, user_id=user_id)
        return {c.purpose: c for c in rows}

    async def has_consent(self, purpose: str, *, user_id: uuid.UUID | None = None,
                          org_id: uuid.UUID | None = None) -> bool:
        """True only when the latest record for ``purpose`` grants it."""
        granted: bool | None = await self._db.scalar("gdpr.has_consent", org_id=org_id,
                                                     user_id=user_id, purpose=purpose)
        return bool(granted)

    async def consent_history(self, *, user_id: uuid.UUID | None = None,
                              org_id: uuid.UUID | None = None,
                              limit: int = 100) -> builtins.list[Consent]:
        """Every record of the subject, newest first."""
        return await self._db.fetch_many(HISTORY, org_id=org_id, user_id=user_id,
                                         limit=check_limit(limit))

    # -- masking --------------------------------------------------------------------------
    async def members(self, *, after: tuple[datetime, uuid.UUID] | None = None,
                      limit: int = 100) -> builtins.list[MaskedMember]:
        """The organization's live members, oldest first; other users' emails are masked
        (``a***@example.com``) unless the context is an owner or admin."""
        at, uid = after or FIRST
        return await self._db.fetch_many(MEMBERS, after_joined_at=at, after_user_id=uid,
                                         limit=check_limit(limit))

    async def visible_ip(self, ip: str, user_id: uuid.UUID) -> str | None:
        """``ip`` (of user ``user_id``) as the context may see it: itself for the user and
        for admins, its /24 (IPv4) or /48 (IPv6) network for everyone else."""
        shown: str | None = await self._db.scalar("gdpr.visible_ip", ip=check_ip(ip, "ip"),
                                                  user_id=user_id)
        return shown

    # -- export ---------------------------------------------------------------------------
    async def export(self, user_id: uuid.UUID) -> dict[str, Any]:
        """Everything stored about ``user_id`` that this session may see, as a
        JSON-serialisable dict: ``profile``, ``memberships``, ``workflows`` (they own),
        ``executions`` (they started), ``notifications``, ``consents``, ``audit_events``
        (about them or by them) and ``other`` (every further registry entry, keyed
        ``"<table>.<column>"``). Secrets (hashes, ciphertexts) are never included.
        ``PermissionDenied`` unless the session is an owner or admin, the subject
        themself, or ``dl.system()``. An export is an audited event: it needs a
        read-write session (``ValidationError`` otherwise)."""
        if not isinstance(user_id, uuid.UUID):
            raise ValidationError("user_id must be a UUID")
        db = self._db
        if db.readonly:
            raise ValidationError("an export is recorded in the audit trail: open a "
                                  "read-write session")
        ctx = db.context
        rows = await db.many("gdpr.export_all" if ctx is None else "gdpr.export",
                             user_id=user_id)
        out: dict[str, Any] = {
            "subject_id": str(user_id),
            "generated_at": datetime.now(UTC).isoformat(),
            "scope": "all organizations" if ctx is None else (
                str(ctx.org_id) if ctx.org_id is not None else "the subject's organizations"),
            "organizations": [],
            "profile": None,
            **{s: [] for s in SECTIONS.values() if s != "profile"},
            "audit_events": [],
            "other": {},
        }
        orgs: set[uuid.UUID] = set()
        for r in rows:
            section = SECTIONS.get((r["table_name"], r["subject_column"]))
            if r["org_id"] is not None:
                orgs.add(r["org_id"])
            if section == "profile":
                out["profile"] = r["data"]
            elif section is not None:
                out[section].append(r["data"])
            else:
                out["other"].setdefault(f"{r['table_name']}.{r['subject_column']}",
                                        []).append(r["data"])
        if ctx is not None and ctx.org_id is not None:
            orgs = {ctx.org_id}
        out["organizations"] = sorted(str(o) for o in orgs)
        out["audit_events"] = await _audit_about(db, user_id)
        await _audit_record(db, "gdpr.export", user_id)
        return out

    # -- erasure --------------------------------------------------------------------------
    async def erase(self, user_id: uuid.UUID) -> Erasure:
        """Erase or anonymize ``user_id``'s personal data, in live and soft-deleted rows:
        in the context organization (owners and admins), or everywhere (``dl.system()``).
        Rows other data depends on stay, with personal fields replaced by the stable
        :func:`pseudonym`; memberships, team memberships, API keys, notifications, shares
        to them, pending invitations go. The profile, web sessions and tokens go too when
        the subject belongs to no other organization (always from ``dl.system()``). Then
        the audit trail is redacted. All in the session's transaction: an error (e.g. the
        subject is the last owner of an organization) undoes all of it. Idempotent."""
        if not isinstance(user_id, uuid.UUID):
            raise ValidationError("user_id must be a UUID")
        db = self._db
        if db.readonly:
            raise ValidationError("erasure writes: open a read-write session")
        ctx = db.context
        rows = await db.many("gdpr.erase_all" if ctx is None else "gdpr.erase",
                             user_id=user_id)
        # The audit trail is redacted inside the same function (in
        # schema/0016_gdpr.sql: app.audit_redact_subject is for the maintenance role only);
        # it reports itself as the row ('audit', 'redact_subject').
        redacted = any(r["table_name"] == "audit" for r in rows)
        affected = {f"{r['table_name']}.{r['subject_column']}": r["affected"]
                    for r in rows if r["table_name"] != "audit"}
        profile = "users.id" in affected
        org = None if ctx is None else ctx.org_id
        # Cached lookups of the user (users.get, API-key verifications) go at COMMIT.
        await lookups.invalidate(db, lookups.user_tag(user_id))
        if profile:
            sessions = db.dl.web_sessions
            if sessions.store == "redis":
                async def revoke() -> None:
                    await sessions.revoke_all_for_user(user_id)

                await db.after_commit(revoke)
        await _audit_record(db, "gdpr.erase", user_id)
        return Erasure(user_id, pseudonym(user_id), org, affected, profile, redacted)


# -- audit trail ----------------------------------------------------------------------------
# The audit trail, as the export and erasure use it (the redaction itself is inside
# app.gdpr_erase_in, schema/0016_gdpr.sql).

async def _audit_about(db: Session, user_id: uuid.UUID) -> list[dict[str, Any]]:
    """The audit events about or by the subject that the session may see."""
    ctx = db.context
    rows = await db.many("gdpr.audit_about", user_id=user_id,
                         org_id=None if ctx is None else ctx.org_id)
    return [r["data"] for r in rows]


async def _audit_record(db: Session, action: str, user_id: uuid.UUID) -> None:
    """The audit event of the request: in the context organization, or, from
    ``dl.system()``, in the chain of rows without an organization."""
    ctx = db.context
    if ctx is None:
        await db.audit.record(action, org_id=GLOBAL_ORG, subject_user_id=user_id)
    elif ctx.org_id is not None:
        await db.audit.record(action, subject_user_id=user_id)
