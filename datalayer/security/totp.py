"""Time-based one-time passwords (RFC 6238): HMAC-SHA1, 6 digits, 30-second steps by default.

Cost: one HMAC per step in the window (3 at ``window=1``): microseconds.
Obligations of the caller: keep the secret encrypted at rest (see :class:`Keyring`); store the
step :func:`verify` returns and pass it back as ``last_used_step`` next time, which is what
stops a code from being used twice; rate-limit attempts (a 6-digit code falls to about
10**6 / (2 * window + 1) guesses).
"""

from __future__ import annotations

import base64
import hmac
import os
import time
from typing import Literal
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives.hashes import SHA1, SHA256, SHA512
from cryptography.hazmat.primitives.twofactor.hotp import HOTP, HOTPHashTypes

from datalayer.core.errors import ValidationError

__all__ = [
    "SECRET_BYTES",
    "STEP_SECONDS",
    "Algorithm",
    "new_secret",
    "now_code",
    "provisioning_uri",
    "step_of",
    "verify",
]

Algorithm = Literal["SHA1", "SHA256", "SHA512"]
STEP_SECONDS = 30
SECRET_BYTES = 20  # 160 bits, RFC 4226's recommendation
_MAX_WINDOW = 10
# HMAC-SHA1 is what RFC 6238 and every authenticator app default to; HMAC does not rely on
# SHA-1's collision resistance, so this is not the weakness S303 is about.
_HASHES: dict[str, HOTPHashTypes] = {
    "SHA1": SHA1(),  # noqa: S303
    "SHA256": SHA256(),
    "SHA512": SHA512(),
}


def new_secret() -> bytes:
    """A fresh random 20-byte secret."""
    return os.urandom(SECRET_BYTES)


def provisioning_uri(secret: bytes, account: str, issuer: str, *, digits: int = 6,
                     algorithm: Algorithm = "SHA1") -> str:
    """The ``otpauth://totp/Issuer:account?...`` URI authenticator apps read from a QR code.

    The URI contains the secret: show it once to its owner and never log it.
    """
    _check(secret, digits, algorithm)
    for name, value in (("account", account), ("issuer", issuer)):
        if not value or ":" in value:
            raise ValidationError(f"TOTP {name} must be non-empty and contain no ':'")
    params = {
        "secret": base64.b32encode(secret).decode("ascii").rstrip("="),
        "issuer": issuer,
        "algorithm": algorithm,
        "digits": str(digits),
        "period": str(STEP_SECONDS),
    }
    label = f"{quote(issuer, safe='')}:{quote(account, safe='')}"
    return f"otpauth://totp/{label}?{urlencode(params, quote_via=quote)}"


def step_of(at: float | None = None) -> int:
    """The RFC 6238 time step (counter) at Unix time ``at`` (default: now)."""
    t = time.time() if at is None else at
    if t < 0:
        raise ValidationError("TOTP time must not be before the Unix epoch")
    return int(t // STEP_SECONDS)


def now_code(secret: bytes, at: float | None = None, *, digits: int = 6,
             algorithm: Algorithm = "SHA1") -> str:
    """The code for the step containing ``at`` (default: now). For tests and demos."""
    return _code(secret, step_of(at), digits, algorithm)


def verify(secret: bytes, code: str, *, at: float | None = None, window: int = 1,
           last_used_step: int | None = None, digits: int = 6,
           algorithm: Algorithm = "SHA1") -> int | None:
    """The step ``code`` is valid for, or None.

    Accepts steps within ``window`` of the current one (clock drift) and only those strictly
    after ``last_used_step`` (replay protection). ``code`` must be exactly ``digits`` ASCII
    digits. Every candidate step is compared in constant time, with no early exit.
    """
    _check(secret, digits, algorithm)
    if not 0 <= window <= _MAX_WINDOW:
        raise ValidationError(f"TOTP window must be between 0 and {_MAX_WINDOW} steps")
    if not (isinstance(code, str) and len(code) == digits and code.isascii()
            and code.isdigit()):
        return None
    current = step_of(at)
    given = code.encode("ascii")
    matched: int | None = None
    for step in range(max(0, current - window), current + window + 1):
        expected = _code(secret, step, digits, algorithm).encode("ascii")
        ok = hmac.compare_digest(expected, given)
        fresh = last_used_step is None or step > last_used_step
        if ok and fresh and matched is None:
            matched = step
    return matched


def _code(secret: bytes, step: int, digits: int, algorithm: Algorithm) -> str:
    _check(secret, digits, algorithm)
    hotp = HOTP(secret, digits, _HASHES[algorithm])
    return hotp.generate(step).decode("ascii")


def _check(secret: bytes, digits: int, algorithm: str) -> None:
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValidationError("TOTP secret must be at least 16 bytes (new_secret() makes 20)")
    if digits not in (6, 7, 8):
        raise ValidationError("TOTP codes have 6, 7 or 8 digits")
    if algorithm not in _HASHES:
        raise ValidationError("TOTP algorithm must be SHA1, SHA256 or SHA512")
