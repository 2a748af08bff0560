"""Sessions: one pooled connection with a tenant context applied, and the calls that run queries.

``Session`` is the executor every repository uses. It knows query names (through the
registry) but nothing about domains; repositories know domains but not the driver.

Context application, per ``Settings.context_mode``:

* ``session`` (direct connections): the context is applied at session level and
  remembered on the connection (``ConnState.key``). A session for the context the
  connection already carries pays no round trip; any other context is applied in one
  round trip that overwrites *every* context setting and the role. The key is set only
  once the applying statement has durably taken effect, and cleared before, so an
  interrupted apply (error, cancellation, rollback) forces a full re-apply next time.
  Such connections also default to read-only transactions: only an explicit
  ``BEGIN READ WRITE`` can write.
* ``transaction`` (behind PgBouncer transaction pooling): ``BEGIN``, the role and the
  settings go in one round trip as transaction-local values, gone at COMMIT/ROLLBACK.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import asyncpg

from datalayer.core.context import SYSTEM_KEY, Context, system_sql
from datalayer.core.errors import (
    DataLayerError,
    Timeout,
    TransactionAborted,
    Unavailable,
    ValidationError,
    translate,
)
from datalayer.core.rows import RowQuery
from datalayer.core.sqlfile import Query, Shape
from datalayer.repos._base import Repository
from datalayer.repos.analytics import Analytics
from datalayer.repos.api_keys import ApiKeys
from datalayer.repos.audit import Audit
from datalayer.repos.auth import Auth
from datalayer.repos.conversations import Conversations
from datalayer.repos.credentials import Credentials
from datalayer.repos.executions import Executions
from datalayer.repos.gdpr import Gdpr
from datalayer.repos.knowledge import Knowledge
from datalayer.repos.marketplace import Marketplace
from datalayer.repos.memberships import Memberships
from datalayer.repos.metrics import Metrics
from datalayer.repos.models import Models
from datalayer.repos.notifications import Notifications
from datalayer.repos.orgs import Organizations
from datalayer.repos.permissions import Permissions
from datalayer.repos.plugins import Plugins
from datalayer.repos.search import Search
from datalayer.repos.teams import Teams
from datalayer.repos.users import Users
from datalayer.repos.webhooks import Webhooks
from datalayer.repos.workflows import Workflows

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = ["ConnState", "DLConnection", "Isolation", "Session", "SessionScope", "guarded"]

log = logging.getLogger("datalayer.session")
_clock = time.perf_counter_ns

T = TypeVar("T")
R = TypeVar("R", bound=Repository)
Isolation = Literal["read_committed", "repeatable_read", "serializable"]
_ISOLATION = {
    "read_committed": "READ COMMITTED",
    "repeatable_read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}


_BEGIN = {
    (iso, ro): f"BEGIN ISOLATION LEVEL {level} {'READ ONLY' if ro else 'READ WRITE'}"
    for iso, level in _ISOLATION.items() for ro in (False, True)
}


class ConnState:
    """What this process knows about a connection's session-level context."""

    __slots__ = ("key",)

    def __init__(self) -> None:
        self.key: tuple[object, ...] | None = None  # None: unknown, apply in full


