"""In-process query metrics: per registry query, executions, errors by SQLSTATE, rows and a
latency histogram; slow queries logged and (sampled) persisted; optional exports.

One :class:`QueryMetrics` hangs off each ``DataLayer`` (``dl.metrics``). Every call that
runs a registry query (``Session.one``/``many``/…/``fetch_*``, the PostgreSQL cache and
rate-limit backends, web sessions) reports to it with :meth:`QueryMetrics.record` or
:meth:`QueryMetrics.failed`. The hot path is a clock read, a dict lookup and a few integer
updates: no lock (one event loop, no awaits inside), no allocation.

Latency buckets are fixed and log-scale: four per power of two of nanoseconds (each about
19 % wide) from 1.024 us to 137 s, plus an underflow and an overflow bucket. Percentiles
are read from the buckets (interpolated inside one, capped at the observed maximum), so
they are within a bucket's width of the truth at any volume, for constant memory.

Slow queries (at or above ``Settings.slow_query_ms``) are logged with the query name and
the duration, never parameter values. A ``Settings.query_sample_rate`` share of them is
queued in a bounded buffer and written to ``query_performance`` in batches by a background
task (started and stopped with the DataLayer), off the request path; when the buffer is
full new samples are dropped and counted (``dropped``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import random
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer
    from datalayer.settings import Settings

__all__ = ["BUCKET_UPPER_NS", "QueryFigures", "QueryMetrics", "QueryStats", "bucket_index"]

log = logging.getLogger("datalayer.query_performance")

_now = time.perf_counter_ns
_MIN_BL = 10  # bucket 0: below 2**10 ns
_MAX_BL = 37  # the last regular octave ends at 2**37 ns (137 s)
N_BUCKETS = (_MAX_BL - _MIN_BL) * 4 + 2


def _upper_bounds() -> tuple[float, ...]:
    out: list[float] = [float(1 << _MIN_BL)]
    for bl in range(_MIN_BL + 1, _MAX_BL + 1):
        low, step = 1 << (bl - 1), 1 << (bl - 3)
        out.extend(float(low + (k + 1) * step) for k in range(4))
    out.append(float("inf"))
    return tuple(out)


BUCKET_UPPER_NS: tuple[float, ...] = _upper_bounds()
# Persisted sample queue: flushed when it holds this many, or every FLUSH_INTERVAL_S.
FLUSH_BATCH = 200
FLUSH_INTERVAL_S = 5.0
# Samples of these namespaces are never persisted: writing them would sample itself.
_NOT_PERSISTED = ("query_performance.",)


def bucket_index(ns: int) -> int:
    """The histogram bucket of a duration in nanoseconds (what ``record`` computes inline)."""
    bl = ns.bit_length()
    if bl <= _MIN_BL:
        return 0
    if bl > _MAX_BL:
        return N_BUCKETS - 1
    return ((bl - _MIN_BL) << 2) - 3 + ((ns >> (bl - 3)) & 3)


class QueryStats:
    """Running figures of one query. Mutated in place by :class:`QueryMetrics`."""

    __slots__ = ("buckets", "count", "errors", "max_ns", "name", "rows", "total_ns")

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0  # executions, failed ones included
        self.rows = 0
        self.total_ns = 0
        self.max_ns = 0
        self.errors: dict[str, int] = {}  # SQLSTATE (or exception class) -> count
        self.buckets = [0] * N_BUCKETS

    def percentile_ns(self, q: float) -> float:
        """The ``q`` quantile (0..1) estimated from the buckets; 0 without executions."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            if not n:
                continue
            if seen + n >= rank:
                low = 0.0 if i == 0 else BUCKET_UPPER_NS[i - 1]
                high = min(BUCKET_UPPER_NS[i], float(self.max_ns))
                frac = (rank - seen) / n
                return min(max(low + (high - low) * frac, low), float(self.max_ns))
            seen += n
        return float(self.max_ns)


@dataclass(frozen=True, slots=True)
class QueryFigures:
    """A snapshot of one query's figures, in milliseconds."""

    name: str
    calls: int
    errors: dict[str, int]
    rows: int
    total_ms: float
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__slots__}


def _noop(*_args: object) -> None:
    """Tracking switched off."""


