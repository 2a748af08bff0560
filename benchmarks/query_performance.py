"""Query-tracking overhead: the same single-row read with tracking on and off, in one run.

Both sides run ``orgs.get`` through ``DataLayer.executor`` on a held raw connection (no
pool, no context: the smallest operation the layer has, so the overhead shows most).
The candidate's DataLayer tracks (``dl.metrics``); the baseline's is a second DataLayer
built from the same settings with ``query_metrics=False`` (never started: an executor
needs only its registry and metrics). ``ratio`` is candidate p50 / baseline p50: the
tracking overhead, target under 1.03.

The extra fields time the tracking code alone (a clock read and ``record``, on and off),
in nanoseconds per call (best of five runs of 40,000 calls), and give its share of the
read's p50: figures the noise of a shared machine blurs far less than a p50 ratio.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from datalayer import DataLayer
from datalayer.query_performance import QueryMetrics

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


def _per_call_ns(record: Any, n: int = 40_000, reps: int = 5) -> float:
    """Nanoseconds per ``record(name, clock(), 1)``: the best of ``reps`` runs (the least
    disturbed by other processes on a shared machine)."""
    clock = time.perf_counter_ns
    best = float("inf")
    for _ in range(reps):
        t0 = clock()
        for _ in range(n):
            record("orgs.get", clock(), 1)
        best = min(best, (clock() - t0) / n)
    return best


async def _cost(b: BenchContext, s: OverheadState) -> dict[str, Any]:
    tracked = _per_call_ns(QueryMetrics(b.settings).record)
    untracked = _per_call_ns(QueryMetrics(replace(b.settings, query_metrics=False)).record)
    stats = b.dl.metrics.stats("orgs.get")
    p50_ns = stats.percentile_ns(0.5) if stats else 0.0
    return {"tracking_ns_per_call": round(tracked, 1),
            "disabled_ns_per_call": round(untracked, 1),
            "tracked_p50_ms_from_histogram": round(p50_ns / 1e6, 4),
            # what tracking adds to one read, as a share of the read's own p50 (measured
            # on the connection by the histogram, so pool and event-loop queueing of the
            # harness are not in the denominator)
            "tracking_overhead_pct": round((tracked - untracked) / p50_ns * 100, 3)
            if p50_ns else None}


SCENARIOS: list[Scenario] = [
    Scenario("analytics.tracking_overhead", _setup, _tracked, _untracked, extra=_cost,
             target=1.03, hold_connection=True,
             description="executor.one('orgs.get') with query tracking on vs off"),
]
