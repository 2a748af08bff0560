"""GDPR scenario: the current consent state of one user (the latest record per purpose).

``USERS`` users of one organization, each with ``RECORDS`` consent records spread over
``PURPOSES`` purposes (one INSERT … SELECT generate_series through ``dl.system()``), then
VACUUM ANALYZE. The candidate reads one user's state in their read-only tenant session (RLS
on: ``DISTINCT ON (purpose)`` over ``consents_state_idx``); the baseline runs the same
statement on raw asyncpg with ``app.org_id()`` / ``app.user_id()`` bound as parameters.
Target: p99 under 2 ms.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from datalayer import Context

from .core import owned_org
from .harness import BenchContext, Scenario, bind_context

__all__ = ["SCENARIOS"]

USERS = 1_000
PURPOSES = 8
RECORDS = 40  # per user: 5 per purpose


@dataclass(frozen=True, slots=True)
class ConsentState:
    org_id: uuid.UUID
    users: list[uuid.UUID]
    sql: str  # gdpr.consent_state with the context helpers as parameters $3, $4


async def _setup(bctx: BenchContext) -> ConsentState:
    cached: ConsentState | None = bctx.cache.get("gdpr")
    if cached is not None:
        return cached
    dl = bctx.dl
    org = (await owned_org(bctx, "gdpr")).org_id
    users = [uuid.uuid4() for _ in range(USERS)]
    async with dl.system() as db:
        await db.connection.execute(
            """INSERT INTO consents (org_id, user_id, purpose, notice_version, granted, source,
                                     recorded_by, at)
               SELECT $1, u, 'purpose-' || (g % $3), 'v' || (g / $3), (g * 7 + n) % 3 <> 0,
                      'web', u, now() - (g || ' minutes')::interval
               FROM unnest($2::uuid[]) WITH ORDINALITY AS x (u, n),
                    generate_series(1, $4) g""", org, users, PURPOSES, RECORDS)
    async with bctx.pool.acquire() as conn:
        await conn.execute("VACUUM ANALYZE consents")
    q = dl.registry["gdpr.consent_state"]
    sql = bind_context(q.sql, len(q.params))
    state = ConsentState(org, users, sql)
    bctx.cache["gdpr"] = state
    return state


async def _state(b: BenchContext, s: ConsentState, i: int) -> None:
    user = s.users[i % USERS]
    async with b.dl.session(Context(s.org_id, user_id=user, role="member"),
                            readonly=True) as db:
        state = await db.gdpr.consents()
    if len(state) != PURPOSES:
        raise RuntimeError(f"gdpr.consent_state: {len(state)} purposes, not {PURPOSES}")


async def _state_raw(b: BenchContext, s: ConsentState, i: int) -> None:
    user = s.users[i % USERS]
    async with b.pool.acquire() as conn:
        rows = await conn.fetch(s.sql, None, None, s.org_id, user)
    if len(rows) != PURPOSES:
        raise RuntimeError(f"raw consent state: {len(rows)} purposes")


async def _extra(b: BenchContext, s: ConsentState) -> dict[str, Any]:
    return {"p99_target_ms": 2.0, "consents": USERS * RECORDS, "purposes": PURPOSES}


SCENARIOS: list[Scenario] = [
    Scenario("gdpr.consent_state", _setup, _state, _state_raw, extra=_extra,
             description="tenant session, a user's current consent per purpose (latest of "
                         f"{RECORDS} records over {PURPOSES} purposes, 40,000 in the "
                         "organization), one DISTINCT ON index walk"),
]
