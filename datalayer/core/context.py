"""The tenant context of a session, and the SQL that applies it to a connection.

A :class:`Context` is validated when it is built, and the statement that applies it is
built then too, once: applying a context is one simple-protocol round trip that needs no
formatting at run time. Every value that reaches that text is validated to a fixed
alphabet (UUIDs, a role from a closed set, a request id, a canonical IP address), and
is quoted besides, so no input can change the statement.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from dataclasses import dataclass, field
from typing import Literal

from datalayer.core.errors import ValidationError

__all__ = ["APP_ROLE", "MAINT_ROLE", "ROLES", "Context", "Role", "system_sql"]

Role = Literal["owner", "admin", "member", "viewer", "guest"]
ROLES: tuple[Role, ...] = ("owner", "admin", "member", "viewer", "guest")
APP_ROLE = "datalayer_app"  # NOBYPASSRLS, owns nothing: every request session runs as it
MAINT_ROLE = "datalayer_maint"  # BYPASSRLS: dl.system() only

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/@+=-]{1,128}")
# Every setting a context writes. Applying one context overwrites all of them, so a
# connection's previous context can never survive partially.
SETTINGS = ("app.org_id", "app.user_id", "app.role", "app.read_only", "app.request_id", "app.ip")


def _uuid(name: str, value: object) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        try:
            return uuid.UUID(value)
        except ValueError:
            pass
    raise ValidationError(f"Context.{name} must be a UUID")


def _literal(value: str) -> str:
    # Values are validated to alphabets without quotes or backslashes; doubling quotes
    # keeps this correct even if a validator is loosened later.
    if "\x00" in value or "\\" in value:
        raise ValidationError("context values may not contain NUL or backslash")
    return "'" + value.replace("'", "''") + "'"


def _set_config_sql(values: dict[str, str], *, local: bool) -> str:
    flag = "true" if local else "false"
    return "SELECT " + ", ".join(
        f"set_config({_literal(k)}, {_literal(v)}, {flag})" for k, v in values.items()
    )


@dataclass(frozen=True, slots=True)
class Context:
    """Who is asking: organization, user, role and request metadata. Validated on construction.

    ``org_id=None`` is a context with no tenant: it reads zero tenant rows and cannot write.
    ``read_only=True`` makes any role read-only. ``user_agent`` stays in Python (for audit
    events); the other fields are applied to the connection as ``app.*`` settings.
    """

    org_id: uuid.UUID | None
    user_id: uuid.UUID | None = None
    role: Role = "member"
    read_only: bool = False
    request_id: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    key: tuple[object, ...] = field(init=False, repr=False, compare=False)
    session_sql: str = field(init=False, repr=False, compare=False)
    local_sql: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        org = _uuid("org_id", self.org_id)
        user = _uuid("user_id", self.user_id)
        if self.role not in ROLES:
            raise ValidationError(f"Context.role must be one of {', '.join(ROLES)}")
        if not isinstance(self.read_only, bool):
            raise ValidationError("Context.read_only must be a bool")
        if self.request_id is not None and not _REQUEST_ID.fullmatch(self.request_id):
            raise ValidationError(
                "Context.request_id must be 1-128 characters of letters, digits and ._:/@+=-"
            )
        ip = None
        if self.ip is not None:
            try:
                addr = ipaddress.ip_address(self.ip)
            except ValueError:
                raise ValidationError("Context.ip must be an IPv4 or IPv6 address") from None
            if getattr(addr, "scope_id", None):
                raise ValidationError("Context.ip must not carry an IPv6 scope id")
            ip = str(addr)
        if self.user_agent is not None and len(self.user_agent) > 1024:
            raise ValidationError("Context.user_agent is longer than 1024 characters")
        object.__setattr__(self, "org_id", org)
        object.__setattr__(self, "user_id", user)
        object.__setattr__(self, "ip", ip)
        values = {
            "role": APP_ROLE,
            "app.org_id": str(org) if org else "",
            "app.user_id": str(user) if user else "",
            "app.role": self.role,
            "app.read_only": "on" if self.read_only else "off",
            "app.request_id": self.request_id or "",
            "app.ip": ip or "",
        }
        object.__setattr__(self, "key", tuple(values.values()))
        # Session mode: applied at session level and remembered per connection; statements
        # outside an explicit BEGIN READ WRITE are read-only on such a connection.
        object.__setattr__(
            self,
            "session_sql",
            _set_config_sql({**values, "default_transaction_read_only": "on"}, local=False),
        )
        object.__setattr__(self, "local_sql", _set_config_sql(values, local=True))

    def with_(self, **changes: object) -> Context:
        """A copy with ``changes`` applied (and validated)."""
        fields: dict[str, object] = {
            "org_id": self.org_id, "user_id": self.user_id, "role": self.role,
            "read_only": self.read_only, "request_id": self.request_id, "ip": self.ip,
            "user_agent": self.user_agent,
        }
        fields.update(changes)
        return Context(**fields)  # type: ignore[arg-type]


_SYSTEM_VALUES = {"role": MAINT_ROLE, **{k: "" for k in SETTINGS}}
SYSTEM_KEY: tuple[object, ...] = ("system",)


def system_sql(*, local: bool) -> str:
    """The statement that switches a connection to the maintenance role with no tenant."""
    values = dict(_SYSTEM_VALUES)
    if not local:
        values["default_transaction_read_only"] = "on"
    return _set_config_sql(values, local=local)
