"""Webhooks and their events (``queries/webhooks.sql``, ``schema/0013_webhooks.sql``).

A webhook belongs to a workflow. :meth:`Webhooks.create` returns the routing token and the
signing secret once: only the token's sha256 is stored, and the secret is a Keyring blob
bound to ``(org, 'webhooks', id, 'secret')`` (registered for key rotation).

Who runs what:

* **The HTTP handler** receives ``POST /hooks/<token>``. Routing happens before any tenant
  context exists: :meth:`Webhooks.route` (``app.webhook_route``, SECURITY DEFINER, refused
  in a tenant session) finds the webhook by token hash. It then verifies the signature
  (:meth:`Webhooks.verify_signature`) and stores the event with :meth:`Webhooks.ingest`
  (``org_id=route.org_id``). Decision: the handler runs in ``dl.system()``, the
  maintenance role, because no user acts here and there is no service role among the
  context roles (owner/admin/member/viewer/guest); every ingest statement names the routed
  organization and webhook explicitly. A tenant session of a writer works as well (RLS then
  bounds it to that organization); a request handler that prefers never to hold
  ``dl.system()`` can route from ``dl.session(Context(None))`` and ingest from
  ``dl.session(Context(route.org_id, role="member"))``.
* **Workers** (``dl.system()``): :meth:`claim`, :meth:`process` / :meth:`mark_processed` /
  :meth:`mark_failed`, :meth:`reap`, :meth:`purge`.
* **Tenant sessions**: create, get, list, activate, rotate the secret, delete, list events,
  replay dead events, statistics.

Idempotency: one event per ``(webhook, idempotency_key)``; concurrent deliveries of one key
store one row, and every delivery gets that row back (``Ingested.created`` tells them apart).
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import ipaddress
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from datalayer.core.errors import DataLayerError, NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import LAST, Page, Repository, check_ip, check_limit, page_of
from datalayer.repos.executions import check_lease, check_worker_id

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = [
    "EVENT_STATUSES",
    "METHODS",
    "REDACTED",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "ClaimedEvent",
    "CreatedWebhook",
    "Event",
    "Incoming",
    "Ingested",
    "Processed",
    "Route",
    "Webhook",
    "WebhookStats",
    "Webhooks",
    "hash_token",
    "purge_all",
    "redact_headers",
    "sign",
]

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
EVENT_STATUSES = ("pending", "processing", "processed", "failed", "dead")
TIMESTAMP_HEADER = "x-datalayer-timestamp"
SIGNATURE_HEADER = "x-datalayer-signature"
TOLERANCE_S = 300
REDACTED = "[redacted]"
# Header names (lower case) whose values are never stored, and name fragments that mark a
# header as secret-bearing.
_SECRET_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
    "x-auth-token", "x-csrf-token", SIGNATURE_HEADER, "x-hub-signature",
    "x-hub-signature-256", "stripe-signature", "x-signature", "x-slack-signature",
    "x-twilio-signature", "x-shopify-hmac-sha256", "x-gitlab-token",
})
_SECRET_FRAGMENTS = ("secret", "token", "password", "signature", "api-key", "apikey",
                     "session", "credential")
_TOKEN_BYTES = 32
_TABLE, _COLUMN = "webhooks", "secret"


@dataclass(frozen=True, slots=True, kw_only=True)
class Webhook:
    org_id: uuid.UUID
    id: uuid.UUID
    workflow_id: uuid.UUID
    name: str
    method: str
    active: bool
    secret: bytes = field(repr=False)  # a Keyring blob
    max_attempts: int
    trigger_count: int
    last_triggered_at: datetime | None
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class CreatedWebhook:
    """A new webhook: ``token`` (its path) and ``secret`` (for signing) are shown once."""

    webhook: Webhook
    token: str = field(repr=False)
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """What an incoming request's token routes to (``app.webhook_route``)."""

    org_id: uuid.UUID
    webhook_id: uuid.UUID
    workflow_id: uuid.UUID
    method: str
    active: bool
    secret: bytes = field(repr=False)  # a Keyring blob
    max_attempts: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    org_id: uuid.UUID
    id: uuid.UUID
    webhook_id: uuid.UUID
    idempotency_key: str
    event_type: str
    payload: Any
    headers: Any
    source_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    status: str
    attempts: int
    max_attempts: int
    worker_id: str | None
    lease_expires_at: datetime | None
    next_attempt_at: datetime
    execution_id: uuid.UUID | None
    error: str | None
    received_at: datetime
    processed_at: datetime | None
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedEvent:
    """An event a worker holds (with its webhook's workflow)."""

    org_id: uuid.UUID
    id: uuid.UUID
    webhook_id: uuid.UUID
    workflow_id: uuid.UUID
    idempotency_key: str
    event_type: str
    payload: Any
    headers: Any
    source_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    status: str
    attempts: int
    max_attempts: int
    worker_id: str | None
    lease_expires_at: datetime | None
    received_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Processed:
    org_id: uuid.UUID
    id: uuid.UUID
    attempts: int
    processed_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookStats:
    received: int | None
    pending: int | None
    processing: int | None
    processed: int | None
    failed: int | None
    dead: int | None
    p95_ms: float | None


