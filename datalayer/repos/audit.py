"""Audit trail (``queries/audit.sql``, ``schema/0015_audit.sql``).

* ``db.audit`` records explicit events of the context organization (who, from where and
  which request come from the context; risk and frameworks from ``app.audit_rules``) and
  reads them: :meth:`Audit.by_resource`, :meth:`Audit.events_about`,
  :meth:`Audit.changes_for` (captured row changes), :meth:`Audit.report`.
* :func:`verify_chain` streams an organization's two hash chains (events, changes) in keyset
  batches and reports edited rows, deleted rows, gaps and, against a saved :class:`Anchor`
  (:func:`anchor`), truncation of the newest rows.
* :func:`audit_retention` is the maintenance job: it removes, per organization and chain,
  the oldest rows every applicable policy lets go (whole partitions where possible), records
  what it removed, and moves the chain's checkpoint so verification still passes.
* :func:`compliance_report` gathers the four compliance reports for a period.

Erasure (GDPR) calls ``app.audit_redact_subject(org, user)`` through :meth:`Audit.redact_subject`
from ``dl.system()``: the user's personal data leaves the audit rows, the chains still verify.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import ipaddress
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from datalayer.core.errors import ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import LAST, Page, Repository, check_ip, check_limit, page_of

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = [
    "FRAMEWORKS",
    "GLOBAL_ORG",
    "REPORT_KINDS",
    "Anchor",
    "Audit",
    "AuditEvent",
    "ChainReport",
    "DataChange",
    "RetentionLogEntry",
    "RetentionPolicy",
    "anchor",
    "audit_retention",
    "compliance_report",
    "verify_chain",
]

Framework = Literal["GDPR", "SOX", "HIPAA"]
ReportKind = Literal["sensitive_access", "failed_logins", "permission_changes", "high_risk"]
FRAMEWORKS = ("GDPR", "SOX", "HIPAA")
REPORT_KINDS: tuple[ReportKind, ...] = (
    "sensitive_access", "failed_logins", "permission_changes", "high_risk")
RESULTS = ("success", "failure", "denied", "error")
GLOBAL_ORG = uuid.UUID(int=0)  # the chain of rows without an organization (maintenance only)
CHAINS = ("changes", "events")
_ZERO = bytes(32)
_MAX_SEQ = 2**62
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEvent:
    org_id: uuid.UUID
    seq: int
    id: uuid.UUID
    at: datetime
    action: str
    result: str
    risk: str
    frameworks: list[str]
    actor_user_id: uuid.UUID | None
    subject_user_id: uuid.UUID | None
    resource_type: str | None
    resource_id: str | None
    ip: IP | None
    user_agent: str | None
    request_id: str | None
    details: Any
    personal: Any | None
    redacted_at: datetime | None
    row_hash: bytes = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class DataChange:
    org_id: uuid.UUID
    seq: int
    id: uuid.UUID
    at: datetime
    table_name: str
    row_pk: Any
    op: str
    actor_user_id: uuid.UUID | None
    request_id: str | None
    changed_columns: list[str] | None
    frameworks: list[str]
    before: Any | None
    after: Any | None
    personal: Any | None
    redacted_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionPolicy:
    org_id: uuid.UUID
    framework: str
    event_class: str
    keep_days: int
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionLogEntry:
    org_id: uuid.UUID
    id: int
    table_name: str
    removed: int
    up_to_seq: int
    method: str
    at: datetime


RECORD = RowQuery("audit.record", AuditEvent)
RECORD_SYSTEM = RowQuery("audit.record_system", AuditEvent)
BY_RESOURCE = RowQuery("audit.by_resource", AuditEvent)
EVENTS_ABOUT = RowQuery("audit.events_about", AuditEvent)
CHANGES_FOR = RowQuery("audit.changes_for", DataChange)
REPORT = RowQuery("audit.report", AuditEvent)
SET_POLICY = RowQuery("audit.set_policy", RetentionPolicy)
RETENTION_LOG = RowQuery("audit.retention_log", RetentionLogEntry)


def _check_action(action: str, result: str) -> None:
    if not isinstance(action, str) or not 3 <= len(action) <= 100 or "." not in action:
        raise ValidationError("action must be a dotted name such as 'auth.login'")
    if result not in RESULTS:
        raise ValidationError(f"result must be one of {', '.join(RESULTS)}")


def _keyset(before: tuple[datetime, int] | None) -> tuple[datetime, int]:
    if before is None:
        return LAST[0], _MAX_SEQ
    if not isinstance(before[0], datetime):
        raise ValidationError("before must be an (at, seq) cursor")
    return before


class Audit(Repository):
    """``db.audit``. Readers need the 'audit' read permission (not viewers or guests); any
    member of the context organization records events; nobody updates or deletes them."""

    __slots__ = ()

    async def record(self, action: str, *, result: str = "success",
                     subject_user_id: uuid.UUID | None = None,
                     resource_type: str | None = None, resource_id: object = None,
                     details: Mapping[str, Any] | None = None,
                     personal: Mapping[str, Any] | None = None,
                     org_id: uuid.UUID | None = None, actor_user_id: uuid.UUID | None = None,
                     ip: str | None = None, user_agent: str | None = None,
                     request_id: str | None = None) -> AuditEvent:
        """Append an event to the organization's chain, in this session's transaction.

        ``details`` holds what is not personal (it stays after erasure); ``personal`` holds
        personal values (an address tried, a name), which redaction removes. In a tenant
        session the organization, actor, IP and request id are the context's (the arguments
        are refused), the user agent the context's unless given. From ``dl.system()`` pass
        ``org_id`` (``GLOBAL_ORG`` for events of no organization) and the rest explicitly.
        """
        _check_action(action, result)
        rid = None if resource_id is None else str(resource_id)
        ctx = self._db.context
        if ctx is not None:
            if org_id not in (None, ctx.org_id) or actor_user_id or ip or request_id:
                raise ValidationError("a tenant session records events of its own context; "
                                      "org_id, actor, ip and request id come from it")
            event = await self._db.fetch_one(
                RECORD, action=action, result=result, subject_user_id=subject_user_id,
                resource_type=resource_type, resource_id=rid,
                user_agent=user_agent or ctx.user_agent, details=dict(details or {}),
                personal=None if personal is None else dict(personal))
        else:
            if org_id is None:
                raise ValidationError("dl.system() records need an org_id (GLOBAL_ORG for none)")
            event = await self._db.fetch_one(
                RECORD_SYSTEM, org_id=org_id, action=action, result=result,
                actor_user_id=actor_user_id, subject_user_id=subject_user_id,
                resource_type=resource_type, resource_id=rid,
                ip=check_ip(ip, "ip"), user_agent=user_agent,
                request_id=request_id, details=dict(details or {}),
                personal=None if personal is None else dict(personal))
        assert event is not None
        return event

    async def auth_event(self, user_id: uuid.UUID | None, action: str, result: str, *,
                         details: Mapping[str, Any] | None = None) -> int:
        """A login-path event (no tenant context): one per organization of the user, or
        one in the global chain. IP and user agent from the session's context."""
        _check_action(action, result)
        ctx = self._db.context
        return int(await self._db.scalar(
            "audit.auth_event", user_id=user_id, action=action, result=result,
            ip=None if ctx is None else ctx.ip,  # validated and normalized by Context
            user_agent=None if ctx is None else ctx.user_agent, details=dict(details or {})))

    async def by_resource(self, resource_type: str, resource_id: object, *,
                          before: tuple[datetime, int] | None = None, limit: int = 100,
                          org_id: uuid.UUID | None = None) -> Page[AuditEvent]:
        """Events about one resource, newest first; pass ``page.next`` as ``before``."""
        b = _keyset(before)
        rows = await self._db.fetch_many(
            BY_RESOURCE, org_id=org_id, resource_type=resource_type,
            resource_id=str(resource_id), before_at=b[0], before_seq=b[1],
            limit=check_limit(limit))
        return page_of(rows, limit, lambda e: (e.at, e.seq))

    async def events_about(self, user_id: uuid.UUID, *,
                           before: tuple[datetime, int] | None = None, limit: int = 100,
                           org_id: uuid.UUID | None = None) -> Page[AuditEvent]:
        """Events whose subject is ``user_id``, newest first."""
        b = _keyset(before)
        rows = await self._db.fetch_many(
            EVENTS_ABOUT, org_id=org_id, user_id=user_id, before_at=b[0], before_seq=b[1],
            limit=check_limit(limit))
        return page_of(rows, limit, lambda e: (e.at, e.seq))

    async def changes_for(self, table: str, pk: Mapping[str, Any] | uuid.UUID, *,
                          before: tuple[datetime, int] | None = None, limit: int = 100,
                          org_id: uuid.UUID | None = None) -> Page[DataChange]:
        """Captured changes of one row, newest first. ``pk`` is the primary key as a mapping
        (``{"org_id": ..., "id": ...}``), or the id of a table keyed by ``id`` alone."""
        if isinstance(pk, uuid.UUID):
            pk = {"id": pk}
        key = {k: str(v) if isinstance(v, uuid.UUID) else v for k, v in pk.items()}
        b = _keyset(before)
        rows = await self._db.fetch_many(
            CHANGES_FOR, org_id=org_id, table_name=table, row_pk=key, before_at=b[0],
            before_seq=b[1], limit=check_limit(limit))
        return page_of(rows, limit, lambda c: (c.at, c.seq))

    async def report(self, kind: ReportKind, *, from_at: datetime, to_at: datetime,
                     framework: Framework | None = None, org_id: uuid.UUID | None = None,
                     limit: int = 1000) -> builtins.list[AuditEvent]:
        """One compliance report over ``[from_at, to_at)``, oldest first."""
        if kind not in REPORT_KINDS:
            raise ValidationError(f"report kind must be one of {', '.join(REPORT_KINDS)}")
        if framework is not None and framework not in FRAMEWORKS:
            raise ValidationError(f"framework must be one of {', '.join(FRAMEWORKS)}")
        return await self._db.fetch_many(
            REPORT, org_id=org_id, kind=kind, from_at=from_at, to_at=to_at,
            framework=framework, limit=check_limit(limit))

    async def set_policy(self, framework: Literal["GDPR", "NONE"], event_class: str,
                         keep_days: int) -> RetentionPolicy:
        """The organization's retention of GDPR-relevant rows (or rows of no framework);
        SOX (7 years) and HIPAA (6 years) are fixed. Admins only."""
        if event_class not in ("events", "changes"):
            raise ValidationError("event_class must be 'events' or 'changes'")
        row = await self._db.fetch_one(SET_POLICY, framework=framework,
                                       event_class=event_class, keep_days=keep_days)
        assert row is not None
        return row

    async def set_legal_hold(self, reason: str = "") -> bool:
        """Stop retention for the organization (admins). False when already held."""
        return await self._db.execrows("audit.set_legal_hold", reason=reason) == 1

    async def clear_legal_hold(self) -> bool:
        return await self._db.execrows("audit.clear_legal_hold") == 1

    async def retention_log(self, *, org_id: uuid.UUID | None = None,
                            limit: int = 100) -> builtins.list[RetentionLogEntry]:
        return await self._db.fetch_many(RETENTION_LOG, org_id=org_id,
                                         limit=check_limit(limit))

    async def redact_subject(self, org_id: uuid.UUID, user_id: uuid.UUID) -> int:
        """Erasure (``dl.system()`` only): remove ``user_id``'s personal data from the audit
        rows of ``org_id`` and of the global chain. Returns the rows redacted."""
        return int(await self._db.scalar("audit.redact_subject", org_id=org_id,
                                         user_id=user_id))


