"""What every repository shares: the session handle and keyset pagination."""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from datalayer.core.errors import ValidationError

if TYPE_CHECKING:
    from datalayer.core.session import Session

__all__ = ["FIRST", "LAST", "MAX_PAGE", "Page", "Repository", "check_choice", "check_ip",
           "check_limit", "page_of"]

T = TypeVar("T")
MAX_PAGE = 1000
# Keyset sentinels: below / above every real (timestamp, uuid) key.
FIRST: tuple[datetime, uuid.UUID] = (datetime(1, 1, 1, tzinfo=UTC), uuid.UUID(int=0))
LAST: tuple[datetime, uuid.UUID] = (datetime(9999, 12, 31, tzinfo=UTC),
                                     uuid.UUID(int=2**128 - 1))


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a keyset-paginated list; pass ``next`` back as the cursor, None at the end."""

    items: list[T]
    next: tuple[Any, ...] | None


def check_limit(limit: int, maximum: int = MAX_PAGE) -> int:
    """``limit`` if it is between 1 and ``maximum`` (searches cap lower than lists)."""
    if not 1 <= limit <= maximum:
        raise ValidationError(f"limit must be between 1 and {maximum}")
    return limit


def check_choice(value: str, allowed: Sequence[str], what: str) -> str:
    """``value`` if it is one of ``allowed``; else ``what must be one of …``."""
    if value not in allowed:
        raise ValidationError(f"{what} must be one of {', '.join(allowed)}")
    return value


def check_ip(value: str | None, what: str) -> str | None:
    """``value`` as a normalized IPv4/IPv6 address, None for None. The error does not repeat
    the value (an address is personal data)."""
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValidationError(f"{what} must be an IPv4 or IPv6 address") from None


def page_of(items: list[T], limit: int, key: Callable[[T], tuple[Any, ...]]) -> Page[T]:
    """A page whose cursor is the key of its last item when the page is full."""
    return Page(items, key(items[-1]) if len(items) == limit else None)


class Repository:
    """Holds the session; methods are one query call each plus argument checks SQL cannot do."""

    __slots__ = ("_db",)

    def __init__(self, db: Session) -> None:
        self._db = db

    def _tenant_org(self, what: str) -> uuid.UUID:
        """The context's organization, for writes that need one (encryption binds each
        ciphertext to it); ``ValidationError`` "<what> in a tenant session" otherwise."""
        ctx = self._db.context
        if ctx is None or ctx.org_id is None:
            raise ValidationError(f"{what} in a tenant session")
        return ctx.org_id
