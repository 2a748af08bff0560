"""``Limiter``: limits per operation, keys, the backend call, fail modes, violations.

A check builds the key (algorithm, operation, and the organization, user and IP the limit
is keyed by), asks the backend once, and records a rejection in memory for the next
violations flush. When the backend cannot answer within its timeout, the limit's fail
mode decides (``Decision.degraded``), the failure is logged at most once per
``log_interval_s``, and for ``breaker_s`` afterwards checks are decided the same way
without waiting on the backend again; then one check probes it while the others keep
being decided by their fail mode until the probe returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from datalayer.core.errors import ConfigError, RateLimited, Timeout, Unavailable, ValidationError
from datalayer.ratelimit.backend import Backend
from datalayer.ratelimit.limits import DEFAULT_RATE_LIMITS, Decision, Limit, Outcome, parse_limits
from datalayer.ratelimit.violations import (
    PostgresViolationStore,
    Violation,
    ViolationHook,
    Violations,
)

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = ["Limiter", "build_key"]

log = logging.getLogger("datalayer.ratelimit")

_OPERATION = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_IDENT = re.compile(r"[A-Za-z0-9_.:@+=-]{1,128}")
_TAG = {"token_bucket": "tb", "gcra": "gcra"}
IdLike = uuid.UUID | str


def _ident(name: str, value: IdLike) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str) and _IDENT.fullmatch(value):
        return value
    raise ValidationError(f"rate-limit {name} must be a UUID or 1-128 characters of letters, "
                          "digits and ._:@+=-")


def _ip(value: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Canonical text of an address; IPv6 by its /64 (one subscriber's usual allocation, so
    rotating addresses inside it does not reset the limit)."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValidationError("rate-limit ip must be an IPv4 or IPv6 address") from None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return f"{ipaddress.IPv6Address(int(addr) >> 64 << 64)}/64"
    return str(addr)


def build_key(operation: str, limit: Limit, *, org_id: IdLike | None = None,
              user_id: IdLike | None = None,
              ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None = None) -> str:
    """``<algorithm>:<operation>|o=<org>|u=<user>|i=<ip>`` with the parts the limit is keyed
    by: its ``by`` dimensions (each then required), or else those given."""
    if not _OPERATION.fullmatch(operation):
        raise ValidationError("rate-limit operation must be 1-64 letters, digits or ._:-")
    by = limit.by
    parts = [_TAG[limit.algorithm], ":", operation]
    for dim, mark, value in (("org", "|o=", org_id), ("user", "|u=", user_id), ("ip", "|i=", ip)):
        if by is not None and dim not in by:
            continue
        if value is None:
            if by is not None:
                raise ValidationError(f"the rate limit of {operation!r} is keyed by "
                                      f"{', '.join(by)}: pass {dim}")
            continue
        parts.append(mark)
        parts.append(_ip(value) if dim == "ip" else _ident(f"{dim}_id", value))  # type: ignore[arg-type]
    return "".join(parts)


class Limiter:
    """Rate limits for one process. The DataLayer starts and closes the one it owns
    (``dl.limiter``); one built by hand needs :meth:`start` only for the periodic violation
    flush and maintenance, and :meth:`close` to release its backend."""

    def __init__(self, backend: Backend, limits: Mapping[str, Limit] | None = None, *,
                 default: Limit | None = None, violations: Violations | None = None,
                 flush_interval_s: float = 1.0, breaker_s: float = 0.5,
                 fail_retry_after_s: float = 1.0, log_interval_s: float = 10.0,
                 maintenance: Callable[[], Awaitable[object]] | None = None,
                 maintenance_interval_s: float = 60.0) -> None:
        """``limits`` per operation; the ``default`` argument, else the entry named
        ``default``, else ``DEFAULT_RATE_LIMITS``, applies to the others.
        ``fail_retry_after_s`` is the retry-after of fail-closed denials.
        ``maintenance`` (e.g. sweeping full buckets) runs every ``maintenance_interval_s``
        once started."""
        table = dict(limits or {})
        fallback = default or table.pop("default", None)
        self._limits = table
        self._default = fallback or parse_limits(DEFAULT_RATE_LIMITS)["default"]
        self.backend = backend
        self.violations = violations or Violations()
        self.flush_interval_s = flush_interval_s
        self._breaker_s = breaker_s
        self._fail_retry_after_s = fail_retry_after_s
        self._log_interval_s = log_interval_s
        self._maintenance = maintenance
        self._maintenance_interval_s = maintenance_interval_s
        self._down_until = 0.0  # monotonic; > 0 while the backend is considered down
        self._probing = False
        self._last_log = 0.0
        self._degraded = 0  # degraded decisions since the last log line
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_datalayer(cls, dl: DataLayer) -> Limiter:
        """The limiter ``dl`` owns: limits, backend, timeout and prefix from its settings;
        violations go to ``rate_limit_violations``."""
        from datalayer.ratelimit.memory import MemoryBackend
        from datalayer.ratelimit.postgres import PostgresBackend, sweep_buckets
        from datalayer.ratelimit.redis import RedisBackend

        s = dl.settings
        timeout = s.ratelimit_timeout_ms / 1000
        backend: Backend
        maintenance = None
        name = s.ratelimit_backend_name
        if name == "redis":
            if not s.redis_url:
                raise ConfigError("DATALAYER_RATELIMIT_BACKEND=redis needs REDIS_URL")
            backend = RedisBackend(s.redis_url, prefix=s.ratelimit_prefix, timeout_s=timeout)
        elif name == "postgres":
            backend = PostgresBackend(dl.service_pool, dl.registry["ratelimit.check"],
                                      timeout_s=timeout, metrics=dl.metrics)

            async def sweep() -> int:
                return await sweep_buckets(dl)

            maintenance = sweep
        else:
            backend = MemoryBackend()
        return cls(backend, parse_limits(s.rate_limits),
                   violations=Violations(store=PostgresViolationStore(dl)),
                   maintenance=maintenance)

    # -- limits -------------------------------------------------------------------------
    def limit_for(self, operation: str) -> Limit:
        """The limit of ``operation`` (or the default)."""
        return self._limits.get(operation, self._default)

    def on_violation(self, hook: ViolationHook, *, threshold: int = 1) -> None:
        """Alerting: call ``hook(violation)`` once per key and window when its rejections
        reach ``threshold`` (summed over processes with the PostgreSQL store), at the
        flush that sees it (within ``flush_interval_s``)."""
        self.violations.on_violation(hook, threshold=threshold)

    # -- checks -------------------------------------------------------------------------
    async def check(self, operation: str, *, user_id: IdLike | None = None,
                    ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
                    org_id: IdLike | None = None, cost: int = 1,
                    limit: Limit | None = None) -> Decision:
        """Spend ``cost`` of the bucket of ``operation`` for this user / IP / organization
        (``limit`` overrides the configured one). One backend round trip; never raises for
        an unreachable backend (the limit's fail mode decides)."""
        lim = limit or self._limits.get(operation, self._default)
        key = build_key(operation, lim, org_id=org_id, user_id=user_id, ip=ip)
        if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= lim.capacity:
            raise ValidationError(f"rate-limit cost must be an integer from 1 to {lim.capacity} "
                                  f"(the capacity of {operation!r})")
        out = await self._ask(key, lim, cost)
        if out is None:
            return self._fail(lim, cost)
        if not out.allowed:
            self.violations.record(operation, key, out.now_us)
        return Decision(out.allowed, out.remaining, out.retry_after_us / 1_000_000,
                        out.reset_after_us / 1_000_000)

    async def enforce(self, operation: str, *, user_id: IdLike | None = None,
                      ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
                      org_id: IdLike | None = None, cost: int = 1,
                      limit: Limit | None = None) -> Decision:
        """:meth:`check`, raising ``RateLimited`` (with ``retry_after``) when denied."""
        d = await self.check(operation, user_id=user_id, ip=ip, org_id=org_id, cost=cost,
                             limit=limit)
        if not d.allowed:
            why = ("rate limiting is unavailable and this limit fails closed"
                   if d.degraded else "rate limit exceeded")
            raise RateLimited(f"{operation}: {why}; retry in {d.retry_after:.3g}s",
                              retry_after=d.retry_after)
        return d

    async def _ask(self, key: str, lim: Limit, cost: int) -> Outcome | None:
        """The backend's outcome, or None when it is (or was just found) unreachable."""
        probe = False
        if self._down_until:
            if self._probing or time.monotonic() < self._down_until:
                return None
            self._probing = probe = True
        try:
            out = await self.backend.check(key, lim, cost)
        except (Unavailable, Timeout) as exc:
            self._down_until = time.monotonic() + self._breaker_s
            self._log_failure(exc)
            return None
        finally:
            if probe:
                self._probing = False
        if probe:  # only the probe closes the breaker (checks in flight may also succeed)
            self._down_until = 0.0
            log.warning("rate-limit backend %s answers again", self.backend.name,
                        extra={"backend": self.backend.name,
                               "degraded_decisions": self._degraded})
            self._degraded = 0
        return out

    def _fail(self, lim: Limit, cost: int) -> Decision:
        self._degraded += 1
        if lim.fail_open:
            return Decision(True, lim.capacity - cost, 0.0, 0.0, degraded=True)
        wait = self._fail_retry_after_s
        return Decision(False, 0, wait, wait, degraded=True)

    def _log_failure(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_log < self._log_interval_s:
            return
        self._last_log = now
        log.warning("rate-limit backend %s unreachable (%s); deciding by each limit's fail "
                    "mode", self.backend.name, exc,
                    extra={"backend": self.backend.name, "degraded_decisions": self._degraded})
        self._degraded = 0

    # -- lifecycle ----------------------------------------------------------------------
    async def flush(self) -> list[Violation]:
        """Write pending violations now (also done every ``flush_interval_s``)."""
        return await self.violations.flush()

    async def start(self) -> None:
        """Start the background task that flushes violations and runs maintenance."""
        if self._task is None:
            self._task = asyncio.create_task(self._background(), name="datalayer-ratelimit")

    async def _background(self) -> None:
        next_maintenance = time.monotonic() + self._maintenance_interval_s
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.violations.flush()
            except Exception as exc:  # kept pending; tried again next time
                log.warning("rate-limit violations not written: %s", exc,
                            extra={"pending": self.violations.pending})
            if self._maintenance is not None and time.monotonic() >= next_maintenance:
                next_maintenance = time.monotonic() + self._maintenance_interval_s
                try:
                    await self._maintenance()
                except Exception as exc:
                    log.warning("rate-limit maintenance failed: %s", exc)

    async def close(self) -> None:
        """Stop the background task, flush what is pending (best effort), close the
        backend's own connections."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.violations.flush()
        except Exception as exc:
            log.warning("rate-limit violations lost at close: %s", exc,
                        extra={"pending": self.violations.pending})
        await self.backend.close()