# -- chain verification --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Anchor:
    """The heads of an organization's chains at one moment, to keep outside the database."""

    org_id: uuid.UUID
    events_seq: int
    events_head: bytes
    changes_seq: int
    changes_head: bytes

    @property
    def digest(self) -> str:
        """One hex digest over both heads (what to publish or sign)."""
        h = hashlib.sha256()
        h.update(self.org_id.bytes)
        for seq, head in ((self.events_seq, self.events_head),
                          (self.changes_seq, self.changes_head)):
            h.update(seq.to_bytes(8, "big"))
            h.update(head)
        return h.hexdigest()

    def dumps(self) -> str:
        return (f"{self.org_id}:{self.events_seq}:{self.events_head.hex()}:"
                f"{self.changes_seq}:{self.changes_head.hex()}")

    @classmethod
    def loads(cls, text: str) -> Anchor:
        try:
            org, es, eh, cs, ch = text.split(":")
            return cls(uuid.UUID(org), int(es), bytes.fromhex(eh), int(cs), bytes.fromhex(ch))
        except ValueError:
            raise ValidationError("not an audit anchor") from None


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What :func:`verify_chain` found. ``ok`` when there are no problems."""

    org_id: uuid.UUID
    rows: dict[str, int]
    problems: list[str]
    heads: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.problems


async def anchor(dl: DataLayer, org_id: uuid.UUID) -> Anchor:
    """The current heads of ``org_id``'s chains (maintenance role)."""
    async with dl.system() as db:
        state = {r["chain"]: r for r in await db.many("audit.chain_state", org_id=org_id)}
    ev, ch = state.get("events"), state.get("changes")
    return Anchor(org_id, ev["seq"] if ev else 0, bytes(ev["head"]) if ev else _ZERO,
                  ch["seq"] if ch else 0, bytes(ch["head"]) if ch else _ZERO)


