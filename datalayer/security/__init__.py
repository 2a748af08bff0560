"""Security services: Argon2id password hashing, AES-256-GCM column encryption, TOTP.

``from datalayer.security import totp`` for the one-time-password functions; the classes are
re-exported here. Nothing holds module-level state: build one :class:`PasswordHasher` and one
:class:`Keyring` per process (``Keyring.from_settings``) and pass them where they are needed.
"""

from datalayer.security import totp
from datalayer.security.keyring import DEV_KID, DecryptionError, Keyring
from datalayer.security.passwords import (
    DEFAULT_POLICY,
    MAX_PASSWORD_LENGTH,
    OWASP_MINIMUM,
    PasswordHasher,
    PasswordPolicy,
)

__all__ = [
    "DEFAULT_POLICY",
    "DEV_KID",
    "MAX_PASSWORD_LENGTH",
    "OWASP_MINIMUM",
    "DecryptionError",
    "Keyring",
    "PasswordHasher",
    "PasswordPolicy",
    "totp",
]
