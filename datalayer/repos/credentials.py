"""Encrypted credentials (``queries/credentials.sql``): metadata in the clear, the secret
payload as one Keyring blob bound to ``(org, "credentials", id, "secret")``.

Listing and reading return :class:`Credential` (metadata only). The payload comes back only
from :meth:`Credentials.decrypt`, whose query writes a ``credential_access`` record (actor,
credential, time) in the same statement; it needs a writable context that may read
credentials (owner, admin, member). Payloads never appear in a repr, a log line, an
exception or an access record.

Payload shapes (a JSON object; ``*`` = required; other keys are refused, except for
``custom``):

=========  ===============================================================================
api_key    ``key``\\* str, ``header`` str
oauth2     ``access_token``\\* str, ``refresh_token`` str, ``token_type`` str,
           ``expires_at`` ISO-8601 str (the access token's expiry), ``scopes`` list[str],
           ``client_id`` str, ``client_secret`` str
basic      ``username``\\* str, ``password``\\* str
database   ``host``\\* str, ``port`` int (1-65535), ``database``\\* str, ``username``\\* str,
           ``password``\\* str, ``sslmode`` str
ssh_key    ``private_key``\\* str, ``username`` str, ``host`` str, ``passphrase`` str,
           ``public_key`` str
custom     any non-empty object of JSON values (string keys)
=========  ===============================================================================

``metadata`` is caller-chosen, non-secret JSON (e.g. a display scope list) and is returned
by every read: never put secrets there.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import orjson

from datalayer.core.errors import NotFound, PermissionDenied, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import Page, Repository, check_limit, page_of
from datalayer.security.keyring import DecryptionError

__all__ = ["TYPES", "Credential", "CredentialAccess", "Credentials",
           "DecryptedCredential", "validate_payload"]

TABLE: Final = "credentials"
COLUMN: Final = "secret"

# type -> field -> (python type(s), required)
_STR = (str,)
_SHAPES: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "api_key": {"key": (_STR, True), "header": (_STR, False)},
    "oauth2": {"access_token": (_STR, True), "refresh_token": (_STR, False),
               "token_type": (_STR, False), "expires_at": (_STR, False),
               "scopes": ((list,), False), "client_id": (_STR, False),
               "client_secret": (_STR, False)},
    "basic": {"username": (_STR, True), "password": (_STR, True)},
    "database": {"host": (_STR, True), "port": ((int,), False), "database": (_STR, True),
                 "username": (_STR, True), "password": (_STR, True), "sslmode": (_STR, False)},
    "ssh_key": {"private_key": (_STR, True), "username": (_STR, False),
                "host": (_STR, False), "passphrase": (_STR, False),
                "public_key": (_STR, False)},
    "custom": {},
}
TYPES: tuple[str, ...] = tuple(_SHAPES)
_MAX_PAYLOAD = 64 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Credential:
    """A credential's metadata; never its secret."""

    org_id: uuid.UUID
    id: uuid.UUID
    name: str
    type: str
    metadata: dict[str, Any]
    expires_at: datetime | None
    is_valid: bool
    last_validated_at: datetime | None
    last_used_at: datetime | None
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class _SecretRow:
    org_id: uuid.UUID
    id: uuid.UUID
    type: str
    secret: bytes = field(repr=False)
    expires_at: datetime | None
    is_valid: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class DecryptedCredential:
    """The result of :meth:`Credentials.decrypt`; ``payload`` is left out of the repr."""

    id: uuid.UUID
    type: str
    payload: dict[str, Any] = field(repr=False)
    expires_at: datetime | None
    is_valid: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialAccess:
    org_id: uuid.UUID
    id: uuid.UUID
    credential_id: uuid.UUID
    actor_id: uuid.UUID | None
    action: str
    at: datetime