async def verify_chain(dl: DataLayer, org_id: uuid.UUID, *, saved: Anchor | None = None,
                       batch: int = 10_000, parallel: int = 3,
                       max_problems: int = 100) -> ChainReport:
    """Verify both chains of ``org_id`` from their retention checkpoints, in batches.

    Every row must recompute (row hash; personal-data commitment unless redacted), follow
    its predecessor's hash, and continue the sequence without a gap; the last row must be
    the chain head. With ``saved`` (an earlier :func:`anchor`), the rows it names must still
    be there with the same hashes: that detects truncation of the newest rows even when the
    head was rewound too. Batches are seq ranges of ``batch`` rows whose hashes the server
    recomputes; up to ``parallel`` of them are in flight on separate connections (of the
    maintenance role) while the links are checked here in order.
    """
    if not 1 <= parallel <= 8 or not 100 <= batch <= 100_000:
        raise ValidationError("parallel must be 1..8 and batch 100..100000")
    problems: list[str] = []
    rows: dict[str, int] = {}
    heads: dict[str, int] = {}
    async with dl.system() as db:
        state = {r["chain"]: r for r in await db.many("audit.chain_state", org_id=org_id)}

    async def fetch(query: str, lo: int) -> list[Any]:
        async with dl.system() as db:
            return await db.many(query, org_id=org_id, from_seq=lo, to_seq=lo + batch)

    for chain in CHAINS:
        st = state.get(chain)
        head_seq = st["seq"] if st else 0
        head_hash = bytes(st["head"]) if st else _ZERO
        expect = st["floor_seq"] if st else 1
        prev = bytes(st["floor_prev"]) if st else _ZERO
        heads[chain] = head_seq
        query = "audit.verify_events" if chain == "events" else "audit.verify_changes"
        want: tuple[int, bytes] | None = None
        if saved is not None:
            want = ((saved.events_seq, saved.events_head) if chain == "events"
                    else (saved.changes_seq, saved.changes_head))
            if want[0] == 0:
                want = None
        seen_want = False
        n = 0
        # The ranges up to the head, and one past it (rows beyond the head).
        starts = list(range(expect, head_seq + batch + 1, batch)) or [expect]
        pending: list[asyncio.Task[list[Any]]] = []
        try:
            for k in range(len(starts)):
                while len(pending) < parallel and k + len(pending) < len(starts):
                    pending.append(asyncio.create_task(fetch(query, starts[k + len(pending)])))
                got = await pending.pop(0)
                for seq, prev_hash, row_hash, ok in got:
                    if seq != expect:
                        problems.append(f"{chain}: gap, seq {expect}..{seq - 1} missing")
                    elif prev_hash != prev:
                        problems.append(f"{chain}: seq {seq} does not follow its predecessor")
                    if not ok:
                        problems.append(f"{chain}: seq {seq} was altered")
                    if want is not None and seq == want[0]:
                        seen_want = True
                        if row_hash != want[1]:
                            problems.append(f"{chain}: seq {seq} differs from the saved anchor")
                    prev = row_hash
                    expect = seq + 1
                    n += 1
                if len(problems) >= max_problems:
                    break
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        rows[chain] = n
        last = expect - 1
        if last != head_seq or (n and prev != head_hash):
            problems.append(f"{chain}: the chain ends at seq {last}, its head says {head_seq}")
        if want is not None and not seen_want:
            problems.append(f"{chain}: seq {want[0]} of the saved anchor is missing "
                            f"(the newest rows were truncated)")
    return ChainReport(org_id, rows, problems[:max_problems], heads)


