"""Column encryption with AES-256-GCM under a rotating set of named keys.

Blob layout: ``0x01 | len(kid) (1 byte) | kid (ASCII) | nonce (12 random bytes) | ciphertext+tag``.
The associated data binds every blob to its place, ``(version, kid, org, table, row, column)``,
each part length-prefixed, so a blob copied to another row, column, table or tenant fails to
decrypt exactly like a tampered one.

Cost: microseconds per value (AES-NI); 29 + len(kid) bytes of overhead per value.
Obligations: the first key encrypts; keep every key that still has data under it in the
list; re-encrypt old rows (``key_id_of(blob) != active_kid``) before dropping a key; rotate the
active key before ~2**32 encryptions under it (the limit for random 96-bit nonces).
A UUID row id is bound as ``str(uuid)``, so UUID and its canonical string are the same place.
"""

from __future__ import annotations

import base64
import logging
import os
import struct
from collections.abc import Sequence
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from datalayer.core.errors import ConfigError, DataLayerError, ValidationError
from datalayer.settings import Settings, parse_keys

__all__ = ["DEV_KID", "DecryptionError", "Keyring"]

log = logging.getLogger("datalayer.security")

VERSION = 0x01
DEV_KID = "dev-ephemeral"
_NONCE = 12
_TAG = 16


class DecryptionError(DataLayerError):
    """A value cannot be decrypted: unknown key, tampered, truncated, or moved from its place."""


class Keyring:
    """A list of ``(kid, 32-byte key)``: the first encrypts, every one decrypts. Thread-safe."""

    __slots__ = ("_active", "_ciphers")

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError("a Keyring needs at least one key (DATALAYER_KEYS)")
        ciphers: dict[str, AESGCM] = {}
        for kid, key in keys:
            if not (isinstance(kid, str) and kid.isascii() and 1 <= len(kid) <= 255):
                raise ConfigError("key ids must be 1 to 255 ASCII characters")
            if kid in ciphers:
                raise ConfigError(f"key id {kid!r} appears twice")
            if not isinstance(key, bytes) or len(key) != 32:
                raise ConfigError(f"key {kid!r} must be exactly 32 bytes (AES-256)")
            ciphers[kid] = AESGCM(key)
        self._ciphers = ciphers
        self._active = keys[0][0]

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        """The keys of ``settings.keys``; without them, a throwaway key outside production."""
        if settings.keys:
            return cls(parse_keys(settings.keys))
        if settings.env == "production":
            raise ConfigError("DATALAYER_KEYS is required when DATALAYER_ENV=production "
                              "(format: kid:base64-32-byte-key[,kid:key...])")
        log.warning(
            "DATALAYER_KEYS is not set: using a random throwaway key %r; data encrypted now "
            "will not decrypt after a restart. Set DATALAYER_KEYS to keep it.",
            DEV_KID, extra={"kid": DEV_KID, "env": settings.env},
        )
        return cls([(DEV_KID, AESGCM.generate_key(bit_length=256))])

    @staticmethod
    def generate_key() -> str:
        """A fresh random 32-byte key, base64-encoded for ``DATALAYER_KEYS``."""
        return base64.b64encode(os.urandom(32)).decode("ascii")

    @property
    def active_kid(self) -> str:
        """The id of the key that encrypts."""
        return self._active

    @property
    def kids(self) -> tuple[str, ...]:
        """Every key id, the active one first."""
        return tuple(self._ciphers)

    def __repr__(self) -> str:
        return f"Keyring(active={self._active!r}, kids={list(self._ciphers)!r})"

    def with_new_key(self, kid: str, key: bytes) -> Keyring:
        """A ring whose active key is ``(kid, key)`` and that still decrypts with every key
        of this one (what a rotation runs with)."""
        if kid in self._ciphers:
            raise ConfigError(f"key id {kid!r} is already in the keyring")
        ring = Keyring([(kid, key)])
        ring._ciphers.update(self._ciphers)
        return ring

    def with_active(self, kid: str) -> Keyring:
        """The same keys with ``kid`` active (e.g. to rotate back to an earlier key)."""
        if kid not in self._ciphers:
            raise ConfigError(f"key id {kid!r} is not in the keyring")
        ring = object.__new__(Keyring)
        ring._ciphers = {kid: self._ciphers[kid], **self._ciphers}
        ring._active = kid
        return ring

    def encrypt(self, plaintext: bytes, *, org_id: UUID | None, table: str,
                row_id: str | UUID, column: str) -> bytes:
        """Encrypt ``plaintext`` for one place under the active key, with a fresh random nonce."""
        ad = _associated_data(self._active, org_id, table, row_id, column)
        nonce = os.urandom(_NONCE)
        kid = self._active.encode("ascii")
        body = self._ciphers[self._active].encrypt(nonce, plaintext, ad)
        return b"".join((bytes((VERSION, len(kid))), kid, nonce, body))

    def decrypt(self, blob: bytes, *, org_id: UUID | None, table: str,
                row_id: str | UUID, column: str) -> bytes:
        """The plaintext of ``blob``, which must have been encrypted for exactly this place.

        Raises :class:`DecryptionError` (naming the key id and place, never data or keys) when
        the key is unknown or the blob is malformed, tampered, or from another place.
        """
        ad_check = (org_id, table, row_id, column)
        where = _place(*ad_check)
        kid, nonce, body = _split(blob, where)
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise DecryptionError(
                f"cannot decrypt {where}: key id {kid!r} is not in the keyring "
                f"(known: {', '.join(self._ciphers)}); add it back to DATALAYER_KEYS",
                table=table, column=column)
        try:
            return cipher.decrypt(nonce, body, _associated_data(kid, *ad_check))
        except InvalidTag:
            raise DecryptionError(
                f"cannot decrypt {where} under key {kid!r}: authentication failed (the value "
                "was altered, or was encrypted for a different org, table, row or column)",
                table=table, column=column) from None

    def encrypt_str(self, text: str, *, org_id: UUID | None, table: str,
                    row_id: str | UUID, column: str) -> bytes:
        """:meth:`encrypt` of ``text`` as UTF-8."""
        return self.encrypt(text.encode("utf-8"), org_id=org_id, table=table,
                            row_id=row_id, column=column)

    def decrypt_str(self, blob: bytes, *, org_id: UUID | None, table: str,
                    row_id: str | UUID, column: str) -> str:
        """:meth:`decrypt` decoded as UTF-8; not-UTF-8 plaintext is a :class:`DecryptionError`."""
        raw = self.decrypt(blob, org_id=org_id, table=table, row_id=row_id, column=column)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptionError(
                f"{_place(org_id, table, row_id, column)} decrypted to bytes that are not UTF-8; "
                "it was stored with encrypt(), not encrypt_str()", table=table, column=column,
            ) from None

    @staticmethod
    def key_id_of(blob: bytes) -> str:
        """The key id a blob was encrypted under (unauthenticated; for rotation bookkeeping)."""
        return _split(blob, "value")[0]

    def needs_reencrypt(self, blob: bytes) -> bool:
        """True when ``blob`` is not under the active key and should be re-encrypted."""
        return self.key_id_of(blob) != self._active


