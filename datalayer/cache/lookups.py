"""Read-through caching of hot repository lookups, keyed so that RLS still decides.

**The keying rule.** A cached row may only be served to a session that RLS would show it
to. So a lookup's key holds every part of the context that the table's SELECT policy reads,
and the cache is used only where a read cannot see uncommitted or snapshot-old data:

* only sessions that cannot write and run without a transaction
  (``dl.session(ctx, readonly=True)`` at READ COMMITTED) read or fill it; read-write and
  snapshot sessions go to the database (they may see their own uncommitted writes, which
  must never reach the cache), and so does ``dl.system()``;
* the loader runs in the caller's session, so what gets cached is what RLS returned to a
  context with the same key.

Lookups, their keys and tags:

* ``db.users.get(id)``. Policy: ``id = app.user_id() OR member(app.org_id(), id)``. Own
  account: key ``self:<id>``. Another account: key ``<org>:<id>``, only ever loaded for a
  reader other than ``id``, so it is visible exactly to the members' context of ``<org>``;
  tags ``member:<org>:<id>`` and ``org:<org>``. No organization and not oneself: not cached
  (RLS shows nothing). Both carry ``user:<id>``.
* ``db.api_keys.verify(secret)``: global by design (it finds the organization by hash).
  Key: sha256 of the secret, hex. Sensitive namespace: entries are encrypted and
  authenticated, so whoever can write to Redis still cannot forge a verification. TTL:
  60 s, never past the key's expiry. Tags ``apikey:<org>:<id>``, ``member:<org>:<user>``,
  ``user:<user>``, ``org:<org>``.

Invalidation happens after commit (``Session.after_commit``) in the repository methods that
write these rows: ``user:`` on profile changes, (soft/hard) deletes and restores, logins,
password and 2FA changes, used tokens; ``member:`` on membership changes and accepted
invitations; ``apikey:`` on revocation; ``org:`` on organization (soft) delete and restore.
Writes that bypass those methods (raw SQL, ``db.run`` of a write query, another service)
are not seen: such entries live until their TTL (users 5 minutes, API keys 60 seconds).

For other repositories (``db.workflows.get`` …): build the key with :func:`tenant_key`
(``user=True``/``role=True`` when the policy reads them), call :func:`read_through`, and
:func:`invalidate` the row's tag in every method that writes it.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from datalayer.cache.core import Loaded, Namespace

if TYPE_CHECKING:
    from datalayer.core.session import Session

__all__ = [
    "API_KEYS",
    "USERS",
    "Loaded",
    "api_key_entry",
    "api_key_key",
    "api_key_tag",
    "cacheable",
    "invalidate",
    "member_tag",
    "org_tag",
    "read_through",
    "tenant_key",
    "user_key",
    "user_tag",
]

T = TypeVar("T")

USERS = Namespace("users", ttl=300, sensitive=True)
API_KEYS = Namespace("api_keys", ttl=60, sensitive=True)


def user_tag(user_id: uuid.UUID) -> str:
    return f"user:{user_id}"


def member_tag(org_id: uuid.UUID, user_id: uuid.UUID) -> str:
    return f"member:{org_id}:{user_id}"


def org_tag(org_id: uuid.UUID) -> str:
    return f"org:{org_id}"


def api_key_tag(org_id: uuid.UUID, key_id: uuid.UUID) -> str:
    return f"apikey:{org_id}:{key_id}"


def cacheable(db: Session) -> bool:
    """May this session read and fill lookup caches? (see the module's rule)"""
    return (db.readonly and not db.in_transaction and db.context is not None
            and db.dl.settings.cache_lookups)


def tenant_key(db: Session, *parts: object, user: bool = False,
               role: bool = False) -> str | None:
    """``<org>[:u=<user>][:r=<role>]:<parts>`` for a tenant row, or None when the session
    may not use the cache or has no organization. Pass ``user``/``role`` when the table's
    SELECT policy reads ``app.user_id()``/``app.role()``."""
    ctx = db.context
    if ctx is None or ctx.org_id is None or not cacheable(db):
        return None
    head = str(ctx.org_id)
    if user:
        head += f":u={ctx.user_id or ''}"
    if role:
        head += f":r={ctx.role}"
    return head + ":" + ":".join(map(str, parts))


async def read_through(db: Session, namespace: Namespace, row: type[T], key: str,
                       load: Callable[[], Awaitable[T | Loaded[T] | None]], *,
                       tags: tuple[str, ...] = ()) -> T | None:
    """``load()`` through the cache namespace (typed as ``row``); see ``get_or_set``."""
    return await db.dl.cache.namespace(namespace, row=row).get_or_set(key, load, tags=tags)


async def invalidate(db: Session, *tags: str) -> None:
    """Invalidate ``tags`` once ``db``'s transaction has committed (at once without one)."""
    cache = db.dl.cache
    await db.after_commit(lambda: cache.invalidate_tags(*tags))


def user_key(db: Session, user_id: object) -> tuple[str, tuple[str, ...]] | None:
    """(key, tags) of ``users.get(user_id)`` for this session, or None: do not cache."""
    if not isinstance(user_id, uuid.UUID) or not cacheable(db):
        return None
    ctx = db.context
    assert ctx is not None
    if ctx.user_id == user_id:
        return f"self:{user_id}", (user_tag(user_id),)
    if ctx.org_id is None:
        return None
    return (f"{ctx.org_id}:{user_id}",
            (user_tag(user_id), member_tag(ctx.org_id, user_id), org_tag(ctx.org_id)))


def api_key_key(db: Session, key_hash: bytes) -> str | None:
    """The key of ``api_keys.verify`` for a key's sha256, or None: do not cache."""
    return key_hash.hex() if cacheable(db) else None


def api_key_entry(value: T, *, org_id: uuid.UUID, key_id: uuid.UUID, user_id: uuid.UUID,
                  valid_until: datetime | None) -> Loaded[T]:
    """A verification to cache, living at most until the key expires."""
    ttl = API_KEYS.ttl
    if valid_until is not None:
        ttl = max(0.001, min(ttl, (valid_until - datetime.now(UTC)).total_seconds()))
    return Loaded(value, ttl=ttl, tags=(api_key_tag(org_id, key_id), member_tag(org_id, user_id),
                                        user_tag(user_id), org_tag(org_id)))
