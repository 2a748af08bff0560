"""Rate limiting: exactness under real concurrency on every backend, fail modes on a dying
backend, violations aggregated per key and window, keys, and the settings syntax.

The exactness runs use the backends' own clocks: a decision carries the server time it was
made at, and from that time the number of requests a limit may have admitted is an exact
integer, so the tests compare counts, never wall-clock guesses.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from datalayer import (
    ConfigError,
    Context,
    DataLayer,
    PermissionDenied,
    RateLimited,
    Settings,
    Unavailable,
    ValidationError,
)
from datalayer.ratelimit import (
    DEFAULT_RATE_LIMITS,
    Backend,
    Limit,
    Limiter,
    MemoryBackend,
    Outcome,
    PostgresBackend,
    PostgresViolationStore,
    RedisBackend,
    Violation,
    Violations,
    build_key,
    parse_limits,
    sweep_buckets,
)
from datalayer.ratelimit.memory import step
from datalayer.service_pool import ServicePool
from tests.conftest import make_settings

BACKENDS = ("memory", "redis", "postgres")
ALGORITHMS = ("token_bucket", "gcra")
CLIENTS = 64
# Requests per client in the exactness runs. The memory backend runs the full 64 x 1,000;
# over a network each check is a round trip (64,000 take ~5 s on Redis, ~8 s on
# PostgreSQL here), so those make 64 x 16 = 1,024 requests against the same contention
# unless DATALAYER_TEST_RL_REQUESTS_PER_CLIENT asks for more.
PER_CLIENT = {"memory": 1000,
              "redis": int(os.environ.get("DATALAYER_TEST_RL_REQUESTS_PER_CLIENT", "16")),
              "postgres": int(os.environ.get("DATALAYER_TEST_RL_REQUESTS_PER_CLIENT", "16"))}


@pytest.fixture
async def backends(dl: DataLayer, redis_url: str, redis_client: aioredis.Redis,
                   redis_prefix: str) -> AsyncIterator[dict[str, Backend]]:
    """One backend of each kind; generous timeouts (64 clients queue for 8 connections)."""
    made: dict[str, Backend] = {
        "memory": MemoryBackend(),
        "redis": RedisBackend(redis_url, prefix=redis_prefix, timeout_s=5.0),
        "postgres": PostgresBackend(dl.service_pool, dl.registry["ratelimit.check"],
                                    timeout_s=5.0),
    }
    yield made
    for b in made.values():
        await b.close()


def fresh(name: str = "op") -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


# -- limits and settings ------------------------------------------------------------------

def test_limit_derives_interval_and_capacity() -> None:
    lim = Limit(100, 1.0, burst=50)
    assert (lim.interval_us, lim.capacity) == (10_000, 150)
    assert Limit(3, 1.0).interval_us == 333_333  # rounded to a whole microsecond
    assert Limit(5, 60, by=("user", "ip")).by == ("user", "ip")
    assert Limit(5, 60, by=("ip", "org")).by == ("org", "ip")  # canonical order


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rate": 0, "period_s": 1}, "rate must be an integer >= 1"),
    ({"rate": 1, "period_s": 0}, "period_s must be > 0"),
    ({"rate": 1, "period_s": 1, "burst": -1}, "burst must be an integer >= 0"),
    ({"rate": 1, "period_s": 1, "algorithm": "leaky"}, "algorithm must be one of"),
    ({"rate": 2_000_000, "period_s": 1}, "more than one request per microsecond"),
    ({"rate": 1, "period_s": 1, "by": ("user", "user")}, "distinct dimensions"),
    ({"rate": 1, "period_s": 1, "by": ("tenant",)}, "distinct dimensions"),
    ({"rate": 1, "period_s": 86400 * 365 * 40}, "too large"),
])
def test_limit_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Limit(**kwargs)


def test_parse_limits_reads_the_documented_syntax() -> None:
    limits = parse_limits("login=5/60s burst 0 fail_closed by ip; api=100/1s burst 50 gcra\n"
                          "export=10/h; search=3/0.5s by user,org; default=1000/1m")
    assert limits["login"] == Limit(5, 60.0, fail_open=False, by=("ip",))
    assert limits["api"] == Limit(100, 1.0, burst=50, algorithm="gcra")
    assert limits["export"] == Limit(10, 3600.0)
    assert limits["search"] == Limit(3, 0.5, by=("org", "user"))
    assert limits["default"] == Limit(1000, 60.0)
    assert parse_limits("") == {}
    assert Limit.parse("2/100ms burst 1") == Limit(2, 0.1, burst=1)


@pytest.mark.parametrize(("text", "message"), [
    ("login=5", r"entry 1 \('login=5'\) must look like"),
    ("login=5/60x", "must look like"),
    ("a=1/s; login=5/60s burst", r"entry 2 \('login=5/60s burst'\): unexpected 'burst'"),
    ("login=5/60s fast", "unexpected 'fast'"),
    ("login=5/60s by", "'by' needs one or more of org, user, ip"),
    ("log in=5/60s", "must look like"),
    ("l|x=5/60s", "the name must be 1-64 letters"),
    ("a=1/s; a=2/s", "names 'a' twice"),
    ("a=0/s", "rate must be an integer >= 1"),
])
def test_parse_limits_errors_name_the_variable_and_entry(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"DATALAYER_RATE_LIMITS.*{message}"):
        parse_limits(text)


def test_settings_read_and_validate_the_rate_limit_variables() -> None:
    s = Settings.from_env({"DATALAYER_RATE_LIMITS": "login=5/60s", "REDIS_URL": "redis://r:1/0",
                           "DATALAYER_RATELIMIT_TIMEOUT_MS": "50",
                           "DATALAYER_RATELIMIT_PREFIX": "app1:"})
    assert (s.rate_limits, s.ratelimit_timeout_ms, s.ratelimit_prefix) == \
        ("login=5/60s", 50, "app1:")
    assert s.ratelimit_backend_name == "redis"
    assert Settings.from_env({}).ratelimit_backend_name == "postgres"
    assert Settings().rate_limits == DEFAULT_RATE_LIMITS
    assert Settings.from_env({"DATALAYER_RATELIMIT_BACKEND": "memory"}) \
        .ratelimit_backend_name == "memory"
    for env, message in [
        ({"DATALAYER_RATE_LIMITS": "login=five/60s"}, "DATALAYER_RATE_LIMITS entry 1"),
        ({"DATALAYER_RATELIMIT_BACKEND": "redis"}, "DATALAYER_RATELIMIT_BACKEND=redis needs"),
        ({"DATALAYER_RATELIMIT_BACKEND": "etcd"}, "DATALAYER_RATELIMIT_BACKEND must be"),
        ({"DATALAYER_RATELIMIT_TIMEOUT_MS": "0"}, "DATALAYER_RATELIMIT_TIMEOUT_MS must be"),
        ({"DATALAYER_RATELIMIT_TIMEOUT_MS": "x"}, "DATALAYER_RATELIMIT_TIMEOUT_MS must be an"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Settings.from_env(env)


# -- the arithmetic -----------------------------------------------------------------------

@given(st.lists(st.tuples(st.integers(0, 3_000_000), st.integers(1, 5)), max_size=60),
       st.integers(1, 50), st.integers(1, 2_000_000), st.integers(0, 10))
def test_token_bucket_and_gcra_decide_alike_and_never_overspend(
        steps: list[tuple[int, int]], rate: int, interval: int, burst: int) -> None:
    """The two algorithms are one limit in two representations: every decision, remaining
    count and wait agrees; and no prefix of the run spends more than capacity plus what
    has refilled since the first request."""
    capacity = rate + burst
    tb: tuple[int, int] | None = None
    gc: tuple[int, int] | None = None
    now = t0 = 1_700_000_000_000_000
    spent = 0
    for delta, cost in steps:
        now += delta
        cost = min(cost, capacity)
        tb, a = step(tb, now, gcra=False, interval=interval, capacity=capacity, cost=cost)
        gc, b = step(gc, now, gcra=True, interval=interval, capacity=capacity, cost=cost)
        assert a == b
        if a.allowed:
            spent += cost
        assert spent * interval <= capacity * interval + (now - t0)
        assert a.allowed or a.retry_after_us > 0


def test_a_clock_step_back_grants_nothing() -> None:
    state, out = step(None, 10_000_000, gcra=False, interval=1_000_000, capacity=1, cost=1)
    assert out.allowed
    state, out = step(state, 5_000_000, gcra=False, interval=1_000_000, capacity=1, cost=1)
    assert not out.allowed and out.now_us == 10_000_000 and out.retry_after_us == 1_000_000


# -- exactness under concurrency ----------------------------------------------------------

async def hammer(limiter: Limiter, op: str, limit: Limit, per_client: int) -> int:
    """CLIENTS tasks, ``per_client`` checks each, all on one key; the number admitted."""
    admitted = 0

    async def client() -> None:
        nonlocal admitted
        for _ in range(per_client):
            d = await limiter.check(op, user_id="shared", limit=limit)
            assert not d.degraded
            admitted += d.allowed

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return admitted


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize(("rate", "burst"), [(100, 0), (60, 40)])
async def test_concurrent_clients_admit_exactly_the_limit(
    backends: dict[str, Backend], kind: str, algorithm: str, rate: int, burst: int,
) -> None:
    """64 concurrent clients against a limit of N (+ burst): exactly N + burst pass, never
    more. The period is an hour, so nothing refills during the run."""
    limit = Limit(rate, 3600.0, burst=burst, algorithm=algorithm)  # type: ignore[arg-type]
    limiter = Limiter(backends[kind])
    assert await hammer(limiter, fresh(), limit, PER_CLIENT[kind]) == rate + burst
    # Every rejection counted, in one row per (key, 60 s window) the run touched.
    rows = await limiter.flush()
    assert sum(v.count for v in rows) == CLIENTS * PER_CLIENT[kind] - (rate + burst)
    assert len({v.key for v in rows}) == 1 and len(rows) <= 2


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("kind", BACKENDS)
async def test_admissions_across_refill_boundaries_are_exact(
    backends: dict[str, Backend], kind: str, algorithm: str,
) -> None:
    """64 clients hammer one key of a 20-per-0.5 s limit with burst 5 (a refill every
    25 ms) until the backend's clock has moved 0.55 s past the first request, across a
    period boundary. On that clock, with t0 the first request: every admission at t is
    within capacity + floor((t - t0) / interval) of all admissions up to t, and every
    rejection at t sees exactly that many."""
    limit = Limit(20, 0.5, burst=5, algorithm=algorithm)  # type: ignore[arg-type]
    backend = backends[kind]
    await asyncio.gather(*(backend.check(fresh("warm"), limit, 1) for _ in range(CLIENTS)))
    key = build_key(fresh(), limit)
    outcomes: list[Outcome] = []
    first: list[int] = []
    deadline = time.monotonic() + 5.0  # a safety net; the server clock ends the run

    async def client() -> None:
        while time.monotonic() < deadline:
            o = await backend.check(key, limit, 1)
            outcomes.append(o)
            if not first:
                first.append(o.now_us)
            elif o.now_us - first[0] >= 550_000:
                return

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    t0 = min(o.now_us for o in outcomes)
    admitted = sorted(o.now_us for o in outcomes if o.allowed)
    denied = [o.now_us for o in outcomes if not o.allowed]
    assert admitted[0] == t0 and denied, "the run must start the key and hit the limit"
    span = max(o.now_us for o in outcomes) - t0
    assert span >= 500_000, "the run must cross a period boundary"

    def allowance(t: int) -> int:
        return limit.capacity + (t - t0) // limit.interval_us

    for t in admitted:
        assert bisect.bisect_right(admitted, t) <= allowance(t)
    for t in denied:
        assert bisect.bisect_right(admitted, t) == allowance(t)
    assert len(admitted) >= limit.capacity + 20  # burst, then at least one period's refill


# -- keys ---------------------------------------------------------------------------------

def test_keys_combine_operation_org_user_and_ip() -> None:
    org, user = uuid.uuid4(), uuid.uuid4()
    any_dims = Limit(1, 1)
    assert build_key("login", any_dims) == "tb:login"
    assert build_key("login", any_dims, user_id=user) == f"tb:login|u={user}"
    assert build_key("api", Limit(1, 1, algorithm="gcra"), org_id=org, user_id="svc-7",
                     ip="192.0.2.10") == f"gcra:api|o={org}|u=svc-7|i=192.0.2.10"
    by_ip = Limit(1, 1, by=("ip",))
    assert build_key("login", by_ip, user_id=user, org_id=org, ip="192.0.2.1") == \
        "tb:login|i=192.0.2.1"
    # IPv6 by its /64; IPv4-mapped IPv6 as IPv4.
    assert build_key("x", by_ip, ip="2001:db8::1") == build_key("x", by_ip, ip="2001:db8::ffff")
    assert build_key("x", by_ip, ip="2001:db8::1").endswith("|i=2001:db8::/64")
    assert build_key("x", by_ip, ip="2001:db8:0:1::1") != build_key("x", by_ip, ip="2001:db8::1")
    assert build_key("x", by_ip, ip="::ffff:192.0.2.1") == "tb:x|i=192.0.2.1"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"operation": "log in"}, "operation must be 1-64"),
    ({"ip": "999.1.1.1"}, "ip must be an IPv4 or IPv6 address"),
    ({"user_id": "a|u=b"}, "user_id must be a UUID or 1-128"),
    ({"org_id": ""}, "org_id must be a UUID or 1-128"),
])
def test_keys_refuse_values_that_could_collide(kwargs: dict[str, Any], message: str) -> None:
    operation = kwargs.pop("operation", "op")
    with pytest.raises(ValidationError, match=message):
        build_key(operation, Limit(1, 1), **kwargs)


async def test_each_key_combination_has_its_own_bucket() -> None:
    limiter = Limiter(MemoryBackend(), {"login": Limit(1, 60, by=("user", "ip")),
                                        "api": Limit(1, 60)})
    u1, u2 = uuid.uuid4(), uuid.uuid4()
    assert (await limiter.check("login", user_id=u1, ip="192.0.2.1")).allowed
    assert not (await limiter.check("login", user_id=u1, ip="192.0.2.1")).allowed
    assert (await limiter.check("login", user_id=u2, ip="192.0.2.1")).allowed
    assert (await limiter.check("login", user_id=u1, ip="192.0.2.2")).allowed
    assert (await limiter.check("api", user_id=u1, ip="192.0.2.1")).allowed  # other operation
    assert (await limiter.check("api", org_id=u1)).allowed
    with pytest.raises(ValidationError, match="keyed by user, ip: pass ip"):
        await limiter.check("login", user_id=u1)


async def test_limits_per_operation_with_a_default() -> None:
    limiter = Limiter(MemoryBackend(), parse_limits("login=2/60s; default=3/60s"))
    assert limiter.limit_for("login") == Limit(2, 60)
    assert limiter.limit_for("anything") == Limit(3, 60)
    assert [(await limiter.check("anything")).allowed for _ in range(4)] == [True] * 3 + [False]
    assert Limiter(MemoryBackend()).limit_for("x") == Limit(100, 1, burst=50)


async def test_cost_must_fit_the_bucket() -> None:
    limiter = Limiter(MemoryBackend(), default=Limit(2, 60, burst=1))
    assert (await limiter.check("op", cost=3)).remaining == 0
    for cost in (0, 4, True):
        with pytest.raises(ValidationError, match="cost must be an integer from 1 to 3"):
            await limiter.check("op", cost=cost)


async def test_enforce_raises_rate_limited_with_retry_after() -> None:
    limiter = Limiter(MemoryBackend(), default=Limit(1, 10))
    d = await limiter.enforce("op", user_id="u")
    assert d.allowed and d.remaining == 0 and d.reset_after == pytest.approx(10, abs=0.01)
    with pytest.raises(RateLimited, match="op: rate limit exceeded; retry in") as caught:
        await limiter.enforce("op", user_id="u")
    assert caught.value.retry_after == pytest.approx(10, abs=0.01)
    assert "u" not in str(caught.value).split(":", 1)[1]  # the key (user, IP) stays out


async def test_memory_backend_stays_bounded() -> None:
    clock = [1_000_000]
    backend = MemoryBackend(max_keys=100, clock=lambda: clock[0])
    limit = Limit(1, 1)
    for i in range(1000):
        await backend.check(f"k{i}", limit, 1)
        assert len(backend) <= 100
    clock[0] += 2_000_000  # every bucket full again: expired
    await backend.check("late", limit, 1)
    assert len(backend) == 1


# -- Redis specifics ----------------------------------------------------------------------

async def test_redis_buckets_live_under_the_prefix_until_full_again(
    backends: dict[str, Backend], redis_client: aioredis.Redis, redis_prefix: str,
) -> None:
    limit = Limit(2, 10.0)  # a request is worth 5 s
    key = build_key(fresh(), limit)
    stored = f"{redis_prefix}ratelimit:{key}"
    first = await backends["redis"].check(key, limit, 1)
    assert first.allowed and first.reset_after_us == 5_000_000
    assert 4_900 < await redis_client.pttl(stored) <= 5_001
    raw = await redis_client.get(stored)
    assert isinstance(raw, bytes)
    level, at = (int(x) for x in raw.split(b":"))
    assert (level, at) == (5_000_000, first.now_us)
    await backends["redis"].check(key, limit, 1)
    state = await redis_client.get(stored)
    denied = await backends["redis"].check(key, limit, 1)
    assert not denied.allowed
    assert await redis_client.get(stored) == state  # a rejection writes nothing


# -- PostgreSQL specifics -----------------------------------------------------------------

async def test_postgres_check_is_one_statement_refused_inside_a_tenant_session(
    dl: DataLayer, admin_conn: asyncpg.Connection,
) -> None:
    """datalayer_app reaches the buckets only through the definer function, and not from a
    tenant session (tenant code cannot spend or reset other keys)."""
    async with dl.session(Context(uuid.uuid4(), role="owner")) as db:
        with pytest.raises(PermissionDenied, match="outside tenant sessions"):
            async with db.savepoint():
                await db.one("ratelimit.check", key="k", gcra=False, interval_us=1, capacity=1,
                             cost=1)
    privileges = await admin_conn.fetchval(
        "SELECT bool_or(has_table_privilege('datalayer_app', t, p)) FROM "
        "unnest(ARRAY['rate_limit_buckets', 'rate_limit_violations']) t, "
        "unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']) p")
    assert privileges is False


async def test_postgres_function_validates_its_arguments(dl: DataLayer) -> None:
    backend = PostgresBackend(dl.service_pool, dl.registry["ratelimit.check"])
    lim = Limit(1, 1)
    with pytest.raises(ValidationError, match="rate limit arguments out of range"):
        await backend.check(fresh(), lim, 2)  # cost above capacity, bypassing the limiter


async def test_sweep_drops_only_full_buckets(dl: DataLayer,
                                              admin_conn: asyncpg.Connection) -> None:
    backend = PostgresBackend(dl.service_pool, dl.registry["ratelimit.check"])
    short, long_ = fresh("short"), fresh("long")
    await backend.check(short, Limit(1000, 0.01), 1)  # full again after 10 us
    await backend.check(long_, Limit(1, 3600), 1)
    await asyncio.sleep(0.01)
    await sweep_buckets(dl)
    keys = {r["key"] for r in await admin_conn.fetch(
        "SELECT key FROM rate_limit_buckets WHERE key = ANY($1)", [short, long_])}
    assert keys == {long_}
    assert not (await backend.check(long_, Limit(1, 3600), 1)).allowed


# -- violations ---------------------------------------------------------------------------

async def test_violations_are_one_row_per_key_and_window_with_the_count(
    dl: DataLayer, admin_conn: asyncpg.Connection,
) -> None:
    """Many rejections, two flushes: one row, count summed; the hook fires once, at the
    flush whose total crosses its threshold."""
    calls: list[Violation] = []
    async_calls: list[int] = []

    async def also(v: Violation) -> None:
        async_calls.append(v.count)

    violations = Violations(store=PostgresViolationStore(dl), window_s=3600)
    limiter = Limiter(MemoryBackend(), default=Limit(1, 3600), violations=violations)
    limiter.on_violation(calls.append, threshold=55)
    limiter.on_violation(also, threshold=1)
    op = fresh()
    for _ in range(51):
        await limiter.check(op, ip="198.51.100.7")
    first = await limiter.flush()
    assert [v.count for v in first] == [50] and calls == [] and async_calls == [50]
    for _ in range(10):
        await limiter.check(op, ip="198.51.100.7")
    await limiter.flush()
    await limiter.flush()  # nothing pending: no row, no hook
    rows = await admin_conn.fetch(
        "SELECT key, operation, count, window_s, first_at <= last_at AS ordered "
        "FROM rate_limit_violations WHERE operation = $1", op)
    assert [dict(r) for r in rows] == [{"key": f"tb:{op}|i=198.51.100.7", "operation": op,
                                        "count": 60, "window_s": 3600, "ordered": True}]
    assert [(v.key, v.count) for v in calls] == [(f"tb:{op}|i=198.51.100.7", 60)]
    assert async_calls == [50]


async def test_violations_without_a_store_count_locally_and_survive_store_failures(
) -> None:
    class Failing:
        async def add(self, window_s: int, batch: Any) -> list[int]:
            raise ConnectionError("down")

    local = Violations(window_s=60)
    local.record("op", "k", 10_000_000)
    local.record("op", "k", 11_000_000)
    assert [v.count for v in await local.flush()] == [2]
    local.record("op", "k", 12_000_000)
    assert [v.count for v in await local.flush()] == [3]

    failing = Violations(store=Failing(), window_s=60)
    failing.record("op", "k", 10_000_000)
    with pytest.raises(ConnectionError):
        await failing.flush()
    failing.record("op", "k", 10_500_000)
    assert failing.pending == 1  # kept, merged with the new one

    capped = Violations(max_pending=1)
    capped.record("op", "a", 1)
    capped.record("op", "b", 1)
    assert (capped.pending, capped.dropped) == (1, 1)


async def test_hook_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(v: Violation) -> None:
        raise RuntimeError("pager down")

    v = Violations()
    v.on_violation(broken)
    v.record("op", "k", 1)
    with caplog.at_level(logging.ERROR, logger="datalayer.ratelimit"):
        assert len(await v.flush()) == 1
    assert "violation hook failed" in caplog.text


async def test_datalayer_limiter_flushes_violations_in_the_background(
    settings: Settings, admin_conn: asyncpg.Connection,
) -> None:
    s = make_settings(settings.database_url, migrate_on_start=False,
                      ratelimit_backend="postgres", rate_limits="demo=1/60s; default=5/1s")
    async with DataLayer(s) as layer:
        limiter = layer.limiter
        assert isinstance(limiter.backend, PostgresBackend)
        await limiter.close()
        limiter.flush_interval_s = 0.05  # the test does not wait a second
        await limiter.start()
        user = uuid.uuid4()
        assert (await limiter.check("demo", user_id=user)).allowed
        assert not (await limiter.check("demo", user_id=user)).allowed
        for _ in range(100):
            if await admin_conn.fetchval(
                    "SELECT count FROM rate_limit_violations WHERE key = $1",
                    f"tb:demo|u={user}"):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the background flush did not write the violation")


# -- fail modes ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def doomed_redis(redis_url: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own, on a free port, to stop and kill."""
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--bind", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        0.1):
                break
            time.sleep(0.01)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


