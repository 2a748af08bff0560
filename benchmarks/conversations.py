"""DigiTwin conversation scenarios, on 10,000 sessions and 1,000,000 turns.

The data set (built once per run, server-side with the seed queries, shared with
``knowledge``'s tenant): one organization, ``USERS`` (100) members on the enterprise tier,
each with ``SESSIONS`` (100) ended sessions of ``TURNS`` (100) turns. Every operation runs in
the tenant session of one of the users (``i % USERS``), so the context changes between
operations as it does in a service.

* ``conversations.session_with_turns``: a random session of the user with its last 50 turns
  (``db.conversations.with_turns``: one statement, the turns as one array). Target p99 < 2 ms.
* ``conversations.append_turn``: one turn appended to the user's active session; the
  statement trigger updates the session's metrics and the monthly turn meter in the same
  round trip. Target p99 < 2 ms.

The seeded tables are vacuumed and analyzed before measuring (the steady state).

Baselines run the same SQL on raw asyncpg as the login role, with the context's
organization and user bound as parameters in place of ``app.org_id()``/``app.user_id()``.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from datalayer import Context

from .core import owned_org
from .harness import BenchContext, Scenario, bind_context

__all__ = ["SCENARIOS", "TwinWorld", "twin_world"]

USERS = 100
SESSIONS = 100
TURNS = 100
LAST = 50
BATCH_USERS = 10


@dataclass(frozen=True, slots=True)
class TwinWorld:
    org_id: uuid.UUID
    users: tuple[uuid.UUID, ...]
    ctxs: tuple[Context, ...]
    sessions: tuple[tuple[uuid.UUID, ...], ...]  # per user: its ended sessions
    open_sessions: tuple[uuid.UUID, ...]  # per user: one active session (appends)


async def twin_world(bctx: BenchContext) -> TwinWorld:
    """The shared conversation data set (built once per run)."""
    cached: TwinWorld | None = bctx.cache.get("digitwin")
    if cached is not None:
        return cached
    dl, run = bctx.dl, uuid.uuid4().hex[:8]
    org = (await owned_org(bctx, "twin")).org_id
    users = tuple(uuid.uuid4() for _ in range(USERS))
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    async with dl.system() as db:
        await db.copy("users.copy_rows", [(u, f"t{i}-{run}@twin.bench.test", f"Twin {i}",
                                           "enterprise", now) for i, u in enumerate(users)])
        await db.copy("memberships.copy_rows", [(org, u, "member", now) for u in users])
        await db.many("partitions.ensure", months_ahead=1, months_back=1)
    for start in range(0, USERS, BATCH_USERS):
        part = list(users[start:start + BATCH_USERS])
        pair = {"org_ids": [org] * len(part), "user_ids": part}
        async with dl.system() as db:
            await db.scalar("conversations.seed_sessions", per_user=SESSIONS, days=20, **pair)
            await db.scalar("conversations.seed_turns", per_session=TURNS, **pair)
            await db.execrows("conversations.seed_close", **pair)
    async with dl.system() as db:
        await db.scalar("conversations.seed_sessions", per_user=1, days=0,
                        org_ids=[org] * USERS, user_ids=list(users))
        conn = db.connection
        rows = await conn.fetch("SELECT user_id, id, status FROM conversation_sessions "
                                "WHERE org_id = $1 ORDER BY user_id, started_at", org)
    # VACUUM ANALYZE (the steady state autovacuum keeps) as the tables' owner (datalayer_maint
    # may not): without it the first reads of the fresh turns set hint bits (page writes) and
    # the measured tail is the seeding's aftermath, not the statements'.
    async with bctx.pool.acquire() as raw:
        for table in ("users", "memberships", "twin_usage", "conversation_sessions",
                      "conversation_turns"):
            await raw.execute(f"VACUUM ANALYZE {table}")
    by_user: dict[uuid.UUID, list[uuid.UUID]] = {u: [] for u in users}
    open_: dict[uuid.UUID, uuid.UUID] = {}
    for r in rows:
        if r["status"] == "active":
            open_[r["user_id"]] = r["id"]
        else:
            by_user[r["user_id"]].append(r["id"])
    world = TwinWorld(org, users, tuple(Context(org, user_id=u, role="member") for u in users),
                      tuple(tuple(by_user[u]) for u in users), tuple(open_[u] for u in users))
    print(f"digitwin data set: {sum(len(s) for s in world.sessions)} sessions, "
          f"{USERS * SESSIONS * TURNS} turns in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    bctx.cache["digitwin"] = world
    return world


# -- session with its last turns ---------------------------------------------------------------

@dataclass
class ReadState:
    world: TwinWorld
    sql: str
    params: tuple[str, ...]
    rng: random.Random


async def _read_setup(bctx: BenchContext) -> ReadState:
    q = bctx.dl.registry["conversations.with_turns"]
    return ReadState(await twin_world(bctx), bind_context(q.sql, len(q.params)), q.params,
                     random.Random(7))


async def _read(b: BenchContext, s: ReadState, i: int) -> None:
    k = i % USERS
    sid = s.rng.choice(s.world.sessions[k])
    async with b.dl.session(s.world.ctxs[k], readonly=True) as db:
        got = await db.conversations.with_turns(sid, turns=LAST)
    if got is None or len(got.turns) != LAST:
        raise RuntimeError("conversations.with_turns did not return 50 turns")


async def _read_raw(b: BenchContext, s: ReadState, i: int) -> None:
    k = i % USERS
    args: dict[str, Any] = {"id": s.rng.choice(s.world.sessions[k]), "turns": LAST}
    async with b.pool.acquire() as conn:
        await conn.fetchrow(s.sql, *(args[p] for p in s.params), s.world.org_id,
                            s.world.users[k])


async def _p99_2ms(b: BenchContext, s: Any) -> dict[str, Any]:
    return {"p99_target_ms": 2.0}


# -- append a turn -------------------------------------------------------------------------------

@dataclass
class AppendState:
    world: TwinWorld
    sql: str
    params: tuple[str, ...]


async def _append_setup(bctx: BenchContext) -> AppendState:
    q = bctx.dl.registry["conversations.append_turn"]
    return AppendState(await twin_world(bctx), bind_context(q.sql, len(q.params)), q.params)


_INPUT = "What did we decide about the launch date and the pricing page?"
_RESPONSE = ("We moved the launch to the second week of March and agreed to keep the "
             "pricing page as it is until the survey results are in.")


async def _append(b: BenchContext, s: AppendState, i: int) -> None:
    k = i % USERS
    async with b.dl.session(s.world.ctxs[k]) as db:
        await db.conversations.append_turn(
            s.world.open_sessions[k], input_text=_INPUT, response_text=_RESPONSE, asr_ms=120,
            retrieval_ms=35, llm_ms=640, tts_ms=180, tokens_in=42, tokens_out=77,
            source_chunk_ids=[1, 2, 3])


async def _append_raw(b: BenchContext, s: AppendState, i: int) -> None:
    k = i % USERS
    args: dict[str, Any] = {
        "session_id": s.world.open_sessions[k], "input_text": _INPUT,
        "response_text": _RESPONSE, "asr_ms": 120, "retrieval_ms": 35, "llm_ms": 640,
        "tts_ms": 180, "total_ms": 975, "tokens_in": 42, "tokens_out": 77,
        "source_chunk_ids": [1, 2, 3]}
    async with b.pool.acquire() as conn, conn.transaction():
        await conn.fetchrow(s.sql, *(args[p] for p in s.params), s.world.org_id,
                            s.world.users[k])


SCENARIOS: list[Scenario] = [
    Scenario("conversations.session_with_turns", _read_setup, _read, _read_raw,
             extra=_p99_2ms,
             description=f"a session and its last {LAST} turns (10k sessions, 1M turns)"),
    Scenario("conversations.append_turn", _append_setup, _append, _append_raw,
             extra=_p99_2ms,
             description="append a turn; session metrics and turn meter in the same statement"),
]
