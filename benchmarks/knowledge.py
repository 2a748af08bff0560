"""DigiTwin knowledge search over 100,000 chunks of one user.

* ``knowledge.search``: ``db.knowledge.search`` (``app.knowledge_search``: weighted
  ``websearch_to_tsquery`` match through the GIN index, ranked with ``ts_rank_cd``, snippets
  by ``ts_headline`` for the 10 returned rows only) for one or two words of varying
  frequency, in the tenant session of the user. The chunks (1,000 documents of 100 chunks,
  about 50 words each from a Zipf-like vocabulary of 5,000 words) are generated server-side
  for a user of its own organization. Target p99 < 10 ms.

The baseline runs the function's query on raw asyncpg as the login role with the user's
organization and id bound as parameters.
"""

from __future__ import annotations

import random
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from datalayer import Context

from .core import owned_org
from .harness import BenchContext, Scenario

__all__ = ["SCENARIOS"]

DOCUMENTS = 1000
CHUNKS = 100
LIMIT = 10

_SEED = """
WITH docs AS (
  INSERT INTO knowledge_documents (org_id, user_id, title, source, mime_type, size_bytes,
                                   checksum, status, chunk_count, token_count, processed_at)
  SELECT $1::uuid, $2::uuid, 'Notebook ' || g, 'upload', 'text/plain', 400000,
         sha256(convert_to($2::uuid::text || g::text, 'UTF8')), 'ready', $4::int, 60 * $4::int,
         now()
  FROM generate_series(1, $3) AS g
  RETURNING org_id, id, user_id, title
)
INSERT INTO knowledge_chunks (org_id, document_id, user_id, seq, heading, content, token_count)
SELECT d.org_id, d.id, d.user_id, s, d.title,
       (SELECT string_agg('w' || floor(5000 * power(random(), 3))::int, ' ')
        FROM generate_series(1, 45 + s % 10 + (d.id IS NULL)::int)),
       60
FROM docs d CROSS JOIN generate_series(1, $4) AS s
"""

# The function's query with the context bound as parameters ($3 org, $4 user).
_RAW = """
WITH q AS (SELECT websearch_to_tsquery('english'::regconfig, $1) AS q),
gone AS (
  SELECT coalesce(array_agg(d.id), '{}') AS ids FROM knowledge_documents d
  WHERE d.org_id = $3::uuid AND d.user_id = $4::uuid AND d.deleted_at IS NOT NULL
),
hits AS MATERIALIZED (
  SELECT c.org_id, c.id, c.document_id, ts_rank_cd(c.tsv, q.q) AS rank
  FROM knowledge_chunks c, q, gone
  WHERE c.tsv @@ q.q AND c.org_id::text = $3::uuid::text AND c.user_id::text = $4::uuid::text
    AND c.document_id <> ALL (gone.ids)
), top AS (
  SELECT h.org_id, h.id, h.document_id, h.rank FROM hits h ORDER BY h.rank DESC, h.id LIMIT $2
)
SELECT c.id, c.document_id, c.seq, c.heading, c.content, c.token_count, top.rank,
       ts_headline('english'::regconfig, c.content, q.q,
                   'MaxFragments=2, MinWords=5, MaxWords=18, StartSel=[, StopSel=]'),
       d.title, d.source, d.mime_type
FROM top
JOIN knowledge_chunks c ON c.org_id = top.org_id AND c.id = top.id
JOIN knowledge_documents d ON d.org_id = top.org_id AND d.id = top.document_id, q
ORDER BY top.rank DESC, top.id
"""


@dataclass
class SearchState:
    org_id: uuid.UUID
    user_id: uuid.UUID
    ctx: Context
    queries: tuple[str, ...]


async def _setup(bctx: BenchContext) -> SearchState:
    made = await owned_org(bctx, "knowledge")
    org, user, ctx = made.org_id, made.user_id, made.ctx
    t0 = time.perf_counter()
    async with bctx.dl.system() as db:
        await db.connection.execute(_SEED, org, user, DOCUMENTS, CHUNKS)
        n = await db.connection.fetchval(
            "SELECT count(*) FROM knowledge_chunks WHERE org_id = $1 AND user_id = $2",
            org, user)
    async with bctx.pool.acquire() as raw:  # the tables' owner: datalayer_maint may not
        await raw.execute("ANALYZE knowledge_chunks; ANALYZE knowledge_documents")
    print(f"knowledge data set: {n} chunks in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    rng = random.Random(11)
    # Words ranked 300-4999 (from ~1.5% of chunks down to the rarest); pairs are ANDed.
    queries = tuple(f"w{rng.randrange(300, 5000)}" if k % 2 else
                    f"w{rng.randrange(300, 2000)} w{rng.randrange(300, 2000)}"
                    for k in range(200))
    return SearchState(org, user, ctx, queries)


async def _search(b: BenchContext, s: SearchState, i: int) -> None:
    async with b.dl.session(s.ctx, readonly=True) as db:
        await db.knowledge.search(s.queries[i % len(s.queries)], limit=LIMIT)


async def _search_raw(b: BenchContext, s: SearchState, i: int) -> None:
    async with b.pool.acquire() as conn:
        await conn.fetch(_RAW, s.queries[i % len(s.queries)], LIMIT, s.org_id, s.user_id)


async def _extra(b: BenchContext, s: SearchState) -> dict[str, Any]:
    async with b.dl.session(s.ctx, readonly=True) as db:
        hits = [len(await db.knowledge.search(q, limit=LIMIT)) for q in s.queries[:20]]
    return {"p99_target_ms": 10.0, "chunks": DOCUMENTS * CHUNKS,
            "avg_hits": sum(hits) / len(hits)}


SCENARIOS: list[Scenario] = [
    Scenario("knowledge.search", _setup, _search, _search_raw, extra=_extra,
             description="full-text search of 100k chunks of one user, top 10 with snippets"),
]
