"""Password hashing with Argon2id, stored as PHC strings.

Format: ``$argon2id$v=19$m=<KiB>,t=<passes>,p=<lanes>$<salt>$<hash>`` (standard base64 alphabet,
no padding), the format libargon2, argon2-cffi and passlib read and write.

Cost: one hash or verify at the default policy takes tens of milliseconds of CPU and
``memory_kib`` KiB of RAM. cryptography releases the GIL while it runs, so async callers
must use :meth:`PasswordHasher.hash_async` / :meth:`PasswordHasher.verify_async` (which run the
work in a thread via :func:`asyncio.to_thread`) and never call :meth:`PasswordHasher.hash` or
:meth:`PasswordHasher.verify` on the event loop.

Obligations of the caller: store the returned string as-is; after a successful ``verify``
call :meth:`PasswordHasher.needs_rehash` and store a fresh ``hash`` when it says so; when the
account does not exist, still verify against some stored hash so the response time does not
reveal which accounts exist.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
import unicodedata
from dataclasses import dataclass

from cryptography.exceptions import InvalidKey
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from datalayer.core.errors import ValidationError

__all__ = ["DEFAULT_POLICY", "MAX_PASSWORD_LENGTH", "OWASP_MINIMUM", "PasswordHasher",
           "PasswordPolicy"]

MAX_PASSWORD_LENGTH = 1024  # characters; longer input is refused before any hashing
# Upper bounds on what a stored hash may ask for, so a corrupted or planted row cannot make
# verify() allocate gigabytes or spin for minutes.
_MAX_MEMORY_KIB = 1 << 21  # 2 GiB
_MAX_ITERATIONS = 100
_MAX_LANES = 255
_MAX_BYTES = 64  # salt and hash length

_PHC = re.compile(
    r"\$argon2id\$v=19\$m=([1-9][0-9]{0,9}),t=([1-9][0-9]{0,9}),p=([1-9][0-9]{0,9})"
    r"\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)"
)


@dataclass(frozen=True, slots=True)
class PasswordPolicy:
    """Argon2id cost parameters; the constructor refuses values Argon2 or this module cannot use.

    ``memory_kib`` is in KiB, ``iterations`` is Argon2's ``t``, ``lanes`` its ``p``.
    """

    memory_kib: int = 19456
    iterations: int = 2
    lanes: int = 1
    salt_len: int = 16
    hash_len: int = 32

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.lanes <= _MAX_LANES:
            problems.append(f"lanes must be between 1 and {_MAX_LANES}")
        if not 8 * self.lanes <= self.memory_kib <= _MAX_MEMORY_KIB:
            problems.append(f"memory_kib must be between 8 * lanes and {_MAX_MEMORY_KIB}")
        if not 1 <= self.iterations <= _MAX_ITERATIONS:
            problems.append(f"iterations must be between 1 and {_MAX_ITERATIONS}")
        if not 8 <= self.salt_len <= _MAX_BYTES:
            problems.append(f"salt_len must be between 8 and {_MAX_BYTES} bytes")
        if not 4 <= self.hash_len <= _MAX_BYTES:
            problems.append(f"hash_len must be between 4 and {_MAX_BYTES} bytes")
        if problems:
            raise ValidationError("invalid PasswordPolicy: " + "; ".join(problems))

    def covers(self, other: PasswordPolicy) -> bool:
        """True when every parameter of ``self`` is at least the one of ``other``."""
        return (self.memory_kib >= other.memory_kib and self.iterations >= other.iterations
                and self.lanes >= other.lanes and self.salt_len >= other.salt_len
                and self.hash_len >= other.hash_len)


# OWASP Password Storage Cheat Sheet: Argon2id with m=19 MiB, t=2, p=1 is the minimum.
OWASP_MINIMUM = PasswordPolicy(memory_kib=19456, iterations=2, lanes=1)
DEFAULT_POLICY = PasswordPolicy()


@dataclass(frozen=True, slots=True)
class _Parsed:
    policy: PasswordPolicy
    salt: bytes
    digest: bytes


class PasswordHasher:
    """Hashes and verifies passwords under one :class:`PasswordPolicy`. Thread-safe."""

    __slots__ = ("_dummy", "policy")

    def __init__(self, policy: PasswordPolicy = DEFAULT_POLICY) -> None:
        self.policy = policy
        self._dummy: str | None = None

    def __repr__(self) -> str:
        return f"PasswordHasher({self.policy!r})"

    def hash(self, password: str) -> str:
        """A new PHC string for ``password`` with a fresh random salt. Blocks for the full cost.

        Raises :class:`ValidationError` for an empty password, one over
        ``MAX_PASSWORD_LENGTH`` characters, or one that is not valid Unicode text.
        """
        secret = _password_bytes(password)
        if secret is None:
            raise ValidationError(
                f"password must be 1 to {MAX_PASSWORD_LENGTH} characters of Unicode text"
            )
        p = self.policy
        kdf = Argon2id(salt=os.urandom(p.salt_len), length=p.hash_len,
                       iterations=p.iterations, lanes=p.lanes, memory_cost=p.memory_kib)
        return kdf.derive_phc_encoded(secret)

    def verify(self, phc: str, password: str) -> bool:
        """True when ``password`` matches ``phc``; the comparison is constant-time.

        Costs what the stored hash's parameters cost. A password that :meth:`hash` would refuse
        is False without hashing. Raises :class:`ValidationError` only when ``phc`` is not an
        Argon2id PHC string this module accepts (the message never contains it).
        """
        parsed = _parse(phc)
        secret = _password_bytes(password)
        if secret is None:
            return False
        p = parsed.policy
        kdf = Argon2id(salt=parsed.salt, length=p.hash_len, iterations=p.iterations,
                       lanes=p.lanes, memory_cost=p.memory_kib)
        try:
            kdf.verify(secret, parsed.digest)  # cryptography compares in constant time
        except InvalidKey:
            return False
        return True

    def needs_rehash(self, phc: str) -> bool:
        """True when ``phc`` was made with any parameter below this hasher's policy. Cheap."""
        return not _parse(phc).policy.covers(self.policy)

    async def hash_async(self, password: str) -> str:
        """:meth:`hash` in a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.hash, password)

    async def verify_async(self, phc: str, password: str) -> bool:
        """:meth:`verify` in a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.verify, phc, password)

    async def waste_async(self, password: str) -> None:
        """Spend what a verification costs, for an account that does not exist, so that an
        unknown email answers no faster than a wrong password. The first call also hashes."""
        if self._dummy is None:
            self._dummy = await self.hash_async("dummy password for unknown accounts")
        await self.verify_async(self._dummy, password)