class DLConnection(asyncpg.Connection):
    """asyncpg connection carrying a :class:`ConnState` (reachable through pool proxies)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dl_state = ConnState()


class Session:
    """One connection with a context applied. Not safe to share between tasks.

    Each call is one round trip. Keyword arguments bind to the query's ``:name``
    parameters; a missing or unexpected one raises ``ValidationError`` before anything
    is sent.
    """

    __slots__ = ("_after", "_conn", "_ctx", "_dl", "_m", "_queries", "_readonly", "_repos",
                 "_sp", "_tx")

    def __init__(self, dl: DataLayer, conn: Any, ctx: Context | None, *, readonly: bool,
                 in_transaction: bool) -> None:
        self._dl = dl
        self._conn = conn
        self._ctx = ctx
        self._queries = dl.registry.raw
        self._m = dl.metrics  # every execution reports to it (datalayer/query_performance.py)
        self._readonly = readonly
        self._tx = in_transaction
        self._sp = 0
        self._repos: dict[type[Repository], Repository] | None = None
        self._after: list[Callable[[], Awaitable[object]]] | None = None

    @property
    def dl(self) -> DataLayer:
        """The DataLayer this session belongs to (settings, keyring, …)."""
        return self._dl

    @property
    def context(self) -> Context | None:
        """The session's context; None for ``dl.system()``."""
        return self._ctx

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def in_transaction(self) -> bool:
        """True when statements run inside a transaction this session opened."""
        return self._tx

    async def after_commit(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Run ``fn()`` once this session's transaction has committed (cache invalidation).

        In a transaction: queued, awaited right after a successful COMMIT (the connection
        already released, shielded from cancellation), and dropped on rollback, including
        the rollback of a savepoint it was queued in. Exceptions it raises are logged, not
        raised: the commit has happened. Without a transaction (read-only sessions,
        ``dl.executor``) each statement has committed already, so ``fn`` runs at once.
        """
        if not self._tx:
            await fn()
            return
        if self._after is None:
            self._after = []
        self._after.append(fn)

    @property
    def connection(self) -> asyncpg.Connection:
        """The underlying asyncpg connection, for COPY and LISTEN-style work the registry
        does not cover. Do not change roles or ``app.*`` settings on it."""
        conn: asyncpg.Connection = self._conn
        return conn

    def _query(self, name: str, shape: Shape) -> Query:
        q = self._queries.get(name)
        if q is None:
            raise self._dl.registry.unknown(name)
        if q.shape is not shape:
            raise ValidationError(f"{name} is a :{q.shape.value} query, not :{shape.value}")
        return q

    # -- shaped calls -------------------------------------------------------------------
    async def one(self, name: str, /, **params: object) -> asyncpg.Record | None:
        """``:one`` query: the row, or None."""
        q = self._query(name, Shape.ONE)
        t0 = _clock()
        try:
            row: asyncpg.Record | None = await self._conn.fetchrow(q.sql, *q.bind(params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._m.failed(name, t0, exc)
            raise _mapped(exc, name) from exc
        self._m.record(name, t0, 0 if row is None else 1)
        return row

    async def many(self, name: str, /, **params: object) -> list[asyncpg.Record]:
        """``:many`` query: a list of rows."""
        q = self._query(name, Shape.MANY)
        t0 = _clock()
        try:
            rows: list[asyncpg.Record] = await self._conn.fetch(q.sql, *q.bind(params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._m.failed(name, t0, exc)
            raise _mapped(exc, name) from exc
        self._m.record(name, t0, len(rows))
        return rows

    async def scalar(self, name: str, /, **params: object) -> Any:
        """``:scalar`` query: the first column of the first row (None without rows)."""
        q = self._query(name, Shape.SCALAR)
        t0 = _clock()
        try:
            value = await self._conn.fetchval(q.sql, *q.bind(params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._m.failed(name, t0, exc)
            raise _mapped(exc, name) from exc
        self._m.record(name, t0, 0 if value is None else 1)
        return value

    async def exec(self, name: str, /, **params: object) -> str:
        """``:exec`` query: the command status (``'UPDATE 3'``)."""
        q = self._query(name, Shape.EXEC)
        t0 = _clock()
        try:
            status: str = await self._conn.execute(q.sql, *q.bind(params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._m.failed(name, t0, exc)
            raise _mapped(exc, name) from exc
        tail = status.rpartition(" ")[2]
        self._m.record(name, t0, int(tail) if tail.isdigit() else 0)
        return status

    async def execrows(self, name: str, /, **params: object) -> int:
        """``:execrows`` query: the number of rows affected."""
        q = self._query(name, Shape.EXECROWS)
        t0 = _clock()
        try:
            status: str = await self._conn.execute(q.sql, *q.bind(params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._m.failed(name, t0, exc)
            raise _mapped(exc, name) from exc
        tail = status.rpartition(" ")[2]
        n = int(tail) if tail.isdigit() else 0
        self._m.record(name, t0, n)
        return n

    async def copy(self, name: str, /, records: Iterable[Sequence[object]]) -> int:
        """``:copy`` query: COPY ``records`` (tuples in the declared column order); row count."""
        q = self._query(name, Shape.COPY)
        assert q.copy_table is not None
        schema, _, table = q.copy_table.rpartition(".")
        t0 = _clock()
        try:
            status: str = await self._conn.copy_records_to_table(
                table, records=records, columns=list(q.copy_columns), schema_name=schema or None
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._m.failed(name, t0, exc)
            raise _mapped(exc, name) from exc
        n = int(status.rpartition(" ")[2] or 0)
        self._m.record(name, t0, n)
        return n

    async def run(self, name: str, /, **params: object) -> Any:
        """Run any query by name; the result follows its shape (see ``one``, ``many``, …)."""
        q = self._queries.get(name)
        if q is None:
            raise self._dl.registry.unknown(name)
        if q.shape is Shape.COPY:
            records = params.pop("records", None)
            if records is None or params:
                raise ValidationError(f"{name} is a :copy query; call it with records=[...]")
            return await self.copy(name, records)  # type: ignore[arg-type]
        return await _SHAPE_CALL[q.shape](self, name, **params)

    # -- typed rows ---------------------------------------------------------------------
    async def fetch_one(self, query: RowQuery[T], /, **params: object) -> T | None:
        """Run a ``:one`` query and build its row dataclass (by column name)."""
        q = self._queries.get(query.name)
        if q is None or q.shape is not Shape.ONE:
            q = self._query(query.name, Shape.ONE)  # raises the precise error
        t0 = _clock()
        try:
            row = await self._conn.fetchrow(q.sql, *q.bind(params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._m.failed(q.name, t0, exc)
            raise _mapped(exc, q.name) from exc
        if row is None:
            self._m.record(q.name, t0, 0)
            return None
        self._m.record(q.name, t0, 1)
        return query.build(row)

    async def fetch_many(self, query: RowQuery[T], /, **params: object) -> list[T]:
        """Run a ``:many`` query and build a row dataclass per row."""
        q = self._query(query.name, Shape.MANY)
        t0 = _clock()
        try:
            rows = await self._conn.fetch(q.sql, *q.bind(params))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            self._m.failed(q.name, t0, exc)
            raise _mapped(exc, q.name) from exc
        self._m.record(q.name, t0, len(rows))
        build = query.build
        return [build(r) for r in rows]

    # -- transactions -------------------------------------------------------------------
    @asynccontextmanager
    async def savepoint(self) -> AsyncIterator[Session]:
        """A nested transaction: an exception inside rolls back to here and propagates."""
        if not self._tx:
            raise ValidationError("savepoint() needs a transaction; read-only sessions run "
                                  "without one unless opened with isolation='repeatable_read'")
        self._sp += 1
        name = f"dl_sp_{self._sp}"
        queued = len(self._after or ())
        await self._plain(f"SAVEPOINT {name}")
        try:
            yield self
        except asyncio.CancelledError:
            raise  # the session ends now and rolls back (or drops) the whole transaction
        except BaseException:
            await self._plain(f"ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}")
            if self._after:
                del self._after[queued:]  # rolled back: nothing to do after commit
            raise
        else:
            await self._plain(f"RELEASE SAVEPOINT {name}")

    async def _plain(self, sql: str) -> None:
        try:
            await self._conn.execute(sql)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise _mapped(exc, None) from exc

    # -- repositories -------------------------------------------------------------------
    def _repo(self, cls: type[R]) -> R:
        repos = self._repos
        if repos is None:
            repos = self._repos = {}
        repo = repos.get(cls)
        if repo is None:
            repo = repos[cls] = cls(self)
        return repo  # type: ignore[return-value]

    @property
    def orgs(self) -> Organizations:
        return self._repo(Organizations)

    @property
    def users(self) -> Users:
        return self._repo(Users)

    @property
    def memberships(self) -> Memberships:
        return self._repo(Memberships)

    @property
    def teams(self) -> Teams:
        return self._repo(Teams)

    @property
    def api_keys(self) -> ApiKeys:
        return self._repo(ApiKeys)

    @property
    def auth(self) -> Auth:
        return self._repo(Auth)

    @property
    def permissions(self) -> Permissions:
        return self._repo(Permissions)

    @property
    def workflows(self) -> Workflows:
        return self._repo(Workflows)

    @property
    def executions(self) -> Executions:
        return self._repo(Executions)

    @property
    def webhooks(self) -> Webhooks:
        return self._repo(Webhooks)

    @property
    def notifications(self) -> Notifications:
        return self._repo(Notifications)

    @property
    def credentials(self) -> Credentials:
        return self._repo(Credentials)

    @property
    def audit(self) -> Audit:
        return self._repo(Audit)

    @property
    def gdpr(self) -> Gdpr:
        return self._repo(Gdpr)

    @property
    def analytics(self) -> Analytics:
        return self._repo(Analytics)

    @property
    def search(self) -> Search:
        return self._repo(Search)

    @property
    def metrics(self) -> Metrics:
        return self._repo(Metrics)

    @property
    def plugins(self) -> Plugins:
        return self._repo(Plugins)

    @property
    def marketplace(self) -> Marketplace:
        return self._repo(Marketplace)

    @property
    def models(self) -> Models:
        return self._repo(Models)

    @property
    def conversations(self) -> Conversations:
        return self._repo(Conversations)

    @property
    def knowledge(self) -> Knowledge:
        return self._repo(Knowledge)


_SHAPE_CALL: dict[Shape, Any] = {
    Shape.ONE: Session.one,
    Shape.MANY: Session.many,
    Shape.SCALAR: Session.scalar,
    Shape.EXEC: Session.exec,
    Shape.EXECROWS: Session.execrows,
}


def _mapped(exc: BaseException, query: str | None) -> DataLayerError:
    err = translate(exc, query)
    if err is None:  # an InterfaceError that is our misuse, not the database's answer
        err = DataLayerError(f"{query or 'statement'}: {type(exc).__name__}: {exc}", query=query)
    return err


async def guarded(call: Awaitable[T], what: str) -> T:
    """Await a driver call made outside the registry (generated SQL, a dedicated connection):
    its driver errors raise as ``DataLayerError``, as a registry query's do."""
    try:
        return await call
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise _mapped(exc, what) from exc


class SessionScope:
    """``async with dl.session(ctx) as db``: acquire, apply context, begin; commit or roll back.

    Written as a class rather than a generator-based context manager: it runs on every
    request, and this way costs two plain method calls.
    """

    __slots__ = ("_applied", "_conn", "_ctx", "_dl", "_isolation", "_readonly", "_session",
                 "_system", "_tx")

    def __init__(self, dl: DataLayer, ctx: Context | None, *, readonly: bool,
                 isolation: Isolation, system: bool = False) -> None:
        if not system and not isinstance(ctx, Context):
            raise ValidationError("session() needs a Context (use Context(org_id=None) for none)")
        if isolation not in _ISOLATION:
            raise ValidationError(f"isolation must be one of {', '.join(_ISOLATION)}")
        self._dl = dl
        self._ctx = ctx
        self._readonly = readonly
        self._isolation = isolation
        self._system = system
        self._conn: Any = None
        self._applied: tuple[object, ...] | None = None
        self._session: Session | None = None
        self._tx = False

    async def __aenter__(self) -> Session:
        dl = self._dl
        conn = await dl._acquire()
        try:
            await self._begin(conn)
        except BaseException as exc:
            await dl._release(conn, broken=True)
            if isinstance(exc, DataLayerError | asyncio.CancelledError):
                raise
            if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError):
                raise _mapped(exc, "session start") from exc
            raise
        self._conn = conn
        self._session = Session(dl, conn, self._ctx, readonly=self._readonly,
                                in_transaction=self._tx)
        return self._session

    async def _begin(self, conn: Any) -> None:
        ctx = self._ctx
        key = SYSTEM_KEY if self._system else ctx.key  # type: ignore[union-attr]
        ro = self._readonly or (ctx is not None and ctx.read_only)
        need_tx = not self._readonly or self._isolation != "read_committed"
        begin = _BEGIN[self._isolation, ro]
        if self._dl.settings.context_mode == "transaction":
            sql = system_sql(local=True) if self._system else ctx.local_sql  # type: ignore[union-attr]
            self._tx = True
            await conn.execute(f"{begin}; {sql}")
            return
        state: Any = conn.dl_state
        if state.key == key:
            if need_tx:
                self._tx = True
                await conn.execute(begin)
            return
        sql = system_sql(local=False) if self._system else ctx.session_sql  # type: ignore[union-attr]
        state.key = None  # unknown until the apply has durably taken effect
        if need_tx:
            # Applied inside the transaction: it only sticks if the transaction commits.
            self._tx = True
            self._applied = key
            await conn.execute(f"{begin}; {sql}")
        else:
            await conn.execute(sql)
            state.key = key

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> None:
        conn, self._conn = self._conn, None
        if self._session is not None:
            self._session._conn = _CLOSED
        dl = self._dl
        if not self._tx:
            await dl._release(conn, broken=exc_type is asyncio.CancelledError)
            return
        if exc_type is None:
            try:
                status = await conn.execute("COMMIT")
            except BaseException as commit_exc:
                # A failed COMMIT has rolled back; the apply (if any) did not stick.
                await dl._release(conn, broken=True)
                if isinstance(commit_exc, asyncpg.PostgresError | asyncpg.InterfaceError
                              | OSError):
                    raise _mapped(commit_exc, "commit") from commit_exc
                raise
            if status != "COMMIT":
                # PostgreSQL answers COMMIT of a failed transaction with ROLLBACK: an error
                # was raised inside the block and caught there. Nothing was written.
                await dl._release(conn, broken=False)
                raise TransactionAborted(
                    "the session's transaction had failed (an error inside the block was "
                    "caught and ignored) and was rolled back; nothing was written. Use "
                    "db.savepoint() around statements that may fail"
                )
            if self._applied is not None:
                conn.dl_state.key = self._applied
            await dl._release(conn, broken=False)
            after = self._session._after if self._session is not None else None
            if after:
                # Shielded: a request cancelled right after COMMIT still invalidates.
                await asyncio.shield(_run_after_commit(after))
            return
        # Exception or cancellation: roll back. If the connection cannot even do that
        # (lost, or a cancelled query still running), it is terminated, never reused.
        broken = exc_type is asyncio.CancelledError
        if not broken:
            try:
                await conn.execute("ROLLBACK")
            except BaseException:
                broken = True
        await dl._release(conn, broken=broken)


