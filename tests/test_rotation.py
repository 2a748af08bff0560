"""Online key rotation on a database of its own (keys change here): every registered
encrypted column, batches, compare-and-swap against concurrent writers, crash and cancel
mid-run then resume, idempotence, reads under both keys during the run."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from datalayer import Context, DataLayer
from datalayer.core.errors import ConfigError
from datalayer.security.keyring import DecryptionError, Keyring
from datalayer.security.rotation import (
    RotationIncomplete,
    RotationProgress,
    encrypted_columns,
    remaining,
    rotate,
)
from tests.conftest import (
    RUN_ID,
    create_database,
    drop_database,
    make_layer,
    make_settings,
)

OLD = "old:" + base64.b64encode(b"o" * 32).decode()
NEW = "new:" + base64.b64encode(b"n" * 32).decode()
TENANTS, PER_TENANT = 3, 9


@pytest.fixture
def url() -> Iterator[str]:
    from datalayer.core import migrations
    from datalayer.core.resources import resource_dir

    name = f"dl_test_{RUN_ID}_rot_{uuid.uuid4().hex[:6]}"
    url = create_database(name)
    try:
        migrations.apply(make_settings(url), resource_dir("schema"))
        yield url
    finally:
        drop_database(name)


def layer(url: str, keys: str) -> DataLayer:
    return make_layer(make_settings(url, keys=keys, migrate_on_start=False))


@dataclass
class Seeded:
    owners: list[Context]
    creds: dict[uuid.UUID, tuple[Context, dict[str, str]]]
    totp_users: list[uuid.UUID]


async def seed(dl: DataLayer) -> Seeded:
    owners, creds, users = [], {}, []
    for t in range(TENANTS):
        org, uid = uuid.uuid4(), uuid.uuid4()
        owner = Context(org, user_id=uid, role="owner")
        async with dl.session(owner) as db:
            await db.orgs.create(slug=f"rot-{org.hex[:10]}", name=f"Rot {t}")
            await db.users.create(email=f"rot-{uid.hex[:10]}@example.test")
            await db.memberships.add(uid, "owner")
            await db.auth.enable_2fa(account="rot")
            for i in range(PER_TENANT):
                payload = {"key": f"secret-{t}-{i}"}
                c = await db.credentials.create(f"cred {i}", "api_key", payload)
                creds[c.id] = (owner, payload)
        owners.append(owner)
        users.append(uid)
    return Seeded(owners, creds, users)


async def check_all_decrypt(dl: DataLayer, s: Seeded,
                            expect: dict[uuid.UUID, dict[str, str]] | None = None) -> None:
    for cid, (owner, payload) in s.creds.items():
        async with dl.session(owner) as db:
            assert (await db.credentials.decrypt(cid)).payload == (expect or {}).get(cid,
                                                                                     payload)
    async with dl.system() as db:
        for uid in s.totp_users:
            blob = await db.connection.fetchval("SELECT totp_secret FROM users WHERE id = $1",
                                                uid)
            assert len(dl.keyring.decrypt(blob, org_id=None, table="users", row_id=uid,
                                          column="totp_secret")) >= 20


async def kids(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT app.keyring_kid(secret) AS kid, count(*) AS n FROM credentials GROUP BY 1 "
        "UNION ALL SELECT app.keyring_kid(totp_secret), count(*) FROM users "
        "WHERE totp_secret IS NOT NULL GROUP BY 1")
    out: dict[str, int] = {}
    for r in rows:
        out[r["kid"]] = out.get(r["kid"], 0) + r["n"]
    return out


async def test_registry_lists_every_encrypted_column(url: str) -> None:
    async with layer(url, OLD) as dl:
        names = {c.name for c in await encrypted_columns(dl)}
    assert {"users.totp_secret", "credentials.secret"} <= names


async def test_rotation_reencrypts_everything_and_is_idempotent(url: str) -> None:
    async with layer(url, OLD) as old:
        s = await seed(old)
    conn = await asyncpg.connect(url)
    try:
        total = TENANTS * (PER_TENANT + 1)
        assert await kids(conn) == {"old": total}
        async with layer(url, f"{NEW},{OLD}") as dl:
            await check_all_decrypt(dl, s)  # old rows read under the new ring
            stamps = await conn.fetch("SELECT id, updated_at FROM credentials ORDER BY id")
            seen: list[RotationProgress] = []
            report = await rotate(dl, batch=4, progress=seen.append)
            assert {k: v for k, v in report.rotated.items() if v} == {
                "credentials.secret": TENANTS * PER_TENANT, "users.totp_secret": TENANTS}
            assert not report.failed and sum(report.skipped.values()) == 0
            last = [p for p in seen if p.column == "credentials.secret"][-1]
            assert last.rotated == last.total == TENANTS * PER_TENANT and last.batch == 7
            assert await kids(conn) == {"new": total}
            # a re-encrypted value is the same value: updated_at stays
            assert await conn.fetch("SELECT id, updated_at FROM credentials ORDER BY id") == stamps
            left = await remaining(dl, "new")
            assert {"credentials.secret", "users.totp_secret"} <= set(left)
            assert not any(left.values())
            before = await conn.fetch("SELECT id, secret, updated_at FROM credentials")
            again = await rotate(dl, batch=4)
            assert again.total_rotated == 0 and again.batches == 0 and again.passes == 0
            assert await conn.fetch("SELECT id, secret, updated_at FROM credentials") == before
        async with layer(url, NEW) as only_new:  # the old key can go now
            await check_all_decrypt(only_new, s)
        async with layer(url, OLD) as only_old:
            owner, _ = next(iter(s.creds.values()))
            with pytest.raises(DecryptionError):
                async with only_old.session(owner) as db:
                    await db.credentials.decrypt(next(iter(s.creds)))
    finally:
        await conn.close()


class Crash(Exception):
    pass


async def test_crash_and_cancel_mid_run_then_resume(url: str) -> None:
    async with layer(url, OLD) as old:
        s = await seed(old)
    conn = await asyncpg.connect(url)
    try:
        async with layer(url, f"{NEW},{OLD}") as dl:
            def crash(p: RotationProgress) -> None:
                if p.batch == 2:
                    raise Crash

            with pytest.raises(Crash):
                await rotate(dl, batch=3, progress=crash)
            partial = await kids(conn)
            assert partial.get("new", 0) > 0 and partial.get("old", 0) > 0
            await check_all_decrypt(dl, s)  # mixed keys: every row still reads

            batches = 0
            gate = asyncio.Event()

            def count(p: RotationProgress) -> None:
                nonlocal batches
                batches += 1
                if batches == 2:
                    gate.set()

            task = asyncio.create_task(rotate(dl, batch=2, progress=count))
            await gate.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            mid = await kids(conn)
            assert mid.get("new", 0) > partial["new"] and mid.get("old", 0) > 0

            report = await rotate(dl, batch=3)
            assert report.total_rotated == mid["old"]
            assert await kids(conn) == {"new": TENANTS * (PER_TENANT + 1)}
            await check_all_decrypt(dl, s)
    finally:
        await conn.close()


async def test_concurrent_writers_are_never_overwritten(url: str) -> None:
    """Writers under the new ring and under the old ring (a process not yet restarted)
    change rows during the run: rows being rotated (the rotation's compare-and-swap waits on
    the writer's row lock, then skips), and rows already rotated. No write is lost, and the
    run still ends with every row under the new key."""
    async with layer(url, OLD) as old_dl:
        s = await seed(old_dl)
        conn = await asyncpg.connect(url)
        watch = await asyncpg.connect(url)
        ids = sorted(s.creds, key=lambda c: (s.creds[c][0].org_id, c))
        expect: dict[uuid.UUID, dict[str, str]] = {}
        try:
            async with layer(url, f"{NEW},{OLD}") as dl:
                first_batch = ids[:3]
                contested = ids[4]  # in the second batch
                writer_done, locked = asyncio.Event(), asyncio.Event()

                async def old_writer_holding_lock() -> None:
                    owner = s.creds[contested][0]
                    async with old_dl.session(owner) as db:
                        await db.credentials.update(contested, payload={"key": "v2-old"})
                        locked.set()
                        # hold the row lock until the rotation's UPDATE waits on it
                        for _ in range(400):
                            waiting = await watch.fetchval(
                                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type "
                                "= 'Lock' AND query LIKE 'UPDATE public.\"credentials\"%'")
                            if waiting:
                                break
                            await asyncio.sleep(0.01)
                        else:
                            raise AssertionError("the rotation never waited on the row lock")
                    writer_done.set()

                async def on_batch(p: RotationProgress) -> None:
                    if p.column != "credentials.secret" or p.batch != 1 or expect:
                        return
                    # rows already rotated: one rewritten under the new ring, one under the old
                    for cid, ring, value in ((first_batch[0], dl, "v2-new"),
                                             (first_batch[1], old_dl, "v2-legacy")):
                        async with ring.session(s.creds[cid][0]) as db:
                            await db.credentials.update(cid, payload={"key": value})
                        expect[cid] = {"key": value}
                    expect[contested] = {"key": "v2-old"}
                    writer.append(asyncio.create_task(old_writer_holding_lock()))
                    await locked.wait()  # the writer holds the row lock before the next read

                writer: list[asyncio.Task[None]] = []
                report = await rotate(dl, batch=3, progress=on_batch)
                await writer[0]
                assert writer_done.is_set()
                assert report.skipped["credentials.secret"] >= 1
                assert report.passes >= 2
                assert await kids(conn) == {"new": TENANTS * (PER_TENANT + 1)}
                await check_all_decrypt(dl, s, expect)
        finally:
            await conn.close()
            await watch.close()


async def test_undecryptable_rows_fail_the_final_check(url: str) -> None:
    async with layer(url, OLD) as old:
        s = await seed(old)
    conn = await asyncpg.connect(url)
    try:
        cid = next(iter(s.creds))
        blob = bytearray(await conn.fetchval("SELECT secret FROM credentials WHERE id = $1",
                                             cid))
        blob[-1] ^= 1
        await conn.execute("UPDATE credentials SET secret = $1 WHERE id = $2", bytes(blob), cid)
        async with layer(url, f"{NEW},{OLD}") as dl:
            with pytest.raises(RotationIncomplete, match=r"credentials\.secret: 1") as err:
                await rotate(dl, batch=50)
            assert "secret-" not in str(err.value)
        assert await kids(conn) == {"new": TENANTS * (PER_TENANT + 1) - 1, "old": 1}
    finally:
        await conn.close()


def test_cli_generate_and_rotate(url: str, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from datalayer.cli import main

    assert main(["keys", "generate", "--kid", "fresh"]) == 0
    line = capsys.readouterr().out.strip()
    kid, _, key = line.partition(":")
    assert kid == "fresh" and len(base64.b64decode(key)) == 32

    async def prepare() -> None:
        async with layer(url, OLD) as old:
            await seed(old)

    asyncio.run(prepare())
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("DATALAYER_KEYS", f"{line},{OLD}")
    monkeypatch.setenv("DATALAYER_MIGRATE_ON_START", "false")
    assert main(["keys", "rotate", "--batch", "5"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["active_kid"] == "fresh"
    assert report["rotated"]["credentials.secret"] == TENANTS * PER_TENANT
    assert "credentials.secret: batch 1" in out.err
    assert key not in out.err + out.out.replace(line, "")
    assert main(["keys", "rotate"]) == 0
    assert json.loads(capsys.readouterr().out)["batches"] == 0


async def test_rotation_of_one_organization_touches_only_its_rows(url: str) -> None:
    async with layer(url, OLD) as old:
        s = await seed(old)
    conn = await asyncpg.connect(url)
    try:
        async with layer(url, f"{NEW},{OLD}") as dl:
            org = s.owners[0].org_id
            report = await rotate(dl, batch=4, org_id=org)
            assert report.rotated == {"credentials.secret": PER_TENANT} | {
                k: 0 for k in report.rotated if k != "credentials.secret"}
            assert "users.totp_secret" not in report.rotated  # no org column: out of scope
            assert await kids(conn) == {"new": PER_TENANT,
                                        "old": TENANTS * (PER_TENANT + 1) - PER_TENANT}
            assert await conn.fetchval(
                "SELECT count(*) FROM credentials WHERE app.keyring_kid(secret) = 'new' "
                "AND org_id <> $1", org) == 0
            await check_all_decrypt(dl, s)
    finally:
        await conn.close()


def test_keyring_with_new_key_and_with_active() -> None:
    old = Keyring([("old", b"o" * 32)])
    place: dict[str, Any] = {"org_id": None, "table": "t", "row_id": "1", "column": "c"}
    blob = old.encrypt(b"v", **place)
    ring = old.with_new_key("new", b"n" * 32)
    assert ring.active_kid == "new" and ring.kids == ("new", "old")
    assert ring.decrypt(blob, **place) == b"v" and ring.needs_reencrypt(blob)
    back = ring.with_active("old")
    assert back.active_kid == "old" and back.kids == ("old", "new")
    assert Keyring.key_id_of(back.encrypt(b"v", **place)) == "old"
    assert old.kids == ("old",)  # the original is unchanged
    with pytest.raises(ConfigError):
        ring.with_new_key("old", b"x" * 32)
    with pytest.raises(ConfigError):
        ring.with_active("nope")
