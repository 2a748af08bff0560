"""Query-tracking overhead: the same single-row read with tracking on and off, in one run.

Both sides run ``orgs.get`` through ``DataLayer.executor`` on a held raw connection (no
pool, no context: the smallest operation the layer has, so the overhead shows most).
The candidate's DataLayer tracks (``dl.metrics``); the baseline's is a second DataLayer
built from the same settings with ``query_metrics=False`` (never started: an executor
needs only its registry and metrics). ``ratio`` is candidate p50 / baseline p50: the
tracking overhead, target under 1.03.

The extra fields time the tracking code alone (two clock reads and ``record``), in
nanoseconds per call, averaged over 200,000 calls: a figure noise cannot blur.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from datalayer import DataLayer
from datalayer.metrics import QueryMetrics

from .core import TENANTS, tenants
from .harness import BenchContext, Scenario

__all__ = ["SCENARIOS"]


@dataclass(frozen=True, slots=True)
class OverheadState:
    ids: tuple[uuid.UUID, ...]
    untracked: DataLayer


async def _setup(bctx: BenchContext) -> OverheadState:
    ids = await tenants(bctx, TENANTS)
    untracked = DataLayer(replace(bctx.settings, query_metrics=False))
    assert not untracked.metrics.enabled and bctx.dl.metrics.enabled
    return OverheadState(tuple(ids), untracked)


async def _tracked(b: BenchContext, s: OverheadState, i: int) -> None:
    await b.dl.executor(b.conn).one("orgs.get", id=s.ids[i % TENANTS])


async def _untracked(b: BenchContext, s: OverheadState, i: int) -> None:
    await s.untracked.executor(b.conn).one("orgs.get", id=s.ids[i % TENANTS])


async def _cost(b: BenchContext, s: OverheadState) -> dict[str, Any]:
    m = QueryMetrics(b.settings)
    clock = time.perf_counter_ns
    n = 200_000
    record = m.record
    t0 = clock()
    for _ in range(n):
        record("orgs.get", clock(), 1)
    tracked = (clock() - t0) / n
    off = QueryMetrics(replace(b.settings, query_metrics=False))
    record = off.record
    t0 = clock()
    for _ in range(n):
        record("orgs.get", clock(), 1)
    untracked = (clock() - t0) / n
    stats = b.dl.metrics.stats("orgs.get")
    return {"tracking_ns_per_call": round(tracked, 1),
            "disabled_ns_per_call": round(untracked, 1),
            "tracked_p50_ms_from_histogram": round(stats.percentile_ns(0.5) / 1e6, 4)
            if stats else None}


SCENARIOS: list[Scenario] = [
    Scenario("analytics.tracking_overhead", _setup, _tracked, _untracked, extra=_cost,
             target=1.03, hold_connection=True,
             description="executor.one('orgs.get') with query tracking on vs off"),
]
