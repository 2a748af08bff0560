"""What every repository shares."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datalayer.core.session import Session

__all__ = ["Repository"]


class Repository:
    """Holds the session; methods are one query call each plus argument checks SQL cannot do."""

    __slots__ = ("_db",)

    def __init__(self, db: Session) -> None:
        self._db = db