class QueryMetrics:
    """Per-query figures of one DataLayer, the slow-query sampler and the exports.

    ``enabled`` (``Settings.query_metrics``) may be switched at run time; switched off,
    :meth:`record` and :meth:`failed` are no-ops (the clock is still read by callers).
    """

    __slots__ = ("_by_name", "_dl", "_epoch_offset_ns", "_flusher", "_random", "_sample",
                 "_tracer", "_wake", "buffer", "buffer_max", "dropped", "failed",
                 "flush_errors", "instance", "persisted", "record", "slow", "slow_ns")

    def __init__(self, settings: Settings) -> None:
        self._by_name: dict[str, QueryStats] = {}
        self.slow_ns = int(settings.slow_query_ms * 1_000_000) if settings.slow_query_ms \
            else 1 << 62  # 0 disables slow-query handling
        self._sample = settings.query_sample_rate
        self._random = random.Random()
        self.buffer: list[tuple[str, float, int, str | None, float]] = []
        self.buffer_max = settings.query_buffer_max
        self.slow = 0  # slow executions seen
        self.dropped = 0  # samples dropped: buffer full or a failed flush
        self.persisted = 0
        self.flush_errors = 0
        self.instance = f"{socket.gethostname()[:100]}:{os.getpid()}"
        self._dl: DataLayer | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._epoch_offset_ns = time.time_ns() - _now()
        self._tracer: Any = _tracer(settings.otel_spans)
        self.record: Any = _noop
        self.failed: Any = _noop
        self.enabled = settings.query_metrics

    @property
    def enabled(self) -> bool:
        return self.record is not _noop

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self.record = self._record if on else _noop
        self.failed = self._failed if on else _noop

    # -- the hot path -----------------------------------------------------------------------
    def _record(self, name: str, start_ns: int, rows: int) -> None:
        """One successful execution of ``name`` that started at ``start_ns``
        (``time.perf_counter_ns()``) and returned or changed ``rows`` rows."""
        ns = _now() - start_ns
        s = self._by_name.get(name)
        if s is None:
            s = self._by_name[name] = QueryStats(name)
        s.count += 1
        s.rows += rows
        s.total_ns += ns
        if ns > s.max_ns:
            s.max_ns = ns
        bl = ns.bit_length()
        s.buckets[0 if bl <= _MIN_BL else N_BUCKETS - 1 if bl > _MAX_BL
                  else ((bl - _MIN_BL) << 2) - 3 + ((ns >> (bl - 3)) & 3)] += 1
        if ns >= self.slow_ns:
            self._slow(name, ns, rows, None)
        if self._tracer is not None:
            self._span(name, start_ns, ns, rows, None)

    def _failed(self, name: str, start_ns: int, exc: BaseException) -> None:
        """One execution of ``name`` that raised ``exc`` (counted under its SQLSTATE)."""
        ns = _now() - start_ns
        code = getattr(exc, "sqlstate", None) or type(exc).__name__
        s = self._by_name.get(name)
        if s is None:
            s = self._by_name[name] = QueryStats(name)
        s.count += 1
        s.total_ns += ns
        s.max_ns = max(s.max_ns, ns)
        s.buckets[bucket_index(ns)] += 1
        s.errors[code] = s.errors.get(code, 0) + 1
        if ns >= self.slow_ns:
            self._slow(name, ns, 0, code)
        if self._tracer is not None:
            self._span(name, start_ns, ns, 0, code)

    def _slow(self, name: str, ns: int, rows: int, error: str | None) -> None:
        self.slow += 1
        ms = ns / 1e6
        log.warning("slow query %s took %.1f ms", name, ms,
                    extra={"query": name, "duration_ms": round(ms, 3), "rows": rows,
                           "sqlstate": error})
        if self._sample <= 0 or (self._sample < 1 and self._random.random() >= self._sample):
            return
        if name.startswith(_NOT_PERSISTED):
            return
        if len(self.buffer) >= self.buffer_max:
            self.dropped += 1
            return
        self.buffer.append((name, ms, rows, error, time.time()))
        if len(self.buffer) >= FLUSH_BATCH and self._wake is not None:
            self._wake.set()

    def _span(self, name: str, start_ns: int, ns: int, rows: int, error: str | None) -> None:
        start = start_ns + self._epoch_offset_ns
        attrs: dict[str, Any] = {"db.system": "postgresql", "db.operation.name": name,
                                 "db.response.returned_rows": rows}
        if error is not None:
            attrs["db.response.status_code"] = error
        span = self._tracer.start_span(name, start_time=start, attributes=attrs)
        if error is not None:
            with contextlib.suppress(Exception):
                trace = importlib.import_module("opentelemetry.trace")
                span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end(end_time=start + ns)

    # -- reading --------------------------------------------------------------------------------
    def stats(self, name: str) -> QueryStats | None:
        return self._by_name.get(name)

    def snapshot(self) -> list[QueryFigures]:
        """Every query executed since start (or :meth:`reset`), by total time, largest first."""
        out = []
        for s in self._by_name.values():
            if not s.count:
                continue
            out.append(QueryFigures(
                s.name, s.count, dict(s.errors), s.rows, s.total_ns / 1e6,
                s.total_ns / s.count / 1e6, s.percentile_ns(0.50) / 1e6,
                s.percentile_ns(0.95) / 1e6, s.percentile_ns(0.99) / 1e6, s.max_ns / 1e6))
        out.sort(key=lambda f: f.total_ms, reverse=True)
        return out

    def reset(self) -> None:
        self._by_name.clear()

    def prometheus_text(self) -> str:
        """The figures in the Prometheus text exposition format (version 0.0.4).

        Histogram buckets are the powers of two of the internal ones (exact, since those
        split each octave), in seconds.
        """
        lines = [
            "# HELP datalayer_query_duration_seconds Registry query execution time.",
            "# TYPE datalayer_query_duration_seconds histogram",
        ]
        errors: list[str] = []
        rows: list[str] = []
        for s in sorted(self._by_name.values(), key=lambda s: s.name):
            if not s.count:
                continue
            q = _label(s.name)
            cumulative = s.buckets[0]
            lines.append(f'datalayer_query_duration_seconds_bucket{{query="{q}",'
                         f'le="{_num(BUCKET_UPPER_NS[0] / 1e9)}"}} {cumulative}')
            for octave in range(_MAX_BL - _MIN_BL):
                first = 1 + octave * 4
                cumulative += sum(s.buckets[first:first + 4])
                lines.append(f'datalayer_query_duration_seconds_bucket{{query="{q}",'
                             f'le="{_num(BUCKET_UPPER_NS[first + 3] / 1e9)}"}} {cumulative}')
            lines.append(f'datalayer_query_duration_seconds_bucket{{query="{q}",le="+Inf"}} '
                         f'{s.count}')
            lines.append(f'datalayer_query_duration_seconds_sum{{query="{q}"}} '
                         f'{_num(s.total_ns / 1e9)}')
            lines.append(f'datalayer_query_duration_seconds_count{{query="{q}"}} {s.count}')
            rows.append(f'datalayer_query_rows_total{{query="{q}"}} {s.rows}')
            for code, n in sorted(s.errors.items()):
                errors.append(f'datalayer_query_errors_total{{query="{q}",'
                              f'sqlstate="{_label(code)}"}} {n}')
        lines += ["# HELP datalayer_query_rows_total Rows returned or affected.",
                  "# TYPE datalayer_query_rows_total counter", *rows,
                  "# HELP datalayer_query_errors_total Failed executions by SQLSTATE.",
                  "# TYPE datalayer_query_errors_total counter", *errors]
        for metric, help_, value in (
            ("datalayer_slow_queries_total", "Executions at or above the slow threshold.",
             self.slow),
            ("datalayer_slow_query_samples_dropped_total",
             "Slow-query samples dropped (buffer full or write failed).", self.dropped),
            ("datalayer_slow_query_samples_persisted_total",
             "Slow-query samples written to query_performance.", self.persisted),
        ):
            lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} counter",
                      f"{metric} {value}"]
        return "\n".join(lines) + "\n"

    # -- persistence --------------------------------------------------------------------------
    def start(self, dl: DataLayer) -> None:
        """Start the background flush task (``DataLayer.start`` calls this)."""
        if self._flusher is not None:
            return
        self._dl = dl
        self._wake = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush_loop(), name="datalayer query samples")

    async def close(self) -> None:
        """Stop the flush task and write what is buffered (``DataLayer.close``)."""
        task, self._flusher = self._flusher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.flush()
        self._wake = None
        self._dl = None

    async def _flush_loop(self) -> None:
        wake = self._wake
        assert wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), FLUSH_INTERVAL_S)
            wake.clear()
            try:
                await self.flush()
            except Exception:  # the task must outlive any one failure
                log.exception("writing query_performance samples failed")

    async def flush(self) -> int:
        """Write the buffered samples in one statement (maintenance role); how many. A
        failed write is logged, its samples dropped and counted."""
        if not self.buffer or self._dl is None:
            return 0
        batch, self.buffer = self.buffer, []
        from datalayer.core.errors import DataLayerError

        try:
            async with self._dl.system() as db:
                await db.exec("query_performance.record", instance=self.instance,
                              **_columns(batch))
        except (DataLayerError, OSError) as exc:
            self.flush_errors += 1
            self.dropped += len(batch)
            log.warning("could not write query_performance samples (%s)", type(exc).__name__,
                        extra={"dropped": len(batch)})
            return 0
        self.persisted += len(batch)
        return len(batch)


def _columns(batch: Iterable[tuple[str, float, int, str | None, float]]) -> dict[str, Any]:
    from datetime import UTC, datetime

    names, ms, rows, errors, at = [], [], [], [], []
    for n, d, r, e, t in batch:
        names.append(n)
        ms.append(d)
        rows.append(r)
        errors.append(e)
        at.append(datetime.fromtimestamp(t, UTC))
    return {"query_names": names, "durations_ms": ms, "rows_": rows, "sqlstates": errors,
            "executed_at": at}


def _tracer(enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        trace = importlib.import_module("opentelemetry.trace")
    except ImportError:
        log.warning("DATALAYER_OTEL_SPANS is on but opentelemetry-api is not installed "
                    "(pip install 'datalayer[otel]'); no spans")
        return None
    return trace.get_tracer("datalayer")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(x: float) -> str:
    return repr(float(x))