CREATE = RowQuery("credentials.create", Credential)
GET = RowQuery("credentials.get", Credential)
LIST = RowQuery("credentials.list", Credential)
UPDATE = RowQuery("credentials.update", Credential)
MARK_VALIDATED = RowQuery("credentials.mark_validated", Credential)
DECRYPT = RowQuery("credentials.decrypt", _SecretRow)
ACCESS_LOG = RowQuery("credentials.access_log", CredentialAccess)


def validate_payload(type_: str, payload: object) -> dict[str, Any]:
    """``payload`` checked against the shape of ``type_``; ``ValidationError`` names the bad
    field (never its value). Returns a plain dict copy."""
    shape = _SHAPES.get(type_) if isinstance(type_, str) else None
    if shape is None:
        raise ValidationError(f"unknown credential type {str(type_)[:40]!r}; "
                              f"use one of {', '.join(TYPES)}")
    if not isinstance(payload, Mapping):
        raise ValidationError(f"a {type_} credential's payload must be an object")
    out = dict(payload)
    if any(not isinstance(k, str) for k in out):
        raise ValidationError(f"a {type_} credential's payload keys must be strings")
    if type_ == "custom":
        if not out:
            raise ValidationError("a custom credential's payload must not be empty")
        return out
    for name, (types, required) in shape.items():
        if name not in out or out[name] is None:
            if required:
                raise ValidationError(f"{type_} credential: field {name!r} is required")
            out.pop(name, None)
            continue
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, types):
            kind = " or ".join(t.__name__ for t in types)
            raise ValidationError(f"{type_} credential: field {name!r} must be a {kind}")
        if isinstance(value, str) and required and not value:
            raise ValidationError(f"{type_} credential: field {name!r} must not be empty")
    unknown = sorted(set(out) - set(shape))
    if unknown:
        raise ValidationError(f"{type_} credential: unknown field {unknown[0][:40]!r} "
                              f"(known: {', '.join(shape)})")
    if type_ == "oauth2":
        scopes = out.get("scopes")
        if scopes is not None and not all(isinstance(s, str) for s in scopes):
            raise ValidationError("oauth2 credential: field 'scopes' must be a list of strings")
        if "expires_at" in out:
            try:
                datetime.fromisoformat(out["expires_at"])
            except ValueError:
                raise ValidationError("oauth2 credential: field 'expires_at' must be an "
                                      "ISO-8601 date-time") from None
    if type_ == "database" and "port" in out and not 1 <= out["port"] <= 65535:
        raise ValidationError("database credential: field 'port' must be between 1 and 65535")
    return out


def _encode(type_: str, payload: object) -> bytes:
    data = orjson.dumps(validate_payload(type_, payload))
    if len(data) > _MAX_PAYLOAD:
        raise ValidationError(f"a credential's payload must be at most {_MAX_PAYLOAD} bytes "
                              "as JSON")
    return data