def _split(blob: bytes, where: str) -> tuple[str, bytes, bytes]:
    """(kid, nonce, ciphertext+tag) of a blob, or :class:`DecryptionError` when malformed."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise ValidationError(f"cannot decrypt {where}: expected bytes")
    blob = bytes(blob)
    if len(blob) < 2 or blob[0] != VERSION:
        version = f"0x{blob[0]:02x}" if blob else "none"
        raise DecryptionError(f"cannot decrypt {where}: unknown format version {version}")
    n = blob[1]
    if n == 0 or len(blob) < 2 + n + _NONCE + _TAG:
        raise DecryptionError(f"cannot decrypt {where}: the value is truncated or malformed")
    try:
        kid = blob[2:2 + n].decode("ascii")
    except UnicodeDecodeError:
        raise DecryptionError(f"cannot decrypt {where}: the key id is not ASCII") from None
    return kid, blob[2 + n:2 + n + _NONCE], blob[2 + n + _NONCE:]


def _associated_data(kid: str, org_id: UUID | None, table: str, row_id: str | UUID,
                     column: str) -> bytes:
    """Canonical, injective encoding of the place: every part is 4-byte-length-prefixed."""
    if org_id is not None and not isinstance(org_id, UUID):
        raise ValidationError("org_id must be a UUID or None")
    if not isinstance(row_id, str | UUID):
        raise ValidationError("row_id must be a str or a UUID")
    if not (isinstance(table, str) and table and isinstance(column, str) and column):
        raise ValidationError("table and column must be non-empty strings")
    parts = (
        b"datalayer.keyring",
        kid.encode("ascii"),
        b"" if org_id is None else b"\x01" + org_id.bytes,  # None and a UUID never collide
        table.encode("utf-8", "surrogatepass"),
        str(row_id).encode("utf-8", "surrogatepass"),
        column.encode("utf-8", "surrogatepass"),
    )
    return bytes((VERSION,)) + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _place(org_id: UUID | None, table: str, row_id: str | UUID, column: str) -> str:
    org = "no org" if org_id is None else f"org {org_id}"
    return f"{table}.{column} of row {str(row_id)[:64]!r} ({org})"
