"""API keys (``queries/api_keys.sql``): shown once, stored as sha256 + prefix + last 4."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from datalayer.cache import lookups
from datalayer.core.errors import ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import LAST, Page, Repository, check_limit, page_of

__all__ = ["ApiKey", "ApiKeys", "IssuedKey", "VerifiedKey", "hash_key"]

_SECRET_BYTES = 32  # 256 bits of randomness


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKey:
    org_id: uuid.UUID
    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    prefix: str
    last4: str
    scopes: list[str]
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedKey:
    org_id: uuid.UUID
    key_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    scopes: list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class _VerifiedUntil:
    """``api_keys.verify_until``: a verification and when the key expires (for caching)."""

    org_id: uuid.UUID
    key_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    scopes: list[str]
    valid_until: datetime | None


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new key: ``secret`` is shown to its owner once and never stored or logged."""

    key: ApiKey
    secret: str = field(repr=False)


CREATE = RowQuery("api_keys.create", ApiKey)
VERIFY = RowQuery("api_keys.verify", VerifiedKey)
VERIFY_UNTIL = RowQuery("api_keys.verify_until", _VerifiedUntil)
LIST = RowQuery("api_keys.list", ApiKey)


def hash_key(secret: str) -> bytes:
    """What is stored and looked up: sha256 of the whole key text."""
    return hashlib.sha256(secret.encode()).digest()


class ApiKeys(Repository):
    """``db.api_keys``: members manage their own keys, admins see and revoke all."""

    __slots__ = ()

    async def create(self, name: str, *, scopes: list[str] | None = None,
                     expires_at: datetime | None = None) -> IssuedKey:
        """Issue a key for the context user. The returned secret is the only copy."""
        prefix = "dl_live_" if self._db.dl.settings.env == "production" else "dl_test_"
        secret = prefix + secrets.token_urlsafe(_SECRET_BYTES)
        key = await self._db.fetch_one(
            CREATE, id=uuid.uuid4(), name=name, prefix=prefix, key_hash=hash_key(secret),
            last4=secret[-4:], scopes=sorted(set(scopes or [])), expires_at=expires_at)
        assert key is not None
        await self._db.audit.record("api_key.created", subject_user_id=key.user_id,
                                    resource_type="api_key", resource_id=key.id,
                                    details={"scopes": key.scopes},
                                    personal={"name": key.name})  # names often name people
        return IssuedKey(key, secret)

    async def verify(self, secret: str) -> VerifiedKey | None:
        """The organization, user, role and scopes of a live key, or None (unknown, revoked,
        expired, or its user or organization gone). One indexed lookup; records last use
        at most once a minute. Works without a context. Read-only sessions read through
        the cache (``datalayer.cache.lookups``), which never holds a key past its expiry
        and forgets it when it is revoked."""
        if not secret.startswith("dl_") or len(secret) > 200:
            return None
        db = self._db
        key_hash = hash_key(secret)
        key = lookups.api_key_key(db, key_hash)
        if key is None:
            return await db.fetch_one(VERIFY, key_hash=key_hash)

        async def load() -> lookups.Loaded[VerifiedKey] | None:
            v = await db.fetch_one(VERIFY_UNTIL, key_hash=key_hash)
            if v is None:
                return None
            found = VerifiedKey(org_id=v.org_id, key_id=v.key_id, user_id=v.user_id,
                                role=v.role, scopes=v.scopes)
            return lookups.api_key_entry(found, org_id=v.org_id, key_id=v.key_id,
                                         user_id=v.user_id, valid_until=v.valid_until)

        return await lookups.read_through(db, lookups.API_KEYS, VerifiedKey, key, load)

    async def list(self, *, before: tuple[datetime, uuid.UUID] | None = None,
                   limit: int = 100) -> Page[ApiKey]:
        b = before or LAST
        if not isinstance(b[0], datetime):
            raise ValidationError("before must be a (created_at, id) cursor")
        rows = await self._db.fetch_many(LIST, before_created_at=b[0], before_id=b[1],
                                         limit=check_limit(limit))
        return page_of(rows, limit, lambda k: (k.created_at, k.id))

    async def revoke(self, key_id: uuid.UUID) -> bool:
        """Revoke a key; its cached verification is dropped once this commits."""
        db = self._db
        revoked = await db.execrows("api_keys.revoke", id=key_id) == 1
        if revoked and db.context is not None and db.context.org_id is not None:
            await lookups.invalidate(db, lookups.api_key_tag(db.context.org_id, key_id))
            await db.audit.record("api_key.revoked", resource_type="api_key",
                                  resource_id=key_id)
        return revoked
