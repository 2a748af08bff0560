"""Migrations: round trip, checksum ledger, concurrent starters, killed migrators, roles."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from datalayer import Context, DataLayer, SchemaDrift
from datalayer.core import migrations
from datalayer.core.resources import resource_dir
from tests.conftest import ADMIN_URL, RUN_ID, create_database, drop_database, make_settings

SCHEMA = resource_dir("schema")


@pytest.fixture
def fresh_db(database_url: str) -> Iterator[str]:
    """An empty database of its own (``database_url`` makes sure PostgreSQL is there)."""
    name = f"dl_mig_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    url = create_database(name)
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture
def schema_copy(tmp_path: Path) -> Path:
    target = tmp_path / "schema"
    shutil.copytree(SCHEMA, target)
    return target


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as c:
        rows = c.execute("SELECT relname FROM pg_class c JOIN pg_namespace n "
                         "ON n.oid = c.relnamespace WHERE relkind IN ('r', 'p', 'v', 'm') "
                         "AND nspname NOT IN ('pg_catalog', 'information_schema')").fetchall()
    return {r[0] for r in rows}


def test_apply_rollback_all_apply_again(fresh_db: str) -> None:
    s = make_settings(fresh_db)
    bookkeeping = {"_yoyo_migration", "_yoyo_log", "_yoyo_version", "yoyo_lock",
                   "_datalayer_checksums"}
    applied = migrations.apply(s, SCHEMA)
    assert applied == sorted(p.stem for p in SCHEMA.glob("*.sql")
                             if not p.name.endswith(".rollback.sql"))
    assert "organizations" in tables(fresh_db)
    rolled = migrations.rollback(s, SCHEMA, count=None)
    assert rolled == list(reversed(applied))
    assert tables(fresh_db) == bookkeeping, "a rollback file left something behind"
    with psycopg.connect(fresh_db) as c:
        assert c.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'app'"
                         ).fetchone() == (0,)
    assert migrations.apply(s, SCHEMA) == applied
    assert all(m.applied for m in migrations.status(s, SCHEMA))
    assert migrations.apply(s, SCHEMA) == [], "a second apply must be a no-op"


def test_edited_applied_migration_stops_startup(fresh_db: str, schema_copy: Path) -> None:
    s = make_settings(fresh_db)
    migrations.apply(s, schema_copy)
    edited = schema_copy / "0003_organizations.sql"
    edited.write_text(edited.read_text() + "\n-- harmless looking edit\n")
    with pytest.raises(SchemaDrift, match=r"0003_organizations\.sql changed after it was applied"):
        migrations.apply(s, schema_copy)
    with pytest.raises(SchemaDrift, match="0003_organizations"):
        migrations.verify(s, schema_copy)


async def test_edited_migration_refuses_datalayer_start(fresh_db: str,
                                                        schema_copy: Path) -> None:
    s = make_settings(fresh_db)
    migrations.apply(s, schema_copy)
    edited = schema_copy / "0002_app_context.sql"
    edited.write_text(edited.read_text().replace("STABLE", "VOLATILE", 1))
    for migrate in (True, False):
        layer = DataLayer(make_settings(fresh_db, migrate_on_start=migrate),
                          schema_dir=schema_copy)
        with pytest.raises(SchemaDrift, match="0002_app_context"):
            await layer.start()


def test_applied_migration_missing_from_code_is_drift(fresh_db: str,
                                                      schema_copy: Path) -> None:
    s = make_settings(fresh_db)
    migrations.apply(s, schema_copy)
    (schema_copy / "0003_organizations.sql").unlink()
    (schema_copy / "0003_organizations.rollback.sql").unlink()
    with pytest.raises(SchemaDrift, match=r"0003_organizations is applied .* missing"):
        migrations.apply(s, schema_copy)


async def test_pending_migrations_without_migrate_on_start_is_drift(fresh_db: str) -> None:
    layer = DataLayer(make_settings(fresh_db, migrate_on_start=False))
    with pytest.raises(SchemaDrift, match=r"\d+ migration\(s\) not applied"):
        await layer.start()


def _cli(url: str, *args: str, schema: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url, "DATALAYER_ENV": "testing"}
    code = "import sys; from datalayer.cli import main; sys.exit(main(sys.argv[1:]))"
    if schema is not None:  # run the migrator against another schema directory
        code = ("import sys; from pathlib import Path; from datalayer.core import migrations; "
                "from datalayer.settings import Settings; "
                f"print(migrations.apply(Settings.from_env(), Path({str(schema)!r})))")
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_concurrent_starters_all_come_up_and_one_applies(fresh_db: str) -> None:
    procs = [_cli(fresh_db, "migrate", "apply") for _ in range(4)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    appliers = [out for out, _ in outputs if "0001_roles" in out]
    idle = [out for out, _ in outputs if out.strip() == "nothing to apply"]
    assert (len(appliers), len(idle)) == (1, 3), outputs
    assert all(m.applied for m in migrations.status(make_settings(fresh_db), SCHEMA))


def test_killed_migrator_leaves_no_lock_behind(fresh_db: str, schema_copy: Path) -> None:
    last = max(p.stem for p in SCHEMA.glob("*.sql") if not p.name.endswith(".rollback.sql"))
    (schema_copy / "9999_slow.sql").write_text(f"-- depends: {last}\nSELECT pg_sleep(60);\n")
    (schema_copy / "9999_slow.rollback.sql").write_text("SELECT 1;\n")
    proc = _cli(fresh_db, schema=schema_copy)
    deadline = time.monotonic() + 30
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        while time.monotonic() < deadline:
            busy = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                 "AND query LIKE %s", (fresh_db.rsplit("/", 1)[1],
                                                       "%pg_sleep(60)%")).fetchone()
            if busy and busy[0]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the slow migration never started")
    with psycopg.connect(fresh_db) as c:
        assert c.execute("SELECT count(*) FROM yoyo_lock").fetchone() == (1,)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    started = time.monotonic()
    s = make_settings(fresh_db, migration_lock_timeout_s=20)
    assert migrations.apply(s, SCHEMA) == []  # all real ones were applied before the kill
    assert time.monotonic() - started < 10, "waited for a lock a dead process held"
    with psycopg.connect(fresh_db) as c:
        assert c.execute("SELECT count(*) FROM yoyo_lock").fetchone() == (0,)


async def test_non_superuser_login_role_is_granted_the_app_roles(fresh_db: str) -> None:
    login = f"dl_login_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {login} LOGIN")
    try:
        url = fresh_db.replace("postgres@", f"{login}@")
        s = make_settings(url, admin_url=fresh_db)
        org = uuid.uuid4()
        async with DataLayer(s) as dl:
            async with dl.session(Context(org, role="owner")) as db:
                await db.orgs.create(slug=f"l-{org.hex[:10]}", name="Login role")
                assert await db.connection.fetchval("SELECT current_user") == "datalayer_app"
                assert await db.connection.fetchval("SELECT session_user") == login
            async with dl.system() as db:
                assert await db.connection.fetchval("SELECT current_user") == "datalayer_maint"
    finally:
        drop_database(fresh_db.rsplit("/", 1)[1])
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP ROLE {login}")


def test_every_migration_has_a_rollback_and_declares_what_it_builds_on() -> None:
    """Files apply in name order; each names (``-- depends:``) earlier migrations it needs,
    so yoyo never reorders them and independent work can land in any number order."""
    forward = sorted(p for p in SCHEMA.glob("*.sql") if not p.name.endswith(".rollback.sql"))
    assert forward, "no migrations found"
    for i, path in enumerate(forward):
        assert path.with_name(path.stem + ".rollback.sql").exists(), f"{path.name}: no rollback"
        assert re.fullmatch(r"\d{4}_[a-z0-9_]+", path.stem), f"{path.name}: bad name"
        if i == 0:
            continue
        deps = re.findall(r"^-- depends: (.+)$", path.read_text(), flags=re.M)
        named = {d.strip() for line in deps for d in line.split()}
        earlier = {p.stem for p in forward[:i]}
        assert named and named <= earlier, (
            f"{path.name} must declare '-- depends:' on earlier migrations only, got {named}")
