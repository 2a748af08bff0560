"""The execution queue's worker: claim batches, keep their leases, reap, wake on NOTIFY.

A :class:`Worker` serves every organization as the maintenance role (what ``dl.system()``
runs as), or one organization with a writer's tenant context (``ctx=``). It keeps **one
dedicated connection** (not from the pool) that LISTENs on ``datalayer_executions``, which
the database notifies when an execution becomes due (enqueued, requeued, resumed), and that
also runs its claims: woken, a worker claims in one round trip (no pool acquire, context
switch or BEGIN/COMMIT). An idle worker waits for that signal or for ``poll_interval_s``
(executions scheduled for later, a lost signal), never spinning. Everything else (heartbeats,
completions, the handler's writes) goes through pooled sessions. Behind PgBouncer's
transaction pooling LISTEN does not work: point ``DATABASE_URL`` at a direct connection for
workers.

A background task renews the leases of what the worker holds every ``lease_s / 3`` and
drops what it lost (reaped, cancelled), reaps every ``lease_s / 2`` what dead workers left
behind (their executions go back to the queue, or fail after their last attempt), and, for a
system worker, creates the coming months' partitions at start and every six hours.

Usage::

    async with Worker(dl, lease_s=30) as worker:
        await worker.run(handler)            # handler(execution) -> output; raise to fail

or, by hand::

    async for batch in worker.batches():
        for execution in batch:
            ...
            await worker.complete(execution, output)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncpg

from datalayer.core.context import system_sql
from datalayer.core.errors import DataLayerError, Unavailable, ValidationError
from datalayer.repos.executions import Execution, LeaseLost, check_lease, check_worker_id

if TYPE_CHECKING:
    from datalayer.core.context import Context
    from datalayer.core.database import DataLayer
    from datalayer.core.session import Session, SessionScope
    from datalayer.live import LiveStatus

__all__ = ["WAKE_CHANNEL", "Handler", "Worker"]

log = logging.getLogger("datalayer.queue")

WAKE_CHANNEL = "datalayer_executions"  # notified by the executions triggers
PARTITION_EVERY_S = 6 * 3600.0

Handler = Callable[[Execution], Awaitable[Any]]
_Key = tuple[uuid.UUID, uuid.UUID]


def default_worker_id() -> str:
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """One worker of the execution queue. Not shared between event loops; its methods may
    be called from several tasks of one loop (the handler tasks of :meth:`run`)."""

    def __init__(self, dl: DataLayer, worker_id: str | None = None, *,
                 ctx: Context | None = None, lease_s: float = 30.0, batch_size: int = 10,
                 poll_interval_s: float = 1.0, heartbeat_interval_s: float | None = None,
                 reap_interval_s: float | None = None, reap: bool = True,
                 maintain_partitions: bool = True, live: LiveStatus | None = None) -> None:
        if not 1 <= batch_size <= 1000:
            raise ValidationError("batch_size must be between 1 and 1000")
        if poll_interval_s <= 0:
            raise ValidationError("poll_interval_s must be > 0")
        self._dl = dl
        self.worker_id = check_worker_id(worker_id or default_worker_id())
        self._ctx = ctx
        self.lease_s = check_lease(lease_s)
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s or self.lease_s / 3
        self.reap_interval_s = reap_interval_s or self.lease_s / 2
        self._reap = reap
        self._partitions = maintain_partitions and ctx is None
        self._live = live
        self._held: dict[_Key, Execution] = {}
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._own: Session | None = None  # the listener connection, for claims
        self._claiming = asyncio.Lock()
        self._maintainer: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> Worker:
        """Open the LISTEN connection and start the lease/reaper task."""
        await self._listen()
        if self._partitions:
            await self.ensure_partitions()
        self._maintainer = asyncio.create_task(self._maintain(),
                                               name=f"worker {self.worker_id} maintenance")
        return self

    async def __aenter__(self) -> Worker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, *, release: bool = True) -> None:
        """Stop. With ``release`` (the default) what the worker still holds goes back to the
        queue at once (same attempt) instead of waiting for its lease to expire."""
        self._closed = True
        self._wake.set()
        await self._stop_maintainer()
        if release and self._held:
            with contextlib.suppress(DataLayerError):
                async with self.session() as db:
                    await db.executions.release(self.worker_id)
        self._held.clear()
        await self._unlisten()

    async def abort(self) -> None:
        """Stop as a crashed process would: no more heartbeats, nothing released. What the
        worker holds stays running until its lease expires and a reaper takes it back.
        (Tests and demos use this to play a dying worker.)"""
        self._closed = True
        self._wake.set()
        await self._stop_maintainer()
        self._held.clear()
        self._own = None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.terminate()

    async def _stop_maintainer(self) -> None:
        task, self._maintainer = self._maintainer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def closed(self) -> bool:
        return self._closed

    def session(self) -> SessionScope:
        """A session for this worker's writes: ``dl.system()``, or the tenant context."""
        if self._ctx is None:
            return self._dl.system()
        return self._dl.session(self._ctx)

    # -- LISTEN -----------------------------------------------------------------------------
    async def _listen(self) -> None:
        from datalayer.core.database import _init_connection

        s = self._dl.settings
        server: dict[str, str] = {}
        if s.statement_timeout_ms:
            server["statement_timeout"] = str(s.statement_timeout_ms)
        # The worker's role and context, for good (this connection serves nothing else);
        # its claims are single statements that commit on their own.
        ctx = self._ctx
        setup = (system_sql(local=False) if ctx is None else ctx.session_sql) + \
            "; SET default_transaction_read_only = off"
        conn = await self._dl.connect_dedicated("worker", "for the worker's LISTEN",
                                                server_settings=server)
        try:
            await _init_connection(conn)
            await conn.execute(setup)
            await conn.add_listener(WAKE_CHANNEL, self._notified)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            conn.terminate()
            raise Unavailable("the worker cannot set up its LISTEN connection") from exc
        conn.add_termination_listener(self._listener_lost)
        self._listener = conn
        self._own = self._dl.executor(conn)

    async def _unlisten(self) -> None:
        self._own = None
        conn, self._listener = self._listener, None
        if conn is None:
            return
        try:
            await conn.remove_listener(WAKE_CHANNEL, self._notified)  # UNLISTEN
            await conn.close(timeout=5)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()

    def _notified(self, _conn: object, _pid: int, _channel: str, _payload: object) -> None:
        self._wake.set()

    def _listener_lost(self, conn: Any) -> None:
        if self._listener is conn:
            self._own = None
            self._listener = None  # polling until the maintenance task reconnects
            log.warning("worker LISTEN connection lost", extra={"worker_id": self.worker_id})

    # -- the queue --------------------------------------------------------------------------
    @property
    def held(self) -> list[Execution]:
        """The executions this worker holds (claimed, not finished, not lost)."""
        return list(self._held.values())

    def holds(self, execution: Execution) -> bool:
        return (execution.org_id, execution.id) in self._held

    async def claim(self, limit: int | None = None) -> list[Execution]:
        """Claim up to ``limit`` (default ``batch_size``) due executions now: one statement on
        the worker's own connection (a pooled session while that one is being replaced)."""
        n = limit or self.batch_size
        async with self._claiming:
            own = self._own
            if own is not None:
                batch = await own.executions.claim(self.worker_id, limit=n,
                                                   lease_s=self.lease_s)
            else:
                async with self.session() as db:
                    batch = await db.executions.claim(self.worker_id, limit=n,
                                                      lease_s=self.lease_s)
        for e in batch:
            self._held[e.org_id, e.id] = e
        if self._live is not None:
            for e in batch:
                await self._publish(e)
        return batch

    async def next_batch(self, *, limit: int | None = None,
                         timeout_s: float | None = None) -> list[Execution]:
        """The next non-empty batch, waiting for a NOTIFY (or ``poll_interval_s``) while the
        queue is empty; ``[]`` after ``timeout_s`` seconds or once the worker is closed."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while not self._closed:
            self._wake.clear()  # before claiming: a signal during the claim is not lost
            batch = await self.claim(limit)
            if batch:
                return batch
            wait = self.poll_interval_s
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    return []
            await self.wait_for_work(wait)
        return []

    async def wait_for_work(self, timeout_s: float | None = None) -> bool:
        """Wait until the database signals that an execution became due (True), or for
        ``timeout_s`` (default ``poll_interval_s``; False). Claim after it returns."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_s or self.poll_interval_s)
        except TimeoutError:
            return False
        finally:
            self._wake.clear()
        return not self._closed

    async def batches(self, *, limit: int | None = None) -> AsyncIterator[list[Execution]]:
        """Non-empty batches until the worker is closed."""
        while not self._closed:
            batch = await self.next_batch(limit=limit)
            if batch:
                yield batch

    async def complete(self, execution: Execution, output: Any = None) -> bool:
        """Succeeded; False when the worker no longer held it (nothing changed)."""
        return await self.finish(execution, "succeeded", output=output)

    async def fail(self, execution: Execution, error: str | dict[str, Any]) -> bool:
        """Failed (the workflow may retry it automatically); False when no longer held."""
        return await self.finish(execution, "failed", error=error)

    async def finish(self, execution: Execution, status: str, *, output: Any = None,
                     error: str | dict[str, Any] | None = None) -> bool:
        self._held.pop((execution.org_id, execution.id), None)
        async with self.session() as db:
            done = await db.executions.finish(execution, status, output=output, error=error)
        if done is not None and self._live is not None:
            await self._publish(done)
        return done is not None

    async def wait(self, execution: Execution, *, reason: str) -> bool:
        """Pause until resumed (see ``Executions.wait``); False when no longer held."""
        self._held.pop((execution.org_id, execution.id), None)
        async with self.session() as db:
            done = await db.executions.wait(execution, reason=reason)
        if done is not None and self._live is not None:
            await self._publish(done)
        return done is not None

    async def progress(self, execution: Execution, progress: float | None = None, *,
                       node_id: str | None = None) -> None:
        """Publish a progress update (no-op without a ``live`` publisher)."""
        if self._live is not None:
            await self._live.publish(execution, progress=progress, node_id=node_id)

    async def _publish(self, execution: Execution) -> None:
        assert self._live is not None
        try:
            await self._live.publish(execution)
        except DataLayerError:  # live status is best effort; the database has the truth
            log.warning("status update not published", extra={"execution_id": execution.id})

    async def heartbeat(self) -> list[Execution]:
        """Renew the leases; returns the executions lost since (and stops holding them)."""
        async with self.session() as db:
            leases = await db.executions.heartbeat(self.worker_id, lease_s=self.lease_s)
        still = {(lease.org_id, lease.id) for lease in leases}
        lost = [e for key, e in list(self._held.items()) if key not in still]
        for e in lost:
            self._held.pop((e.org_id, e.id), None)
        if lost:
            log.info("worker lost executions", extra={"worker_id": self.worker_id,
                                                      "lost": len(lost)})
        return lost

    async def reap(self, limit: int = 100) -> list[Execution]:
        """Take back executions whose workers stopped renewing their leases."""
        async with self.session() as db:
            return await db.executions.reap(limit=limit)

    async def ensure_partitions(self, months_ahead: int = 2) -> list[str]:
        """Create the coming months' partitions (system workers; idempotent)."""
        async with self._dl.system() as db:
            rows = await db.many("partitions.ensure", months_ahead=months_ahead, months_back=0)
        return [r["name"] for r in rows]

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        next_reap = loop.time()
        next_partitions = loop.time() + PARTITION_EVERY_S
        while not self._closed:
            try:
                if self._listener is None and not self._closed:
                    with contextlib.suppress(Unavailable):
                        await self._listen()
                        self._wake.set()  # signals may have been missed meanwhile
                if self._held:
                    await self.heartbeat()
                now = loop.time()
                if self._reap and now >= next_reap:
                    next_reap = now + self.reap_interval_s
                    await self.reap()
                if self._partitions and now >= next_partitions:
                    next_partitions = now + PARTITION_EVERY_S
                    await self.ensure_partitions()
            except DataLayerError as exc:
                log.warning("worker maintenance failed; retrying",
                            extra={"worker_id": self.worker_id, "error": str(exc)})
            await asyncio.sleep(min(self.heartbeat_interval_s, self.reap_interval_s))

    # -- the loop ---------------------------------------------------------------------------
    async def run(self, handler: Handler, *, concurrency: int | None = None,
                  stop: asyncio.Event | None = None) -> None:
        """Run ``handler`` on each claimed execution, up to ``concurrency`` (default
        ``batch_size``) at a time, until ``stop`` is set or the worker is closed. What the
        handler returns is the output; an exception fails the execution (message only);
        :class:`LeaseLost` (another worker has it now) is dropped."""
        slots = asyncio.Semaphore(concurrency or self.batch_size)
        free = concurrency or self.batch_size
        tasks: set[asyncio.Task[None]] = set()

        async def one(e: Execution) -> None:
            try:
                try:
                    output = await handler(e)
                except LeaseLost:
                    self._held.pop((e.org_id, e.id), None)
                    return
                except Exception as exc:  # the handler's failure is the execution's
                    await self.fail(e, {"message": str(exc)[:1000],
                                        "type": type(exc).__name__})
                    return
                await self.complete(e, output)
            except DataLayerError as exc:  # the lease runs out and the reaper takes it back
                log.warning("could not finish an execution",
                            extra={"execution_id": e.id, "error": str(exc)})
            finally:
                slots.release()

        try:
            while not self._closed and not (stop is not None and stop.is_set()):
                await slots.acquire()
                slots.release()
                room = free - sum(1 for t in tasks if not t.done())
                batch = await self.next_batch(limit=max(1, room),
                                              timeout_s=self.poll_interval_s)
                for e in batch:
                    await slots.acquire()
                    task = asyncio.create_task(one(e))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

