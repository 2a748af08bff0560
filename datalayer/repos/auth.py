"""Account security (``queries/auth.sql``): registration, login with lockout, single-use
tokens, invitations and TOTP two-factor authentication.

Passwords are hashed with Argon2id off the event loop; tokens and recovery codes are stored
as sha256 only; the TOTP secret is encrypted with the Keyring, bound to its user row. Every
secret this module hands out (a token, a recovery code, a TOTP URI) is returned once and
never logged or kept.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from datalayer.cache import lookups
from datalayer.core.context import ROLES
from datalayer.core.errors import PermissionDenied, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import Repository
from datalayer.repos.users import User
from datalayer.security import totp

__all__ = ["Auth", "LoginResult", "TokenKind", "TokenUse", "TwoFactorSetup"]

TokenKind = Literal["email_verification", "password_reset", "invitation"]
LoginOutcome = Literal["ok", "invalid", "locked", "suspended", "2fa_required", "2fa_invalid"]
TOKEN_TTL_S = {"email_verification": 48 * 3600, "password_reset": 3600,
               "invitation": 7 * 24 * 3600}
RECOVERY_CODES = 10


@dataclass(frozen=True, slots=True, kw_only=True)
class LoginRow:
    user_id: uuid.UUID
    password_hash: str | None
    status: str
    failed_logins: int
    locked_until: datetime | None
    totp_enabled: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenUse:
    user_id: uuid.UUID | None
    org_id: uuid.UUID | None
    role: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TotpState:
    secret: bytes | None
    last_step: int | None
    enabled: bool
    recovery_codes: list[str] | None


@dataclass(frozen=True, slots=True)
class LoginResult:
    """``outcome`` says what happened; ``user_id`` is set only when the password was right."""

    outcome: LoginOutcome
    user_id: uuid.UUID | None = None
    locked_until: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True, slots=True)
class TwoFactorSetup:
    """Shown to the user once: the otpauth:// URI (holds the secret) and recovery codes."""

    uri: str = field(repr=False)
    recovery_codes: list[str] = field(repr=False)


LOGIN_LOOKUP = RowQuery("auth.login_lookup", LoginRow)
CONSUME = RowQuery("auth.consume_token", TokenUse)
TOTP_STATE = RowQuery("auth.totp_state", TotpState)

