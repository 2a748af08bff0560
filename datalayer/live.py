"""Live execution status: progress updates published as they happen, and subscriptions.

With Redis (``REDIS_URL``), an update goes to the hash ``{prefix}execution:status:{id}``
(the latest state, expiring after ``ttl_s``) and to the channels ``{prefix}execution:{id}``
and ``{prefix}workflow:{workflow_id}``. Without Redis it goes to PostgreSQL as a NOTIFY on
``datalayer_execution_status``, built in SQL from the execution row the publisher's session
can see (so a tenant session cannot announce another tenant's executions, nor a status an
execution does not have).

Messages carry ids, status, progress, a node id and a timestamp: never inputs, outputs,
errors or anything secret. Channels are named by unguessable ids, and :meth:`subscribe`
checks that the subscriber's context sees the execution (or workflow) before subscribing;
the NOTIFY channel is shared by all tenants and filtered by id in this process.

Updates are published after the change committed (the worker does so); a NOTIFY is sent in
its own short transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Generic, Self, TypeVar, cast

import asyncpg
import orjson
from redis.exceptions import RedisError

from datalayer.core.errors import NotFound, Unavailable, ValidationError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

    from datalayer.core.context import Context
    from datalayer.core.database import DataLayer
    from datalayer.repos.executions import Execution

__all__ = ["NOTIFY_CHANNEL", "LiveStatus", "StatusUpdate", "Subscription", "listen_connection",
           "redis_subscribe"]

log = logging.getLogger("datalayer.live")

NOTIFY_CHANNEL = "datalayer_execution_status"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusUpdate:
    """One update: the execution's status, optional progress (0..1) and current node."""

    execution_id: uuid.UUID
    workflow_id: uuid.UUID
    status: str
    progress: float | None = None
    node_id: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> bytes:
        return orjson.dumps({
            "execution_id": str(self.execution_id), "workflow_id": str(self.workflow_id),
            "status": self.status, "progress": self.progress, "node_id": self.node_id,
            "at": self.at.isoformat(),
        })

    @classmethod
    def from_json(cls, data: bytes | str) -> StatusUpdate:
        d = orjson.loads(data)
        return cls(execution_id=uuid.UUID(d["execution_id"]),
                   workflow_id=uuid.UUID(d["workflow_id"]), status=d["status"],
                   progress=d.get("progress"), node_id=d.get("node_id"),
                   at=datetime.fromisoformat(d["at"]))


async def listen_connection(dl: DataLayer, channel: str,
                            callback: Callable[[object, int, str, object], None], *,
                            purpose: str) -> asyncpg.Connection:
    """A dedicated PostgreSQL connection LISTENing on ``channel`` (``callback`` is called per
    notification, asyncpg's listener signature), for the subscriptions of live status and
    notifications. ``Unavailable`` when it cannot connect. The caller closes it."""
    conn = await dl.connect_dedicated("live", f"to LISTEN for {purpose}")
    try:
        await conn.add_listener(channel, callback)
    except BaseException:
        await conn.close()
        raise
    return conn


async def redis_subscribe(redis: Redis, channel: str) -> PubSub:
    """A Redis pub/sub subscribed to ``channel``, the subscription confirmed (no message
    published after this returns is missed). ``Unavailable`` on Redis errors."""
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(channel)
        # The confirmation: once read, the server has registered the subscription.
        while (await pubsub.get_message(timeout=1.0)) is None:
            pass
    except (RedisError, OSError) as exc:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        raise Unavailable("Redis did not accept the subscription") from exc
    return pubsub