@dataclass(frozen=True, slots=True)
class Ingested:
    """The stored event; ``created`` is False for a duplicate delivery (the original)."""

    event: Event
    created: bool


@dataclass(frozen=True, slots=True)
class Incoming:
    """One event of a bulk ingest."""

    idempotency_key: str
    payload: Any = None
    event_type: str = ""
    headers: Mapping[str, str] | None = None
    source_ip: str | None = None


CREATE = RowQuery("webhooks.create", Webhook)
GET = RowQuery("webhooks.get", Webhook)
LIST = RowQuery("webhooks.list", Webhook)
SET_ACTIVE = RowQuery("webhooks.set_active", Webhook)
SET_SECRET = RowQuery("webhooks.set_secret", Webhook)
ROUTE = RowQuery("webhooks.route", Route)
INGEST = RowQuery("webhooks.ingest", Event)
GET_BY_KEY = RowQuery("webhooks.get_by_key", Event)
GET_EVENT = RowQuery("webhooks.get_event", Event)
LIST_EVENTS = RowQuery("webhooks.list_events", Event)
CLAIM = RowQuery("webhooks.claim", ClaimedEvent)
MARK_PROCESSED = RowQuery("webhooks.mark_processed", Event)
MARK_PROCESSED_MANY = RowQuery("webhooks.mark_processed_many", Processed)
MARK_FAILED = RowQuery("webhooks.mark_failed", Event)
REAP = RowQuery("webhooks.reap", Event)
REPLAY = RowQuery("webhooks.replay", Event)
STATS = RowQuery("webhooks.stats", WebhookStats)