def _password_bytes(password: str) -> bytes | None:
    """NFKC-normalised UTF-8 (NIST SP 800-63B), or None when the password is unacceptable."""
    if not isinstance(password, str) or not 1 <= len(password) <= MAX_PASSWORD_LENGTH:
        return None
    try:
        return unicodedata.normalize("NFKC", password).encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return None


def _parse(phc: str) -> _Parsed:
    """Strictly parse a stored hash; any deviation is a :class:`ValidationError`."""
    m = _PHC.fullmatch(phc) if isinstance(phc, str) else None
    if m is None:
        raise ValidationError(
            "stored password hash is not an Argon2id (v=19) PHC string; it may be corrupted"
        )
    salt, digest = _b64(m.group(4)), _b64(m.group(5))
    if salt is None or digest is None:
        raise ValidationError("stored password hash has invalid base64 in its salt or hash")
    try:
        policy = PasswordPolicy(memory_kib=int(m.group(1)), iterations=int(m.group(2)),
                                lanes=int(m.group(3)), salt_len=len(salt), hash_len=len(digest))
    except ValidationError as exc:
        raise ValidationError(f"stored password hash has unusable parameters ({exc})") from None
    return _Parsed(policy, salt, digest)


def _b64(text: str) -> bytes | None:
    """Decode canonical unpadded standard base64, or None (non-canonical input is refused)."""
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii").rstrip("=") != text:
        return None
    return raw
