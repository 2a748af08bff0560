"""Search scenario: ``search.query`` at 100,000 workflows in one organization.

* ``search.query``: ``db.search.query(text, limit=20)`` in a member's read-only tenant
  session; the text cycles through type-ahead queries taken from 50 workflow names: the
  first five letters of the first word, then the first word and three letters of the second
  (the last word is always a prefix). Each word of the seed's vocabulary (400 words, three
  per workflow name) is in about 750 names; a two-word query matches a handful. The search runs
  inside ``app.search`` (SECURITY DEFINER): its GIN index (org_id, search) serves it although
  the session is under RLS. The raw asyncpg side runs the same statement on a connection
  whose organization/user/role settings were set once (as the datalayer session's are).

Data: one organization, its owner and a member, 100,000 workflows inserted server-side
(``INSERT … SELECT generate_series``; the versioning trigger writes version 1 of each),
then ANALYZE. Target (the issue): p99 < 5 ms (``p99_target_ms``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from datalayer import Context

from .core import owned_org
from .harness import BenchContext, Scenario

__all__ = ["SCENARIOS"]

WORKFLOWS = 100_000
VOCABULARY = 400
LIMIT = 20
_SYLLABLES = ("in", "vo", "ice", "sy", "nc", "le", "ad", "ti", "ck", "et", "or", "der",
              "pa", "ym", "ent", "re", "po", "rt", "me", "ss", "ag", "al", "er", "t")


def _word(k: int) -> str:
    """Vocabulary word ``k`` (deterministic, pronounceable-ish, unique)."""
    n = len(_SYLLABLES)
    return _SYLLABLES[k % n] + _SYLLABLES[(k // n) % n] + _SYLLABLES[(k * 7 + 3) % n] + str(k)


WORDS = tuple(_word(k) for k in range(VOCABULARY))


def _queries(names: list[str]) -> tuple[str, ...]:
    """Type-ahead as a user types a workflow's name: a prefix of its first word alone
    (hundreds of matches to rank), then the first word and the start of the second."""
    out = []
    for name in names:
        w1, w2 = name.split()[:2]
        out.append(w1[:5])
        out.append(f"{w1} {w2[:3]}")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SearchState:
    org_id: uuid.UUID
    ctx: Context
    sql: str
    params: tuple[str, ...]
    queries: tuple[str, ...]


async def _setup(bctx: BenchContext) -> SearchState:
    dl = bctx.dl
    owner = await owned_org(bctx, "search")
    org, owner_id, member_id = owner.org_id, owner.user_id, uuid.uuid4()
    async with dl.system() as db:
        await db.connection.execute(
            "INSERT INTO users (id, email) VALUES ($1, $2)", member_id,
            f"member-{org.hex[:12]}@bench.test")
        await db.connection.execute(
            "INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, 'member')",
            org, member_id)
        # Names: three vocabulary words; 15% private to the owner (the member cannot see
        # them: the search filters them out like the RLS policy would).
        await db.connection.execute(
            """
            INSERT INTO workflows (org_id, name, description, owner_id, visibility, tags)
            SELECT $1, w[1 + (g * 7) % $4] || ' ' || w[1 + (g * 31 + 11) % $4] || ' '
                       || w[1 + (g * 101 + 29) % $4],
                   'moves ' || w[1 + (g * 53) % $4] || ' records into '
                       || w[1 + (g * 89 + 3) % $4],
                   $2, CASE WHEN g % 100 < 15 THEN 'private' ELSE 'organization' END,
                   ARRAY['t' || (g % 50)]
            FROM generate_series(1, $3) g, (SELECT $5::text[] AS w) v
            """, org, owner_id, WORKFLOWS, VOCABULARY, list(WORDS))
    # VACUUM ANALYZE (the steady state autovacuum keeps) as the tables' owner, the login
    # role: dl.system()'s maintenance role owns neither, and PostgreSQL skips them with a
    # warning.
    async with bctx.pool.acquire() as conn:
        await conn.execute("VACUUM ANALYZE workflows")
        await conn.execute("ANALYZE workflow_shares; ANALYZE memberships")
    ctx = Context(org, user_id=member_id, role="member")
    # The raw side's connections carry the same settings (session-level, set once).
    conns = [await bctx.pool.acquire() for _ in range(bctx.pool.get_max_size())]
    try:
        for conn in conns:
            await conn.execute(
                "SELECT set_config('app.org_id', $1, false), set_config('app.user_id', $2, "
                "false), set_config('app.role', 'member', false), "
                "set_config('app.read_only', 'true', false)", str(org), str(member_id))
    finally:
        for conn in conns:
            await bctx.pool.release(conn)
    async with bctx.pool.acquire() as conn:
        names = [r["name"] for r in await conn.fetch(
            "SELECT name FROM workflows WHERE org_id = $1 AND visibility = 'organization' "
            "ORDER BY id LIMIT 50", org)]
    q = dl.registry["search.query"]
    state = SearchState(org, ctx, q.sql, q.params, _queries(names))
    async with dl.session(ctx, readonly=True) as db:
        for text in state.queries:
            if not await db.search.query(text):
                raise RuntimeError(f"search.query found nothing for {text!r}")
    return state


async def _query(b: BenchContext, s: SearchState, i: int) -> None:
    async with b.dl.session(s.ctx, readonly=True) as db:
        await db.search.query(s.queries[i % len(s.queries)], limit=LIMIT)


async def _query_raw(b: BenchContext, s: SearchState, i: int) -> None:
    args: dict[str, Any] = {"text": s.queries[i % len(s.queries)], "limit": LIMIT,
                            "kinds": ["workflow", "template", "execution", "notification"],
                            "fuzzy": b.dl.search_fuzzy}
    async with b.pool.acquire() as conn:
        await conn.fetch(s.sql, *(args[p] for p in s.params))


async def _extra(b: BenchContext, s: SearchState) -> dict[str, Any]:
    return {"p99_target_ms": 5.0, "workflows": WORKFLOWS, "organizations": 1,
            "queries": len(s.queries)}


SCENARIOS: list[Scenario] = [
    Scenario("search.query", _setup, _query, _query_raw, extra=_extra,
             description="tenant session, type-ahead search, 100,000 workflows in one org"),
]
