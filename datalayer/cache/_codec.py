"""How a cached value is stored: orjson, zlib above a threshold, AES-GCM for sensitive namespaces.

Layout: ``header (1 byte) | expires_at (8 bytes, big-endian ms since the epoch) | body``.
The header is ``0x10 | flags``: bit 0 set when the body is zlib-compressed, bit 1 when it is
encrypted. An encrypted body is a :class:`~datalayer.security.Keyring` blob of
``expires_at | payload``, bound to the entry's full key (table ``cache``, column ``value``):
a blob copied to another key, or given a later expiry, fails to decrypt like a tampered one,
so a replayed entry never outlives the expiry it was written with.

Cost: one ``orjson.dumps``/``loads``; zlib (level 1) only above the threshold; AES-GCM only
for sensitive namespaces (microseconds). Overhead: 9 bytes, plus 29 + len(kid) encrypted.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import ipaddress
import struct
import uuid
import zlib
from typing import Any

import orjson

from datalayer.security.keyring import DecryptionError, Keyring

__all__ = ["HEADER_SIZE", "CodecError", "decode", "encode", "expires_at_ms"]

MAGIC = 0x10
COMPRESSED = 0x01
ENCRYPTED = 0x02
HEADER_SIZE = 9
MAX_VALUE_BYTES = 64 * 1024 * 1024  # decompression limit: a stored bomb is an error, not OOM
_EXPIRY = struct.Struct(">Q")


class CodecError(Exception):
    """A stored value cannot be read: malformed, tampered, moved, or not encrypted when its
    namespace is sensitive. The cache treats it as a miss and counts an error."""


def _default(value: Any) -> Any:
    """orjson fallback for the types rows hold that JSON lacks."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, decimal.Decimal | uuid.UUID):  # asyncpg's UUID is a subclass
        return str(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, set | frozenset):
        return list(value)
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    raise TypeError(f"cannot cache a value of type {type(value).__name__}")


def dumps(value: Any) -> bytes:
    """orjson with the fallbacks above (bytes as base64, Decimal as text)."""
    return orjson.dumps(value, default=_default)


def encode(value: Any, *, key: str, expires_at_ms: int, compress_above: int | None,
           keyring: Keyring | None) -> bytes:
    """The stored form of ``value`` under the full ``key``. ``keyring`` given: encrypted."""
    body = dumps(value)
    flags = MAGIC
    if compress_above is not None and len(body) > compress_above:
        packed = zlib.compress(body, 1)
        if len(packed) < len(body):
            body, flags = packed, flags | COMPRESSED
    expiry = _EXPIRY.pack(expires_at_ms)
    if keyring is not None:
        body = keyring.encrypt(expiry + body, org_id=None, table="cache", row_id=key,
                               column="value")
        flags |= ENCRYPTED
    return bytes((flags,)) + expiry + body


def expires_at_ms(blob: bytes) -> int:
    """The expiry written in the header (unauthenticated; for refresh-ahead decisions)."""
    exp: int = _EXPIRY.unpack_from(blob, 1)[0]
    return exp


def decode(blob: bytes, *, key: str, keyring: Keyring | None) -> tuple[Any, int]:
    """``(value, expires_at_ms)`` of a stored blob. ``keyring`` given: the blob must be
    encrypted for ``key`` (a plaintext entry in a sensitive namespace is refused).
    Raises :class:`CodecError`."""
    if len(blob) < HEADER_SIZE or blob[0] & 0xF0 != MAGIC:
        raise CodecError("not a cache entry (bad header)")
    flags = blob[0]
    expiry: int = _EXPIRY.unpack_from(blob, 1)[0]
    body = blob[HEADER_SIZE:]
    if keyring is not None:
        if not flags & ENCRYPTED:
            raise CodecError("a sensitive namespace holds an unencrypted entry")
        try:
            plain = keyring.decrypt(body, org_id=None, table="cache", row_id=key,
                                    column="value")
        except DecryptionError as exc:
            raise CodecError(f"cannot decrypt: {exc}") from None
        if len(plain) < 8 or _EXPIRY.unpack_from(plain)[0] != expiry:
            raise CodecError("the entry's expiry was altered")
        body = plain[8:]
    elif flags & ENCRYPTED:
        raise CodecError("an encrypted entry in a namespace that is not sensitive")
    if flags & COMPRESSED:
        try:
            d = zlib.decompressobj()
            body = d.decompress(body, MAX_VALUE_BYTES)
            if d.unconsumed_tail or not d.eof:
                raise CodecError("compressed entry is truncated or too large")
        except zlib.error as exc:
            raise CodecError(f"bad compressed entry: {exc}") from None
    try:
        return orjson.loads(body), expiry
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"bad JSON in entry: {exc}") from None
