"""Conversations with the twin: sessions and their turns (``queries/conversations.sql``,
``schema/0022_digitwin.sql``).

Sessions and turns are private to their user within the organization (RLS). Turns are
append-only and partitioned by month; adding turns keeps the session's metrics current (turn
count, average and p95 latency, tokens) in the same statement, through a statement trigger,
and counts them against the tier's monthly turn limit (``LimitExceeded`` past it).
Organization admins read per-member aggregates only (:meth:`Conversations.org_stats`).
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from datalayer.core.errors import NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import FIRST, LAST, Page, Repository, check_choice, check_limit, page_of

__all__ = [
    "CHANNELS",
    "Conversation",
    "ConversationStats",
    "Conversations",
    "MemberStats",
    "SessionWithTurns",
    "Turn",
]

CHANNELS = ("text", "voice", "video")
MAX_TURNS = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class Conversation:
    """A session and its metrics (latencies in milliseconds)."""

    org_id: uuid.UUID
    id: uuid.UUID
    user_id: uuid.UUID
    channel: str
    status: str
    title: str
    voice_model_id: uuid.UUID | None
    face_model_id: uuid.UUID | None
    metadata: Any
    started_at: datetime
    ended_at: datetime | None
    last_turn_at: datetime | None
    turn_count: int
    avg_latency_ms: float | None
    p95_latency_ms: int | None
    latency_max_ms: int | None
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Turn:
    """One exchange: what the user said, what the twin answered, where the time went."""

    org_id: uuid.UUID
    session_id: uuid.UUID
    created_at: datetime
    id: uuid.UUID
    user_id: uuid.UUID
    input_text: str
    response_text: str
    asr_ms: int | None
    retrieval_ms: int | None
    llm_ms: int | None
    tts_ms: int | None
    total_ms: int
    tokens_in: int
    tokens_out: int
    source_chunk_ids: list[int]


@dataclass(frozen=True, slots=True, kw_only=True)
class _WithTurnsRow(Conversation):
    turns: Any  # conversation_turns[]


@dataclass(frozen=True, slots=True)
class SessionWithTurns:
    """A session and its last turns, oldest first."""

    session: Conversation
    turns: list[Turn]


@dataclass(frozen=True, slots=True, kw_only=True)
class ConversationStats:
    sessions: int | None
    turns: int | None
    avg_latency_ms: float | None
    p95_latency_ms: int | None
    tokens_in: int | None
    tokens_out: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberStats:
    """One member's aggregates (no content) for organization admins."""

    user_id: uuid.UUID | None
    models: int | None
    documents: int | None
    sessions: int | None
    turns: int | None
    avg_latency_ms: float | None
    p95_latency_ms: int | None
    tokens_in: int | None
    tokens_out: int | None


START = RowQuery("conversations.start", Conversation)
GET = RowQuery("conversations.get", Conversation)
WITH_TURNS = RowQuery("conversations.with_turns", _WithTurnsRow)
RECENT = RowQuery("conversations.recent", Conversation)
END = RowQuery("conversations.end", Conversation)
APPEND_TURN = RowQuery("conversations.append_turn", Turn)
TURNS = RowQuery("conversations.turns", Turn)
STATS = RowQuery("conversations.stats", ConversationStats)
ORG_STATS = RowQuery("conversations.org_stats", MemberStats)


def _ms(name: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 0):
        raise ValidationError(f"{name} must be a non-negative number of milliseconds")
    return value


