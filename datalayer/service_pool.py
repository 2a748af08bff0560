"""The service pool: connections for infrastructure calls made outside any tenant session.

Rate-limit checks and web-session lookups happen before (or beside) a request's tenant
context, on every request, and must cost one round trip. A tenant session cannot give
that: it applies a context, and in ``session`` context mode its connections default to
read-only transactions, so a write needs ``BEGIN READ WRITE`` … ``COMMIT`` around it.

So these calls get a pool of their own. Every connection runs as ``datalayer_app`` (no
BYPASSRLS, owns nothing; in ``transaction`` context mode the login role, see ``_create``)
with no ``app.*`` context, in autocommit, and is never handed to a session, so no context
is ever set on it or has to be reset. What it may do is what the SECURITY DEFINER
functions granted to ``datalayer_app`` allow; those refuse to run inside a tenant
context, and this pool never has one. The pool is created on first use and connects
lazily (``min_size`` 0), so a DataLayer that never needs it opens nothing; it grows to
half of ``DATALAYER_POOL_MAX`` (at least 2) under load and closes those idle for a
minute.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from datalayer.core.context import APP_ROLE
from datalayer.core.database import _init_connection  # the DataLayer's jsonb/json codecs
from datalayer.core.errors import Timeout, Unavailable, translate
from datalayer.settings import Settings

__all__ = ["ServicePool"]


async def _init_app_connection(conn: asyncpg.Connection) -> None:
    await _init_connection(conn)
    await conn.execute(f"SET ROLE {APP_ROLE}")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Nothing to reset: no context is ever applied on these connections (asyncpg has
    already rolled back a transaction left open)."""


class ServicePool:
    """A lazily created asyncpg pool of ``datalayer_app`` connections without context."""

    def __init__(self, settings: Settings, *, max_size: int | None = None) -> None:
        self._settings = settings
        # Half the main pool: each call is one short statement in autocommit.
        self._max_size = max_size or max(2, settings.pool_max_size // 2)
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def _create(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                s = self._settings
                server_settings = {"application_name": f"{s.application_name}:service"}
                if s.statement_timeout_ms:
                    server_settings["statement_timeout"] = str(s.statement_timeout_ms)
                # Behind PgBouncer transaction pooling (context mode "transaction") a
                # session-level SET ROLE would stay on a server connection other clients
                # get next; there the calls run as the login role, which holds
                # datalayer_app's privileges by membership (granted by the migrations).
                init = (_init_connection if s.context_mode == "transaction"
                        else _init_app_connection)
                self._pool = await asyncpg.create_pool(
                    s.database_url, min_size=0, max_size=self._max_size, init=init,
                    reset=_no_reset, server_settings=server_settings,
                    statement_cache_size=s.statement_cache_size,
                    max_inactive_connection_lifetime=60.0, timeout=s.connect_timeout_s)
            return self._pool

    async def acquire(self, timeout_s: float) -> Any:
        """A connection within ``timeout_s`` seconds (connecting if needed), else
        ``Timeout``; ``Unavailable`` when the server cannot be reached. Release it."""
        pool = self._pool
        if pool is None:
            if self._closed:
                raise Unavailable("the service pool is closed")
            pool = await self._create()
        # Always with a timer: a free holder in asyncpg's queue may still have to connect
        # (min_size is 0), and the timeout must bound that too. asyncio.timeout rather
        # than acquire(timeout=…), whose wait_for starts a task per call (~15 us); a
        # cancelled acquire puts its holder back (asyncpg's _acquire_impl).
        try:
            async with asyncio.timeout(timeout_s):
                return await pool.acquire()
        except TimeoutError:
            raise Timeout(f"no service connection within {timeout_s:g}s") from None
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise (translate(exc) or Unavailable("cannot connect to the database")) from exc

    def open(self) -> None:
        """Allow use again after :meth:`close` (the DataLayer calls it in ``start``)."""
        self._closed = False

    async def release(self, conn: Any) -> None:
        pool = self._pool
        if pool is not None:
            await pool.release(conn)

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