async def _run_after_commit(callbacks: list[Callable[[], Awaitable[object]]]) -> None:
    for fn in callbacks:
        try:
            await fn()
        except Exception:
            log.exception("an after-commit callback failed (the transaction did commit)")


class _ClosedConnection:
    """Stands in for the connection of a session that has ended."""

    def __getattr__(self, name: str) -> Any:
        raise DataLayerError("the session is closed: use it only inside its 'async with' block")


_CLOSED = _ClosedConnection()


async def acquire_with_timeout(pool: asyncpg.Pool, limit_s: float) -> Any:
    """``pool.acquire`` with the configured limit, mapped to our errors.

    When a connected, free holder is next in asyncpg's queue the acquire can neither wait
    nor connect, so it goes without a timer: a timeout arms a timer on acquire and another
    on release (asyncpg keeps it for the release), about 7 us per session at no benefit.
    The check peeks at asyncpg's LIFO holder queue (O(1); the public ``get_idle_size()``
    walks every holder). Anything else — an empty queue, a holder that would first have to
    connect, or a future asyncpg without these attributes — takes the timed path.
    """
    try:
        holders = getattr(getattr(pool, "_queue", None), "_queue", None)
        if holders and holders[-1].is_connected():
            return await pool.acquire()
        return await pool.acquire(timeout=limit_s)
    except TimeoutError:
        raise Timeout(
            f"no database connection became free within {limit_s:g}s; raise "
            "DATALAYER_POOL_MAX or DATALAYER_ACQUIRE_TIMEOUT_S, or look for sessions held "
            "open too long"
        ) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        err = translate(exc)
        raise (err or Unavailable("cannot connect to the database")) from exc
