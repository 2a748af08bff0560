"""What every repository shares: the session handle and keyset pagination."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from datalayer.core.errors import ValidationError

if TYPE_CHECKING:
    from datalayer.core.session import Session

__all__ = ["FIRST", "LAST", "MAX_PAGE", "Page", "Repository", "check_limit", "page_of"]

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


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationError(f"limit must be between 1 and {MAX_PAGE}")
    return limit


def page_of(items: list[T], limit: int, key: Callable[[T], tuple[Any, ...]]) -> Page[T]:
    """A page whose cursor is the key of its last item when the page is full."""
    return Page(items, key(items[-1]) if len(items) == limit else None)


class Repository:
    """Holds the session; methods are one query call each plus argument checks SQL cannot do."""

    __slots__ = ("_db",)

    def __init__(self, db: Session) -> None:
        self._db = db