class Conversations(Repository):
    """``db.conversations``: the context user's sessions and turns."""

    __slots__ = ()

    async def start(self, *, channel: str = "text", title: str = "",
                    metadata: dict[str, Any] | None = None) -> Conversation:
        """A new active session, remembering the user's active voice and face models."""
        check_choice(channel, CHANNELS, "channel")
        row = await self._db.fetch_one(START, channel=channel, title=title, metadata=metadata)
        if row is None:
            raise NotFound("session not created", query=START.name)
        return row

    async def get(self, session_id: uuid.UUID) -> Conversation | None:
        return await self._db.fetch_one(GET, id=session_id)

    async def with_turns(self, session_id: uuid.UUID, *,
                         turns: int = 50) -> SessionWithTurns | None:
        """The session and its last ``turns`` turns (oldest first): one round trip."""
        if not 1 <= turns <= MAX_TURNS:
            raise ValidationError(f"turns must be between 1 and {MAX_TURNS}")
        # The record as it comes (WITH_TURNS names the query and its columns for the schema
        # test): the session fields build a Conversation directly, no intermediate row.
        rec = await self._db.one(WITH_TURNS.name, id=session_id, turns=turns)
        if rec is None:
            return None
        build = APPEND_TURN.build
        return SessionWithTurns(GET.build(rec), [build(t) for t in rec["turns"]])

    async def recent(self, *, limit: int = 20,
                     before: tuple[Any, ...] | None = None) -> Page[Conversation]:
        """The context user's sessions, newest first; pass ``page.next`` as ``before``."""
        started, sid = before or LAST
        items = await self._db.fetch_many(RECENT, before_started_at=started, before_id=sid,
                                          limit=check_limit(limit))
        return page_of(items, limit, lambda s: (s.started_at, s.id))

    async def end(self, session_id: uuid.UUID, *, status: str = "ended") -> Conversation:
        """End an active session (``ended`` or ``abandoned``); later turns are refused."""
        if status not in ("ended", "abandoned"):
            raise ValidationError("a session ends as 'ended' or 'abandoned'")
        row = await self._db.fetch_one(END, id=session_id, status=status)
        if row is None:
            raise NotFound("active session not found", query=END.name)
        return row

    async def delete(self, session_id: uuid.UUID) -> bool:
        """Remove a session and its turns; True when there was one."""
        return await self._db.execrows("conversations.delete", id=session_id) == 1

    async def append_turn(self, session_id: uuid.UUID, *, input_text: str, response_text: str,
                          total_ms: int | None = None, asr_ms: int | None = None,
                          retrieval_ms: int | None = None, llm_ms: int | None = None,
                          tts_ms: int | None = None, tokens_in: int = 0, tokens_out: int = 0,
                          source_chunk_ids: Sequence[int] = ()) -> Turn:
        """Add a turn and update the session's metrics: one round trip. ``total_ms``
        defaults to the sum of the parts. ``NotFound`` when the session is not yours;
        ``ValidationError`` when it has ended; ``LimitExceeded`` past the monthly turns."""
        parts = [_ms("asr_ms", asr_ms), _ms("retrieval_ms", retrieval_ms),
                 _ms("llm_ms", llm_ms), _ms("tts_ms", tts_ms)]
        if total_ms is None:
            total_ms = sum(p for p in parts if p is not None)
        _ms("total_ms", total_ms)
        row = await self._db.fetch_one(
            APPEND_TURN, session_id=session_id, input_text=input_text,
            response_text=response_text, asr_ms=asr_ms, retrieval_ms=retrieval_ms,
            llm_ms=llm_ms, tts_ms=tts_ms, total_ms=total_ms, tokens_in=tokens_in,
            tokens_out=tokens_out, source_chunk_ids=list(source_chunk_ids))
        if row is None:
            raise NotFound("session not found", query=APPEND_TURN.name)
        return row

    async def turns(self, session_id: uuid.UUID, *, limit: int = 100,
                    after: tuple[Any, ...] | None = None) -> Page[Turn]:
        """A session's turns, oldest first; pass ``page.next`` as ``after``."""
        created, tid = after or FIRST
        items = await self._db.fetch_many(TURNS, session_id=session_id, after_created_at=created,
                                          after_id=tid, limit=check_limit(limit))
        return page_of(items, limit, lambda t: (t.created_at, t.id))

    async def stats(self, from_at: datetime, to_at: datetime) -> ConversationStats:
        """The context user's sessions, turns, latency and tokens over sessions started in
        ``[from_at, to_at)``."""
        row = await self._db.fetch_one(STATS, from_at=from_at, to_at=to_at)
        assert row is not None  # an aggregate always returns a row
        return row

    async def org_stats(self, from_at: datetime,
                        to_at: datetime) -> builtins.list[MemberStats]:
        """Organization owners and admins: per-member aggregates, no content
        (``PermissionDenied`` for other roles)."""
        return await self._db.fetch_many(ORG_STATS, from_at=from_at, to_at=to_at)

