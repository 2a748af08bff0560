"""The service pool: datalayer_app without context, created lazily, timeouts enforced."""

from __future__ import annotations

import asyncio

import pytest

from datalayer import DataLayer, Settings, Timeout, Unavailable
from datalayer.service_pool import ServicePool
from tests.conftest import make_settings


@pytest.mark.parametrize(("mode", "role"), [("session", "datalayer_app"),
                                            ("transaction", "postgres")])
async def test_connections_have_no_context_and_the_expected_role(
    settings: Settings, mode: str, role: str,
) -> None:
    """Session mode: SET ROLE datalayer_app. Transaction mode (PgBouncer): no session
    state at all, so the login role (here the test superuser)."""
    pool = ServicePool(make_settings(settings.database_url, context_mode=mode))
    try:
        conn = await pool.acquire(5.0)
        try:
            row = await conn.fetchrow(
                "SELECT current_user AS role, current_setting('app.org_id', true) AS org, "
                "current_setting('transaction_read_only') AS ro")
        finally:
            await pool.release(conn)
    finally:
        await pool.close()
    assert row is not None
    assert (row["role"], row["org"] or "", row["ro"]) == (role, "", "off")


async def test_nothing_connects_until_used_and_a_closed_pool_refuses(settings: Settings
                                                                     ) -> None:
    pool = ServicePool(make_settings("postgresql://postgres@127.0.0.1:1/nowhere"))
    await pool.close()  # never used: nothing to close, no error
    with pytest.raises(Unavailable, match="service pool is closed"):
        await pool.acquire(1.0)
    pool.open()
    with pytest.raises(Unavailable, match="connection"):
        await pool.acquire(1.0)
    await pool.close()


async def test_acquire_is_bounded_when_every_connection_is_busy(settings: Settings) -> None:
    pool = ServicePool(settings, max_size=1)
    try:
        held = await pool.acquire(5.0)
        started = asyncio.get_running_loop().time()
        with pytest.raises(Timeout, match=r"no service connection within 0\.1s"):
            await pool.acquire(0.1)
        assert asyncio.get_running_loop().time() - started < 0.5
        await pool.release(held)
        await pool.release(await pool.acquire(0.1))
    finally:
        await pool.close()


async def test_the_datalayer_owns_one(dl: DataLayer) -> None:
    assert isinstance(dl.service_pool, ServicePool)
    assert dl.limiter.backend.name == "postgres" and dl.web_sessions.store == "postgres"
