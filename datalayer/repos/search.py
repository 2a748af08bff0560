"""Search (``queries/search.sql``, ``schema/0019_search.sql``): one tenant-scoped full-text
search over workflows, templates, execution errors and notifications.

``db.search.query("slack notif")`` matches every word as a prefix (type-ahead), ranks with
``ts_rank_cd`` (weights: names/titles A, descriptions/messages B, tags C), and returns the
best rows with a highlighted snippet (``<b>…</b>``; ``ts_headline`` runs on the returned rows
only). User text is never parsed as tsquery syntax: the database takes its words apart with
``to_tsvector`` and quotes each one.

When nothing matches and pg_trgm is installed (detected once when the DataLayer starts, by
``search.fuzzy_available``; ``DATALAYER_SEARCH_FUZZY=false`` turns it off), workflow and template
names similar to the text come back instead, marked ``fuzzy=True``. Without pg_trgm the
search works the same, minus that fallback.

Tenancy: ``app.search`` is SECURITY DEFINER (so the GIN indexes serve it under RLS) and
filters by the context's organization and each kind's read rule itself; without a tenant
context it returns nothing.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from datalayer.core.errors import ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import Repository, check_limit

if TYPE_CHECKING:
    pass

__all__ = ["KINDS", "MAX_LIMIT", "Hit", "Search"]

# Every searchable kind (one branch each in app.search_documents).
KINDS = ("workflow", "template", "execution", "notification", "audit")
MAX_LIMIT = 100
MAX_TEXT = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class Hit:
    kind: str
    id: uuid.UUID
    title: str
    snippet: str
    rank: float
    fuzzy: bool  # a trigram (typo-tolerant) match rather than a full-text one
    updated_at: datetime


QUERY = RowQuery("search.query", Hit)


def _kinds(kinds: Iterable[str] | None) -> list[str]:
    if kinds is None:
        return list(KINDS)
    if isinstance(kinds, str):
        kinds = [kinds]
    out = list(dict.fromkeys(kinds))
    unknown = [k for k in out if k not in KINDS]
    if unknown or not out:
        raise ValidationError(f"kinds must be one or more of {', '.join(KINDS)}")
    return out


class Search(Repository):
    """``db.search``: tenant sessions only (nothing comes back without a context)."""

    __slots__ = ()

    async def query(self, text: str, *, kinds: Iterable[str] | None = None,
                    limit: int = 20, fuzzy: bool | None = None) -> builtins.list[Hit]:
        """The best ``limit`` matches of ``text`` among ``kinds`` (default: all), best first.
        ``fuzzy``: allow the trigram fallback (default: when pg_trgm was detected; True
        without pg_trgm is ignored)."""
        if not isinstance(text, str):
            raise ValidationError("search text must be a string")
        check_limit(limit, MAX_LIMIT)
        text = text[:MAX_TEXT]
        if not text.strip():
            return []
        available = self._db.dl.search_fuzzy
        use_fuzzy = available if fuzzy is None else (fuzzy and available)
        return await self._db.fetch_many(QUERY, text=text, kinds=_kinds(kinds), limit=limit,
                                         fuzzy=use_fuzzy)

    async def tsquery(self, text: str) -> str | None:
        """The tsquery a search for ``text`` runs (as text), for debugging and tests."""
        value = await self._db.scalar("search.tsquery", text=str(text)[:MAX_TEXT])
        return None if value is None else str(value)