# -- retention ------------------------------------------------------------------------------------

async def audit_retention(dl: DataLayer, *, batch: int = 1000) -> dict[str, int]:
    """Maintenance job: remove what every applicable retention policy lets go.

    Per organization and chain, the removable part is the oldest prefix of rows all past
    their retention (so the chain stays verifiable from the new checkpoint), nothing under a
    legal hold. Monthly partitions lying wholly inside those prefixes are dropped; the rest
    is deleted in batches of ``batch`` rows, each its own short transaction. Every removal is
    logged in ``audit_retention_log``. Returns counts.
    """
    out = {"partitions_dropped": 0, "rows_dropped": 0, "rows_deleted": 0, "orgs": 0}
    async with dl.system() as db:
        orgs = [r["org_id"] for r in await db.many("audit.retention_orgs")]
    out["orgs"] = len(orgs)
    for table in ("audit_events", "data_changes"):
        cuts: dict[str, int] = {}
        async with dl.system() as db:
            for org in orgs:
                cut = await db.scalar("audit.retention_cut", org_id=org, table_name=table)
                if cut is not None:
                    cuts[str(org)] = int(cut)
        if not cuts:
            continue
        async with dl.system() as db:
            parts = [r for r in await db.many("audit.retention_partitions")
                     if r["table_name"] == table and r["upper_bound"] is not None
                     and r["upper_bound"] <= datetime.now(UTC)]
        for p in parts:  # oldest first
            async with dl.system() as db:
                removed = int(await db.scalar("audit.retention_drop",
                                              partition_name=p["partition_name"], cuts=cuts))
            if removed < 0:
                break  # later partitions hold newer rows: they cannot go either
            out["partitions_dropped"] += 1
            out["rows_dropped"] += removed
        for org, cut in cuts.items():
            while True:
                async with dl.system() as db:
                    n = int(await db.scalar("audit.retention_delete", org_id=uuid.UUID(org),
                                            table_name=table, cut=cut, limit=batch))
                out["rows_deleted"] += n
                if n < batch:
                    break
    return out


# -- compliance reports ---------------------------------------------------------------------------

async def compliance_report(dl: DataLayer, org_id: uuid.UUID, *, from_at: datetime,
                            to_at: datetime, framework: Framework | None = None,
                            limit: int = 1000) -> dict[str, list[AuditEvent]]:
    """The four compliance reports of ``org_id`` for ``[from_at, to_at)`` (maintenance
    role; a tenant session gets the same from ``db.audit.report``)."""
    kinds: tuple[ReportKind, ...] = REPORT_KINDS
    out: dict[str, list[AuditEvent]] = {}
    async with dl.system() as db:
        for kind in kinds:
            out[kind] = await db.audit.report(kind, from_at=from_at, to_at=to_at,
                                              framework=framework, org_id=org_id, limit=limit)
    return out
