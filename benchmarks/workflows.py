"""Workflow scenarios: a list page and a search page at 100,000 workflows in 100 organizations.

* ``workflows.list``: ``db.workflows.list(limit=50)``, the first page, most recently updated
  first (an index scan of workflows_list_idx in order, the visibility policy as a filter).
* ``workflows.search``: ``db.workflows.search(word, limit=20)``, ranked full-text search of
  one organization (its rows through an org_id index, ``@@`` as a filter: under RLS the GIN
  index cannot serve it, ``@@`` is not leakproof); the word cycles through the seed's
  vocabulary, each matching about 1 row in 12.

Each runs in a tenant-scoped read-only session (a member of a different organization each
operation) against raw asyncpg running the same statement with the organization bound as
a parameter where the query calls ``app.org_id()`` (the raw side runs as the login role, so
without RLS). Data: ``datalayer.seed``'s organizations and users (100 and 5,000) and
100,000 workflows interleaved round robin over the organizations (as tenants' rows are
over time, so each organization's rows are spread over the whole table), loaded through
COPY (the versioning trigger writes version 1 of each), then ANALYZE. The issue's target
is p99 under 5 ms for both (``p99_target_ms``); ``ratio`` is reported as everywhere.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from datalayer import Context
from datalayer.seed import (
    BATCH_SIZE,
    Progress,
    SeedPlan,
    seed_orgs,
    seed_users,
    user_id,
    workflow_record,
)

from .harness import BenchContext, Scenario, bind_context

__all__ = ["SCENARIOS"]

WORKFLOWS = 100_000
WORDS = ("invoices", "tickets", "leads", "emails", "contracts", "orders", "documents",
         "alerts", "reviews", "payments", "reports", "messages")
LIST_PAGE, SEARCH_PAGE = 50, 20
_FIRST_RANK = float("inf")
_LAST = (datetime(9999, 12, 31, tzinfo=UTC), uuid.UUID(int=2**128 - 1))


@dataclass(frozen=True, slots=True)
class WorkflowsState:
    orgs: tuple[uuid.UUID, ...]
    ctxs: tuple[Context, ...]
    sql_list: str  # the registry SQL with app.org_id() bound as the last parameter
    sql_search: str


class _Quiet(Progress):
    """No progress output from the benchmark's seeding."""

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


def _raw_sql(bctx: BenchContext, name: str) -> str:
    q = bctx.dl.registry[name]
    return bind_context(q.sql, len(q.params), user=False)


async def _setup(bctx: BenchContext) -> WorkflowsState:
    cached: WorkflowsState | None = bctx.cache.get("workflows")
    if cached is not None:
        return cached
    plan = SeedPlan("bench", 1, uuid.uuid4().hex[:8])  # 100 organizations, 5,000 users
    quiet = _Quiet()
    async with bctx.dl.system() as db:
        await seed_orgs(db, plan, quiet)
        await seed_users(db, plan, quiet)
    rng = plan.rng("workflows")
    now = datetime.now(UTC)
    for start in range(0, WORKFLOWS, BATCH_SIZE):
        records = [workflow_record(plan, rng, i, now)
                   for i in range(start, min(start + BATCH_SIZE, WORKFLOWS))]
        async with bctx.dl.system() as db:
            await db.copy("workflows.copy_rows", records)
    async with bctx.dl.system() as db:
        await db.connection.execute("ANALYZE workflows; ANALYZE workflow_versions; "
                                    "ANALYZE workflow_shares; ANALYZE team_members")
    orgs = plan.org_ids
    # A member of each organization (users are dealt round robin; the first is the owner).
    ctxs = tuple(Context(org, user_id=user_id(plan, k + len(orgs)), role="member")
                 for k, org in enumerate(orgs))
    state = WorkflowsState(orgs, ctxs, _raw_sql(bctx, "workflows.list"),
                           _raw_sql(bctx, "workflows.search"))
    bctx.cache["workflows"] = state
    return state


async def _list(b: BenchContext, s: WorkflowsState, i: int) -> None:
    async with b.dl.session(s.ctxs[i % len(s.ctxs)], readonly=True) as db:
        page = await db.workflows.list(limit=LIST_PAGE)
    if len(page.items) != LIST_PAGE:
        raise RuntimeError("workflows.list returned a short page")


async def _list_raw(b: BenchContext, s: WorkflowsState, i: int) -> None:
    params: dict[str, Any] = {"before_updated_at": _LAST[0], "before_id": _LAST[1],
                              "status": None, "owner_id": None, "team_id": None,
                              "is_template": None, "tags_any": None, "tags_all": None,
                              "limit": LIST_PAGE}
    order = b.dl.registry["workflows.list"].params
    async with b.pool.acquire() as conn:
        await conn.fetch(s.sql_list, *(params[p] for p in order), s.orgs[i % len(s.orgs)])


async def _search(b: BenchContext, s: WorkflowsState, i: int) -> None:
    async with b.dl.session(s.ctxs[i % len(s.ctxs)], readonly=True) as db:
        hits = await db.workflows.search(WORDS[i % len(WORDS)], limit=SEARCH_PAGE)
    if not hits.items:
        raise RuntimeError("workflows.search found nothing")


async def _search_raw(b: BenchContext, s: WorkflowsState, i: int) -> None:
    params: dict[str, Any] = {"query": WORDS[i % len(WORDS)], "status": None,
                              "after_rank": _FIRST_RANK, "after_id": uuid.UUID(int=0),
                              "limit": SEARCH_PAGE}
    order = b.dl.registry["workflows.search"].params
    async with b.pool.acquire() as conn:
        await conn.fetch(s.sql_search, *(params[p] for p in order), s.orgs[i % len(s.orgs)])


async def _p99_target(b: BenchContext, s: WorkflowsState) -> dict[str, Any]:
    return {"p99_target_ms": 5.0, "workflows": WORKFLOWS, "organizations": len(s.orgs)}


SCENARIOS: list[Scenario] = [
    Scenario("workflows.list", _setup, _list, _list_raw, extra=_p99_target,
             description="tenant session, first list page of 50 (keyset index scan)"),
    Scenario("workflows.search", _setup, _search, _search_raw, extra=_p99_target,
             description="tenant session, ranked full-text search page of 20"),
]