class LiveStatus:
    """Publish and subscribe to execution status updates (Redis, else PostgreSQL NOTIFY).

    ``prefix`` namespaces every Redis key and channel (tests use a per-run prefix). Holds no
    connection itself; each subscription opens its own (a Redis pub/sub connection, or a
    dedicated PostgreSQL connection for LISTEN) and closes it when it ends.
    """

    __slots__ = ("_dl", "prefix", "ttl_s")

    def __init__(self, dl: DataLayer, *, prefix: str = "datalayer:", ttl_s: int = 86_400) -> None:
        self._dl = dl
        self.prefix = prefix
        self.ttl_s = ttl_s

    def status_key(self, execution_id: uuid.UUID) -> str:
        return f"{self.prefix}execution:status:{execution_id}"

    def execution_channel(self, execution_id: uuid.UUID) -> str:
        return f"{self.prefix}execution:{execution_id}"

    def workflow_channel(self, workflow_id: uuid.UUID) -> str:
        return f"{self.prefix}workflow:{workflow_id}"

    async def publish(self, execution: Execution, *, progress: float | None = None,
                      node_id: str | None = None) -> None:
        """Publish ``execution``'s status (as of the row given: call after commit).

        Redis: one pipelined round trip (hash, expiry, two channels). PostgreSQL: one short
        transaction; the NOTIFY's status is read from the row, as the worker's session
        sees it. Redis errors propagate as ``Unavailable``."""
        if progress is not None and not 0.0 <= progress <= 1.0:
            raise ValidationError("progress must be between 0 and 1")
        redis = self._dl.redis
        if redis is None:
            async with self._dl.system() as db:
                await db.execrows("executions.notify_status", org_id=execution.org_id,
                                  id=execution.id, progress=progress, node_id=node_id)
            return
        update = StatusUpdate(execution_id=execution.id, workflow_id=execution.workflow_id,
                              status=execution.status, progress=progress, node_id=node_id)
        message = update.to_json()
        key = self.status_key(execution.id)
        fields = {"status": update.status, "workflow_id": str(update.workflow_id),
                  "progress": "" if progress is None else repr(progress),
                  "node_id": node_id or "", "at": update.at.isoformat()}
        try:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
                pipe.expire(key, self.ttl_s)
                pipe.publish(self.execution_channel(execution.id), message)
                pipe.publish(self.workflow_channel(execution.workflow_id), message)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Unavailable("Redis did not take the status update") from exc

    async def current(self, execution_id: uuid.UUID) -> dict[str, str] | None:
        """The latest published status of an execution (Redis only; None without Redis or
        when nothing was published within ``ttl_s``). The caller checks visibility."""
        redis = self._dl.redis
        if redis is None:
            return None
        raw = cast("dict[bytes, bytes]", await redis.hgetall(self.status_key(execution_id)))
        return {k.decode(): v.decode() for k, v in raw.items()} or None

    async def subscribe(self, ctx: Context | None, *, execution_id: uuid.UUID | None = None,
                        workflow_id: uuid.UUID | None = None) -> Subscription:
        """Subscribe to one execution's or one workflow's updates; ``async with`` it and
        ``async for`` over it. Subscribed when this returns (no update published later is
        missed). With a context, ``NotFound`` unless the context sees the execution or
        workflow; ``ctx=None`` is for trusted system code."""
        if (execution_id is None) == (workflow_id is None):
            raise ValidationError("subscribe to exactly one of execution_id, workflow_id")
        if ctx is not None:
            async with self._dl.session(ctx, readonly=True) as db:
                if execution_id is not None:
                    visible = await db.executions.get(execution_id) is not None
                else:
                    visible = bool(await db.scalar("executions.workflow_visible",
                                                   workflow_id=workflow_id))
            if not visible:
                raise NotFound("nothing to subscribe to: not found or not visible")
        sub = Subscription(self, execution_id, workflow_id)
        await sub._open()
        return sub


E = TypeVar("E")


class Feed(Generic[E]):
    """One open subscription to published events, over Redis pub/sub when the DataLayer has
    Redis, else over LISTEN on a connection of its own: ``async with`` it and ``async for``
    over it, or ``await get(timeout_s)``. Subclasses say how to decode a message and which
    events they want (a NOTIFY channel carries every tenant's events)."""

    __slots__ = ("_conn", "_dl", "_notify_channel", "_pubsub", "_queue")

    def __init__(self, dl: DataLayer, notify_channel: str) -> None:
        self._dl = dl
        self._notify_channel = notify_channel
        self._pubsub: PubSub | None = None
        self._conn: asyncpg.Connection | None = None
        self._queue: asyncio.Queue[E] = asyncio.Queue()

    def _decode(self, data: bytes | str) -> E:
        raise NotImplementedError

    def _wanted(self, event: E) -> bool:
        raise NotImplementedError

    def _redis_channel(self) -> str:
        raise NotImplementedError

    def _event(self, data: bytes | str) -> E | None:
        try:
            event = self._decode(data)
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed event", extra={"feed": type(self).__name__})
            return None
        return event if self._wanted(event) else None

    async def _open(self) -> None:
        redis = self._dl.redis
        if redis is not None:
            self._pubsub = await redis_subscribe(redis, self._redis_channel())
            return
        self._conn = await listen_connection(self._dl, self._notify_channel, self._notified,
                                             purpose=type(self).__name__)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        event = self._event(str(payload))
        if event is not None:
            self._queue.put_nowait(event)

    async def get(self, timeout_s: float | None = None) -> E | None:
        """The next event, or None after ``timeout_s`` seconds without one."""
        pubsub = self._pubsub
        if pubsub is None:
            try:
                return await asyncio.wait_for(self._queue.get(), timeout_s)
            except TimeoutError:
                return None
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - loop.time()))
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=wait)
            except (RedisError, OSError) as exc:
                raise Unavailable("lost the Redis subscription") from exc
            if message is not None and message.get("type") == "message":
                event = self._event(message["data"])
                if event is not None:
                    return event
            if deadline is not None and loop.time() >= deadline:
                return None

    def __aiter__(self) -> AsyncIterator[E]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[E]:
        while self._pubsub is not None or self._conn is not None:
            event = await self.get(timeout_s=1.0)
            if event is not None:
                yield event

    async def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        conn, self._conn = self._conn, None
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.unsubscribe()
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        if conn is not None:
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.remove_listener(self._notify_channel, self._notified)
            await conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Subscription(Feed[StatusUpdate]):
    """Status updates of one execution or of one workflow's executions."""

    __slots__ = ("_execution_id", "_live", "_workflow_id")

    def __init__(self, live: LiveStatus, execution_id: uuid.UUID | None,
                 workflow_id: uuid.UUID | None) -> None:
        super().__init__(live._dl, NOTIFY_CHANNEL)
        self._live = live
        self._execution_id = execution_id
        self._workflow_id = workflow_id

    def _decode(self, data: bytes | str) -> StatusUpdate:
        return StatusUpdate.from_json(data)

    def _wanted(self, u: StatusUpdate) -> bool:
        if self._execution_id is not None:
            return u.execution_id == self._execution_id
        return u.workflow_id == self._workflow_id

    def _redis_channel(self) -> str:
        if self._execution_id is not None:
            return self._live.execution_channel(self._execution_id)
        assert self._workflow_id is not None
        return self._live.workflow_channel(self._workflow_id)