def hash_token(token: str) -> bytes:
    """What is stored and looked up for a path token: its sha256."""
    return hashlib.sha256(token.encode()).digest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Datalayer-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds):
    ``sha256=<hex HMAC-SHA256(secret, f"{timestamp}." + body)>``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def redact_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Headers as stored: names lower-cased, values of secret-bearing headers replaced."""
    out: dict[str, str] = {}
    for name, value in (headers or {}).items():
        low = str(name).lower()
        secret = low in _SECRET_HEADERS or any(f in low for f in _SECRET_FRAGMENTS)
        out[low] = REDACTED if secret else str(value)[:4096]
    return out


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name:
            return v
    return None


def _key(idempotency_key: str) -> str:
    if not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key) <= 200:
        raise ValidationError("idempotency_key must be a string of 1-200 characters")
    return idempotency_key


class Webhooks(Repository):
    """``db.webhooks``: see the module docstring for which session runs which method."""

    __slots__ = ()

    # -- management (tenant sessions) -------------------------------------------------------
    async def create(self, workflow_id: uuid.UUID, *, name: str = "", method: str = "POST",
                     max_attempts: int = 5) -> CreatedWebhook:
        """A webhook for ``workflow_id``; the token and secret are returned only here.
        ``NotFound`` when the workflow is not there (or not writable by the context)."""
        if method not in METHODS:
            raise ValidationError(f"method must be one of {', '.join(METHODS)}")
        if not 1 <= max_attempts <= 100:
            raise ValidationError("max_attempts must be between 1 and 100")
        org_id = self._tenant_org("create a webhook")
        wid = uuid.uuid4()
        token = "wh_" + secrets.token_urlsafe(_TOKEN_BYTES)
        secret = "whsec_" + secrets.token_urlsafe(_TOKEN_BYTES)
        blob = self._db.dl.keyring.encrypt_str(secret, org_id=org_id, table=_TABLE,
                                               row_id=wid, column=_COLUMN)
        row = await self._db.fetch_one(
            CREATE, id=wid, workflow_id=workflow_id, name=name, path_token_hash=hash_token(token),
            method=method, secret=blob, max_attempts=max_attempts)
        if row is None:
            raise NotFound("workflow not found", query=CREATE.name)
        return CreatedWebhook(row, token, secret)

    async def get(self, webhook_id: uuid.UUID, *,
                  org_id: uuid.UUID | None = None) -> Webhook | None:
        return await self._db.fetch_one(GET, id=webhook_id, org_id=org_id)

    async def list(self, *, workflow_id: uuid.UUID | None = None,
                   limit: int = 100) -> builtins.list[Webhook]:
        return await self._db.fetch_many(LIST, workflow_id=workflow_id,
                                         limit=check_limit(limit))

    async def set_active(self, webhook_id: uuid.UUID, active: bool) -> Webhook:
        row = await self._db.fetch_one(SET_ACTIVE, id=webhook_id, active=active)
        if row is None:
            raise NotFound("webhook not found or not writable by this role",
                           query=SET_ACTIVE.name)
        return row

    async def rotate_secret(self, webhook_id: uuid.UUID) -> str:
        """A new signing secret (returned once); the old one stops verifying at commit."""
        org_id = self._tenant_org("rotate a webhook secret")
        secret = "whsec_" + secrets.token_urlsafe(_TOKEN_BYTES)
        blob = self._db.dl.keyring.encrypt_str(secret, org_id=org_id, table=_TABLE,
                                               row_id=webhook_id, column=_COLUMN)
        if await self._db.fetch_one(SET_SECRET, id=webhook_id, secret=blob) is None:
            raise NotFound("webhook not found or not writable by this role",
                           query=SET_SECRET.name)
        return secret

    async def delete(self, webhook_id: uuid.UUID) -> bool:
        """Delete a webhook and its events."""
        return await self._db.execrows("webhooks.delete", id=webhook_id) == 1

    # -- the incoming path ------------------------------------------------------------------
    async def route(self, token: str) -> Route | None:
        """The webhook a path token routes to, in any organization, or None. Only without a
        tenant context (``dl.system()`` or ``Context(None)``)."""
        if not isinstance(token, str) or not token.startswith("wh_") or len(token) > 200:
            return None
        return await self._db.fetch_one(ROUTE, path_token_hash=hash_token(token))

    def verify_signature(self, webhook: Webhook | Route, body: bytes,
                         headers: Mapping[str, str], *, now: float | None = None,
                         tolerance_s: int = TOLERANCE_S) -> bool:
        """True when ``headers`` carry a valid ``X-Datalayer-Signature`` of ``body`` made
        with the webhook's secret, and an ``X-Datalayer-Timestamp`` within ``tolerance_s``
        seconds of now (replay window). Constant-time comparison."""
        ts_text = _header(headers, TIMESTAMP_HEADER)
        sig = _header(headers, SIGNATURE_HEADER)
        if ts_text is None or sig is None or not ts_text.isdigit() or len(ts_text) > 12:
            return False
        ts = int(ts_text)
        if abs((time.time() if now is None else now) - ts) > tolerance_s:
            return False
        org_id = webhook.org_id
        wid = webhook.id if isinstance(webhook, Webhook) else webhook.webhook_id
        secret = self._db.dl.keyring.decrypt_str(webhook.secret, org_id=org_id, table=_TABLE,
                                                 row_id=wid, column=_COLUMN)
        return hmac.compare_digest(sign(secret, body, ts).encode(), sig.strip().encode())

    async def ingest(self, webhook_id: uuid.UUID, *, idempotency_key: str, payload: Any = None,
                     event_type: str = "", headers: Mapping[str, str] | None = None,
                     source_ip: str | None = None,
                     org_id: uuid.UUID | None = None) -> Ingested:
        """Store an incoming event once per ``idempotency_key`` (headers redacted). A
        duplicate delivery, even a concurrent one, gets the original (``created=False``).
        ``NotFound`` when the webhook is not there or inactive."""
        key = _key(idempotency_key)
        row = await self._db.fetch_one(
            INGEST, org_id=org_id, webhook_id=webhook_id, idempotency_key=key,
            event_type=event_type, payload=payload, headers=redact_headers(headers),
            source_ip=check_ip(source_ip, "source_ip"))
        if row is not None:
            return Ingested(row, True)
        # Either a duplicate (ON CONFLICT waited for the first delivery to commit, and this
        # new statement sees it) or no such active webhook.
        old = await self._db.fetch_one(GET_BY_KEY, org_id=org_id, webhook_id=webhook_id,
                                       idempotency_key=key)
        if old is None:
            raise NotFound("webhook not found or inactive", query=INGEST.name)
        return Ingested(old, False)

    async def ingest_many(self, webhook_id: uuid.UUID, events: Sequence[Incoming], *,
                          org_id: uuid.UUID | None = None) -> int:
        """Store many events of one webhook in one statement; keys stored before and repeats
        inside ``events`` are skipped. Returns how many were new."""
        if not events:
            return 0
        n: int = await self._db.scalar(
            "webhooks.ingest_many", org_id=org_id, webhook_id=webhook_id,
            idempotency_keys=[_key(e.idempotency_key) for e in events],
            event_types=[e.event_type for e in events],
            payloads=[{} if e.payload is None else e.payload for e in events],
            headers=[redact_headers(e.headers) for e in events],
            source_ips=[check_ip(e.source_ip, "source_ip") for e in events])
        return n

    async def get_event(self, event_id: uuid.UUID, *,
                        org_id: uuid.UUID | None = None) -> Event | None:
        return await self._db.fetch_one(GET_EVENT, id=event_id, org_id=org_id)

    async def list_events(self, webhook_id: uuid.UUID, *,
                          statuses: Iterable[str] = EVENT_STATUSES,
                          before: tuple[datetime, uuid.UUID] | None = None, limit: int = 100,
                          org_id: uuid.UUID | None = None) -> Page[Event]:
        wanted = builtins.list(statuses)
        if not wanted or set(wanted) - set(EVENT_STATUSES):
            raise ValidationError(f"statuses must be some of {', '.join(EVENT_STATUSES)}")
        b = before or LAST
        rows = await self._db.fetch_many(
            LIST_EVENTS, org_id=org_id, webhook_id=webhook_id, statuses=wanted,
            before_received_at=b[0], before_id=b[1], limit=check_limit(limit))
        return page_of(rows, limit, lambda e: (e.received_at, e.id))

    # -- workers ----------------------------------------------------------------------------
    async def claim(self, worker_id: str, *, limit: int = 10, lease_s: float = 30.0,
                    org_id: uuid.UUID | None = None) -> builtins.list[ClaimedEvent]:
        """Up to ``limit`` due events, now processing on ``worker_id`` for ``lease_s``
        seconds (attempts + 1). Concurrent claimers never receive the same event."""
        return await self._db.fetch_many(CLAIM, worker_id=check_worker_id(worker_id),
                                         limit=check_limit(limit), lease_s=check_lease(lease_s),
                                         org_id=org_id)

    async def process(self, event: ClaimedEvent) -> Event | None:
        """Start the webhook's workflow for a claimed event (``trigger='webhook'``, the
        payload as input) and mark the event processed, linking the execution. When the
        workflow cannot be started (deleted, say) the event is marked failed instead. None
        when the worker no longer holds the event (nothing was started)."""
        try:
            async with self._db.savepoint() as db:
                execution = await db.executions.enqueue(
                    event.workflow_id, trigger="webhook", input=event.payload,
                    trigger_payload={"webhook_id": str(event.webhook_id),
                                     "event_id": str(event.id),
                                     "event_type": event.event_type},
                    org_id=event.org_id)
                done = await self.mark_processed(event, execution.id)
                if done is None:
                    raise _LostLease
                return done
        except _LostLease:
            return None
        except DataLayerError as exc:
            return await self.mark_failed(event, error=f"{type(exc).__name__}: {exc}")

    async def mark_processed(self, event: ClaimedEvent,
                             execution_id: uuid.UUID | None) -> Event | None:
        """Processed (into ``execution_id``); None when the worker no longer holds it."""
        return await self._db.fetch_one(
            MARK_PROCESSED, org_id=event.org_id, id=event.id, worker_id=_holder(event),
            attempts=event.attempts, execution_id=execution_id)

    async def mark_processed_many(self, worker_id: str, events: Sequence[ClaimedEvent],
                                  execution_ids: Sequence[uuid.UUID | None],
                                  ) -> builtins.list[Processed]:
        """:meth:`mark_processed` for a batch, one statement; returns those still held."""
        if len(execution_ids) != len(events):
            raise ValidationError("execution_ids must have one entry per event")
        return await self._db.fetch_many(
            MARK_PROCESSED_MANY, worker_id=check_worker_id(worker_id),
            org_ids=[e.org_id for e in events], ids=[e.id for e in events],
            attempts=[e.attempts for e in events], execution_ids=builtins.list(execution_ids))

    async def mark_failed(self, event: ClaimedEvent, *, error: str,
                          base_delay_ms: int = 1000) -> Event | None:
        """Failed: retried after ``base_delay_ms * 2^(attempts-1)`` (jittered, capped at an
        hour), or dead after its last attempt. None when the worker no longer holds it."""
        if not 0 <= base_delay_ms <= 86_400_000:
            raise ValidationError("base_delay_ms must be between 0 and 86400000")
        return await self._db.fetch_one(
            MARK_FAILED, org_id=event.org_id, id=event.id, worker_id=_holder(event),
            attempts=event.attempts, error=str(error), base_delay_ms=base_delay_ms)

    async def reap(self, *, limit: int = 100) -> builtins.list[Event]:
        """Events whose lease expired: back to the queue, or dead after their last attempt."""
        return await self._db.fetch_many(REAP, limit=check_limit(limit))

    async def replay(self, webhook_id: uuid.UUID, *, ids: Sequence[uuid.UUID] | None = None,
                     org_id: uuid.UUID | None = None) -> builtins.list[Event]:
        """Dead events of a webhook (all, or ``ids``) back to the queue, attempts reset."""
        return await self._db.fetch_many(
            REPLAY, org_id=org_id, webhook_id=webhook_id,
            ids=None if ids is None else builtins.list(ids))

    async def stats(self, webhook_id: uuid.UUID, *, window: timedelta = timedelta(days=1),
                    org_id: uuid.UUID | None = None) -> WebhookStats:
        """Events received in the last ``window``: counts by status and p95 receipt to
        processing in milliseconds (None when none was processed)."""
        since = datetime.now().astimezone() - window
        row = await self._db.fetch_one(STATS, org_id=org_id, webhook_id=webhook_id,
                                       since=since)
        assert row is not None
        return row

    async def purge(self, before: datetime, *, limit: int = 5000) -> int:
        """Retention, one batch: delete up to ``limit`` processed or dead events received
        before ``before``; returns how many. From ``dl.system()``; call in a loop (one
        session per batch, so no lock is held long) until it returns less than ``limit``
        (see :func:`purge_all`)."""
        if not 1 <= limit <= 100_000:
            raise ValidationError("limit must be between 1 and 100000")
        return await self._db.execrows("webhooks.purge", before=before, limit=limit)


class _LostLease(Exception):
    pass


def _holder(event: ClaimedEvent) -> str:
    if event.worker_id is None:
        raise ValidationError("pass the event as claimed (it carries the worker id)")
    return event.worker_id


async def purge_all(dl: DataLayer, before: datetime, *, batch: int = 5000) -> int:
    """Retention: :meth:`Webhooks.purge` in batches, each in its own short system session."""
    total = 0
    while True:
        async with dl.system() as db:
            n = await db.webhooks.purge(before, limit=batch)
        total += n
        if n < batch:
            return total