class Credentials(Repository):
    """``db.credentials``: owners, admins and members read and write; viewers and guests see
    nothing. Secrets only through :meth:`decrypt`."""

    __slots__ = ()

    def _seal(self, org_id: uuid.UUID, cred_id: uuid.UUID, type_: str,
              payload: object) -> bytes:
        return self._db.dl.keyring.encrypt(_encode(type_, payload), org_id=org_id,
                                           table=TABLE, row_id=cred_id, column=COLUMN)

    async def create(self, name: str, type: str, payload: Mapping[str, Any], *,
                     metadata: Mapping[str, Any] | None = None,
                     expires_at: datetime | None = None) -> Credential:
        """Validate, encrypt and store. ``Conflict`` when a live credential has that name."""
        org_id, cred_id = self._tenant_org("store a credential"), uuid.uuid4()
        blob = self._seal(org_id, cred_id, type, payload)
        cred = await self._db.fetch_one(CREATE, id=cred_id, name=name, type=type,
                                        secret=blob, metadata=dict(metadata or {}),
                                        expires_at=expires_at)
        assert cred is not None
        return cred

    async def get(self, cred_id: uuid.UUID) -> Credential | None:
        return await self._db.fetch_one(GET, id=cred_id)

    async def list(self, *, type: str | None = None, after: tuple[str, uuid.UUID] | None = None,
                   limit: int = 100) -> Page[Credential]:
        """Live credentials by name (case-insensitive), keyset-paginated; metadata only."""
        if type is not None and type not in _SHAPES:
            raise ValidationError(f"unknown credential type; use one of {', '.join(TYPES)}")
        name, cid = after or ("", uuid.UUID(int=0))
        rows = await self._db.fetch_many(LIST, type=type, after_name=name, after_id=cid,
                                         limit=check_limit(limit))
        return page_of(rows, limit, lambda c: (c.name, c.id))

    async def update(self, cred_id: uuid.UUID, *, name: str | None = None,
                     payload: Mapping[str, Any] | None = None,
                     metadata: Mapping[str, Any] | None = None,
                     expires_at: datetime | None = None,
                     clear_expiry: bool = False) -> Credential:
        """Change what is given. A new ``payload`` is validated against the credential's type
        and re-encrypted under the active key. ``NotFound`` when not live or not writable."""
        blob, type_ = None, None
        if payload is not None:
            current = await self.get(cred_id)
            if current is None:
                raise NotFound("credential not found", query=UPDATE.name)
            type_ = current.type
            blob = self._seal(current.org_id, cred_id, type_, payload)
        cred = await self._db.fetch_one(
            UPDATE, id=cred_id, name=name, secret=blob, type=type_,
            metadata=None if metadata is None else dict(metadata),
            expires_at=expires_at, clear_expiry=clear_expiry)
        if cred is None:
            raise NotFound("credential not found or not writable by this role",
                           query=UPDATE.name)
        return cred

    async def mark_validated(self, cred_id: uuid.UUID, *, valid: bool) -> Credential:
        """Record the outcome of checking the credential against its service."""
        cred = await self._db.fetch_one(MARK_VALIDATED, id=cred_id, valid=valid)
        if cred is None:
            raise NotFound("credential not found or not writable by this role",
                           query=MARK_VALIDATED.name)
        return cred

    async def delete(self, cred_id: uuid.UUID) -> bool:
        """Soft delete: gone from reads, decrypt and its name; True when it was live."""
        return await self._db.execrows("credentials.delete", id=cred_id) == 1

    async def decrypt(self, cred_id: uuid.UUID) -> DecryptedCredential:
        """The secret payload, with an access record (actor, credential, time) written by
        the same statement. ``NotFound`` when not live or not readable by this context;
        ``PermissionDenied`` when the context may not write the access record."""
        if self._db.readonly:
            raise PermissionDenied("decrypt() writes an access record: use a writable session")
        row = await self._db.fetch_one(DECRYPT, id=cred_id)
        if row is None:
            raise NotFound("credential not found", query=DECRYPT.name)
        plain = self._db.dl.keyring.decrypt(row.secret, org_id=row.org_id, table=TABLE,
                                            row_id=row.id, column=COLUMN)
        try:
            payload = orjson.loads(plain)
        except orjson.JSONDecodeError:
            raise DecryptionError("credential payload is not JSON") from None
        return DecryptedCredential(id=row.id, type=row.type, payload=payload,
                                   expires_at=row.expires_at, is_valid=row.is_valid)

    async def access_log(self, cred_id: uuid.UUID, *,
                         limit: int = 100) -> builtins.list[CredentialAccess]:
        """Who decrypted the credential, newest first (readers of the audit trail)."""
        return await self._db.fetch_many(ACCESS_LOG, credential_id=cred_id,
                                         limit=check_limit(limit))

    async def deactivate_expired(self) -> int:
        """Mark expired credentials invalid; run from maintenance (``dl.system()``) for every
        organization. Returns how many changed."""
        return await self._db.execrows("credentials.deactivate_expired")