OPEN, CLOSED = Limit(5, 60), Limit(5, 60, fail_open=False)


async def assert_fail_modes(limiter: Limiter, budget_s: float) -> None:
    """The next checks are decided by the fail mode, each within ``budget_s``."""
    for limit in (OPEN, CLOSED, OPEN):
        started = time.monotonic()
        d = await limiter.check("op", user_id="u", limit=limit)
        assert time.monotonic() - started < budget_s
        assert d.degraded
        if limit.fail_open:
            assert d.allowed and d.remaining == 4
        else:
            assert not d.allowed and d.retry_after == 1.0
    with pytest.raises(RateLimited, match="unavailable and this limit fails closed"):
        await limiter.enforce("op", user_id="u", limit=CLOSED)


async def test_redis_death_is_decided_by_the_fail_mode_within_the_timeout(
    doomed_redis: tuple[str, subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture,
) -> None:
    url, proc = doomed_redis
    limiter = Limiter(RedisBackend(url, timeout_s=0.2), breaker_s=0.5)
    try:
        assert not (await limiter.check("op", user_id="u", limit=OPEN)).degraded
        # Hung (SIGSTOP): the connection is up, nothing answers. Decided at the timeout.
        os.kill(proc.pid, signal.SIGSTOP)
        with caplog.at_level(logging.WARNING, logger="datalayer.ratelimit"):
            await assert_fail_modes(limiter, budget_s=0.45)
            await assert_fail_modes(limiter, budget_s=0.05)  # the breaker: no waiting
        assert caplog.text.count("unreachable") == 1  # logged once per interval
        os.kill(proc.pid, signal.SIGCONT)
        await asyncio.sleep(0.55)
        assert not (await limiter.check("op", user_id="u", limit=OPEN)).degraded
        # Dead (SIGKILL): connection refused.
        proc.kill()
        proc.wait()
        await assert_fail_modes(limiter, budget_s=0.45)
    finally:
        await limiter.close()


async def test_a_read_only_redis_replica_is_decided_by_the_fail_mode(
    doomed_redis: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """After a failover the address may answer as a replica: error replies about the
    server's state (READONLY, OOM, LOADING, …) go to the fail mode, not to the caller."""
    url, _ = doomed_redis
    client = aioredis.Redis.from_url(url)
    limiter = Limiter(RedisBackend(url, timeout_s=0.2))
    try:
        await client.replicaof("127.0.0.1", free_port())
        await assert_fail_modes(limiter, budget_s=0.45)
    finally:
        await limiter.close()
        await client.aclose()


async def test_postgres_unreachable_is_decided_by_the_fail_mode_within_the_timeout(
    dl: DataLayer, settings: Settings,
) -> None:
    """Refused connections, and a server that accepts but never answers."""
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # hold the connection, answer nothing

    hung = await asyncio.start_server(silent, "127.0.0.1", 0)
    hung_port = hung.sockets[0].getsockname()[1]
    try:
        for port in (free_port(), hung_port):
            url = f"postgresql://postgres@127.0.0.1:{port}/nowhere"
            pool = ServicePool(make_settings(url, connect_timeout_s=5.0))
            limiter = Limiter(PostgresBackend(pool, dl.registry["ratelimit.check"],
                                              timeout_s=0.2), breaker_s=0.3)
            try:
                await assert_fail_modes(limiter, budget_s=0.45)
            finally:
                await limiter.close()
                await pool.close()
    finally:
        for w in writers:
            w.close()
        hung.close()
        await hung.wait_closed()


async def test_a_probe_after_the_breaker_restores_the_backend() -> None:
    class Flaky:
        name = "flaky"

        def __init__(self) -> None:
            self.up = False
            self.calls = 0
            self.inner = MemoryBackend()

        async def check(self, key: str, limit: Limit, cost: int) -> Outcome:
            self.calls += 1
            await asyncio.sleep(0)  # a round trip: other checks run meanwhile
            if not self.up:
                raise Unavailable("down")
            return await self.inner.check(key, limit, cost)

        async def close(self) -> None:
            pass

    flaky = Flaky()
    limiter = Limiter(flaky, default=Limit(100, 1), breaker_s=0.05)
    assert (await limiter.check("op")).degraded
    assert (await limiter.check("op")).degraded and flaky.calls == 1  # breaker open
    flaky.up = True
    await asyncio.sleep(0.06)
    results = await asyncio.gather(*(limiter.check("op") for _ in range(5)))
    assert not results[0].degraded  # the probe
    assert all(r.degraded for r in results[1:])  # decided while the probe was out
    assert not (await limiter.check("op")).degraded and flaky.calls == 3


async def test_demo_section_rejects_after_the_burst_with_retry_after(dl: DataLayer) -> None:
    import io

    from datalayer.demo import _ratelimit

    out = io.StringIO()
    await _ratelimit(dl, out)
    text = out.getvalue()
    assert "request 5: allowed, 0 remaining" in text
    assert "request 6: rejected, retry after 0." in text
    assert "RateLimited: demo.api: rate limit exceeded; retry in" in text
    assert "after waiting that long: allowed" in text
    assert "rejections of tb:demo.api|u=" in text  # 2, unless a minute boundary split them