def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class Auth(Repository):
    """``db.auth``. The login path (``login``, ``lockout_status``, ``issue_token``,
    ``consume_token``, ``verify_2fa``, ``use_recovery_code``) runs in a session with
    ``Context(None)`` (a user id is allowed, an organization is not: the database refuses);
    ``register``, ``set_password``, ``enable_2fa`` act on the context's own user, and
    ``invite`` needs an admin of the context organization."""

    __slots__ = ()

    # -- registration and passwords ----------------------------------------------------------
    async def register(self, *, email: str, password: str, display_name: str = "",
                       first_name: str | None = None, last_name: str | None = None,
                       preferences: dict[str, Any] | None = None) -> User:
        """Create the account whose id is the context's ``user_id`` (the caller picks it).
        ``Conflict`` when a live account has this email (case-insensitive)."""
        ctx = self._db.context
        if ctx is None or ctx.user_id is None:
            raise ValidationError("register() needs a Context whose user_id is the new "
                                  "account's id")
        password_hash = await self._db.dl.passwords.hash_async(password)
        return await self._db.users.create(
            email=email, password_hash=password_hash, display_name=display_name,
            first_name=first_name, last_name=last_name, preferences=preferences)

    async def login(self, email: str, password: str, *,
                    totp_code: str | None = None) -> LoginResult:
        """Check a password (and a TOTP code when 2FA is on) and record the attempt.

        Failures count per account; from the 5th the account locks for 1 s, doubling per
        further failure up to 15 minutes. While locked, attempts are refused without being
        checked or counted, so an attacker cannot extend a lock and it always expires; a
        password reset also clears it. A successful login upgrades an outdated hash.
        Needs a read-write session (it records the attempt); no context required.
        """
        hasher = self._db.dl.passwords
        row = await self._db.fetch_one(LOGIN_LOOKUP, email=email)
        audit = self._db.audit
        if row is None or row.password_hash is None:
            await hasher.waste_async(password)
            await audit.auth_event(None if row is None else row.user_id, "auth.login",
                                   "failure", details={"reason": "invalid"})
            return LoginResult("invalid")
        if row.status != "active":
            await audit.auth_event(row.user_id, "auth.login", "denied",
                                   details={"reason": "suspended"})
            return LoginResult("suspended")
        now = datetime.now(UTC)
        if row.locked_until is not None and row.locked_until > now:
            await audit.auth_event(row.user_id, "auth.login", "denied",
                                   details={"reason": "locked"})
            return LoginResult("locked", locked_until=row.locked_until)
        if not await hasher.verify_async(row.password_hash, password):
            return await self._failed(row.user_id, "invalid")
        if row.totp_enabled:
            if totp_code is None:
                return LoginResult("2fa_required", user_id=row.user_id)
            if not await self.verify_2fa(row.user_id, totp_code):
                return await self._failed(row.user_id, "2fa_invalid")
        new_hash = None
        if hasher.needs_rehash(row.password_hash):
            new_hash = await hasher.hash_async(password)
        await self._db.scalar("auth.record_login", user_id=row.user_id, success=True,
                              old_hash=row.password_hash, new_hash=new_hash)
        await lookups.invalidate(self._db, lookups.user_tag(row.user_id))
        await audit.auth_event(row.user_id, "auth.login", "success")
        return LoginResult("ok", user_id=row.user_id)

    async def _failed(self, user_id: uuid.UUID, outcome: LoginOutcome) -> LoginResult:
        locked = await self._db.scalar("auth.record_login", user_id=user_id, success=False,
                                       old_hash=None, new_hash=None)
        await lookups.invalidate(self._db, lookups.user_tag(user_id))
        audit = self._db.audit
        await audit.auth_event(user_id, "auth.login", "failure", details={"reason": outcome})
        if locked is not None and locked > datetime.now(UTC):
            await audit.auth_event(user_id, "auth.lockout", "success",
                                   details={"until": locked.isoformat()})
            return LoginResult("locked", locked_until=locked)
        return LoginResult(outcome)

    async def lockout_status(self, email: str) -> datetime | None:
        """When the account's lock ends, or None when it is not locked (or unknown)."""
        row = await self._db.fetch_one(LOGIN_LOOKUP, email=email)
        if row is None or row.locked_until is None or row.locked_until <= datetime.now(UTC):
            return None
        return row.locked_until

    async def set_password(self, password: str) -> None:
        """Replace the context user's password (callers check the current one first)."""
        new_hash = await self._db.dl.passwords.hash_async(password)
        if not await self._db.scalar("auth.set_password", password_hash=new_hash):
            raise PermissionDenied("set_password needs a writable context with a user_id")
        await self._own_account_changed()

    # -- single-use tokens ----------------------------------------------------------------------
    async def issue_token(self, kind: Literal["email_verification", "password_reset"],
                          email: str, *, ttl_s: int | None = None) -> str | None:
        """A new token for the live account with this email, invalidating its previous live
        token of the same kind; None when there is no such account (answer the user the
        same way in both cases). The token is returned once; only its sha256 is stored."""
        if kind not in ("email_verification", "password_reset"):
            raise ValidationError("kind must be email_verification or password_reset")
        token = secrets.token_urlsafe(32)
        user = await self._db.scalar("auth.issue_user_token", kind=kind, email=email,
                                     token_hash=_sha256(token),
                                     ttl_s=ttl_s or TOKEN_TTL_S[kind])
        return token if user is not None else None

    async def invite(self, email: str, role: str = "member", *,
                     ttl_s: int | None = None) -> str:
        """An invitation into the context organization (admins only); returns the token."""
        if role not in ROLES or role == "owner":
            raise ValidationError("an invitation role must be admin, member, viewer or guest")
        token = secrets.token_urlsafe(32)
        await self._db.scalar("auth.issue_invitation", email=email, role=role,
                              token_hash=_sha256(token),
                              ttl_s=ttl_s or TOKEN_TTL_S["invitation"])
        return token

    async def consume_token(self, kind: TokenKind, token: str, *,
                            new_password: str | None = None) -> TokenUse | None:
        """Use a token once: verify the email, reset the password (``new_password``), or
        accept an invitation for the context user. None when the token is unknown, used,
        superseded or expired; concurrent uses of one token succeed at most once."""
        new_hash = None
        if kind == "password_reset":
            if new_password is None:
                raise ValidationError("a password reset needs new_password")
            new_hash = await self._db.dl.passwords.hash_async(new_password)
        if len(token) > 200:
            return None
        used = await self._db.fetch_one(CONSUME, kind=kind, token_hash=_sha256(token),
                                        new_hash=new_hash)
        if used is not None and used.user_id is not None:
            tags = [lookups.user_tag(used.user_id)]
            if used.org_id is not None:
                tags.append(lookups.member_tag(used.org_id, used.user_id))
            await lookups.invalidate(self._db, *tags)
        return used

    # -- two-factor authentication --------------------------------------------------------------
    async def enable_2fa(self, *, account: str, issuer: str = "datalayer") -> TwoFactorSetup:
        """Start 2FA for the context user: a new secret (stored encrypted) and 10 recovery
        codes (stored hashed). 2FA is on once ``verify_2fa`` accepts a first code."""
        ctx = self._db.context
        if ctx is None or ctx.user_id is None:
            raise ValidationError("enable_2fa() needs a Context with a user_id")
        secret = totp.new_secret()
        blob = self._db.dl.keyring.encrypt(secret, org_id=None, table="users",
                                           row_id=ctx.user_id, column="totp_secret")
        codes = [secrets.token_hex(5) for _ in range(RECOVERY_CODES)]
        stored = await self._db.scalar("auth.totp_store", secret=blob,
                                       recovery_codes=[_sha256(c).hex() for c in codes])
        if not stored:
            raise PermissionDenied("enable_2fa needs a writable context for a live account")
        await self._own_account_changed()
        return TwoFactorSetup(totp.provisioning_uri(secret, account, issuer), codes)

    async def verify_2fa(self, user_id: uuid.UUID, code: str) -> bool:
        """Check a TOTP code (±1 step); each step is accepted once, even under concurrent
        requests (the database compares and sets the last used step)."""
        state = await self._db.fetch_one(TOTP_STATE, user_id=user_id)
        if state is None or state.secret is None:
            return False
        secret = self._db.dl.keyring.decrypt(state.secret, org_id=None, table="users",
                                             row_id=user_id, column="totp_secret")
        step = totp.verify(secret, code, last_used_step=state.last_step)
        if step is None:
            return False
        if not await self._db.scalar("auth.totp_accept", user_id=user_id, step=step):
            return False
        await lookups.invalidate(self._db, lookups.user_tag(user_id))  # 2FA may be on now
        return True

    async def use_recovery_code(self, user_id: uuid.UUID, code: str) -> bool:
        """Spend one recovery code (each works once)."""
        return bool(await self._db.scalar("auth.recovery_code_use", user_id=user_id,
                                          code_hash=_sha256(code.strip().lower()).hex()))

    async def _own_account_changed(self) -> None:
        ctx = self._db.context
        if ctx is not None and ctx.user_id is not None:
            await lookups.invalidate(self._db, lookups.user_tag(ctx.user_id))
