"""The `datalayer` command, run as a user runs it: a subprocess with environment variables."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import TEST_KEYS, create_database, drop_database

COMMANDS = ["migrate", "check", "health", "demo", "dev-db", "seed", "bench", "gdpr"]
COMMANDS = ["migrate", "check", "health", "demo", "dev-db", "seed", "bench", "stats", "maintain"]


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DATALAYER_", "REDIS"))}
    full_env.update({"DATALAYER_ENV": "testing", "DATALAYER_KEYS": TEST_KEYS, **env})
    return subprocess.run([sys.executable, "-m", "datalayer.cli", *args], env=full_env,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_lists_the_environment_variables(command: str | None) -> None:
    result = cli(*([command] if command else []), "--help")
    assert result.returncode == 0
    assert "DATABASE_URL" in result.stdout and "DATALAYER_POOL_MAX" in result.stdout


def test_check_prints_every_query_with_types(database_url: str) -> None:
    result = cli("check", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert "ok   orgs.get :one(id uuid) -> id uuid!, slug text!" in result.stdout
    assert "queries prepared" in result.stderr
    as_json = orjson.loads(cli("check", "--json", DATABASE_URL=database_url).stdout)
    assert {q["name"] for q in as_json} >= {"orgs.get", "orgs.create"}
    assert all(q["ok"] for q in as_json)


def test_health_reports_database_migrations_and_redis(database_url: str,
                                                      redis_url: str) -> None:
    result = cli("health", "--json", DATABASE_URL=database_url, REDIS_URL=redis_url)
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["ok"] is True
    assert report["migrations"]["pending"] == []
    assert report["redis"]["ok"] is True


def test_health_fails_with_one_line_when_redis_is_down(database_url: str) -> None:
    result = cli("health", DATABASE_URL=database_url, REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["datalayer: error: unhealthy: redis"]


def test_unreachable_database_is_one_line_and_exit_1() -> None:
    result = cli("check", DATABASE_URL="postgresql://postgres@127.0.0.1:1/x",
                 DATALAYER_CONNECT_TIMEOUT_S="0.3")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datalayer: error: PostgreSQL did not answer")


def test_invalid_setting_names_the_variable() -> None:
    result = cli("migrate", "status", DATALAYER_POOL_MAX="lots")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "datalayer: error: DATALAYER_POOL_MAX must be an integer, got 'lots'")


def test_migrate_status_lists_applied_migrations(database_url: str) -> None:
    result = cli("migrate", "status", "--strict", DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert "applied  0001_roles" in result.stdout
    assert "pending" not in result.stdout


@pytest.fixture
def fresh_database(database_url: str) -> Iterator[str]:
    """An empty database of its own: the demo rotates every encrypted column, and the run's
    shared database holds rows other tests deliberately tampered with."""
    name = f"dl_demo_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        yield url
    finally:
        drop_database(name)


def test_demo_shows_each_tenant_sees_only_itself(fresh_database: str) -> None:
    result = cli("demo", DATABASE_URL=fresh_database)
    assert result.returncode == 0, result.stderr
    assert "Acme's session lists: ['Acme']" in result.stdout
    assert "Acme's session reads Globex by id: None" in result.stdout
    assert "a session with no organization counts 0 organizations" in result.stdout
    assert "PermissionDenied" in result.stdout
    assert "login attempt 5 with a wrong password: locked" in result.stdout
    assert "a forged key verifies as None" in result.stdout
    assert "Initech reads Hooli's team: None; Hooli's owner: None" in result.stdout
    assert "last 7 days: 10 executions, 7 succeeded, 3 failed" in result.stdout
    assert "the same search without a tenant context: []" in result.stdout


def test_dev_db_status_of_an_empty_directory(tmp_path: Path) -> None:
    result = cli("dev-db", "status", DATALAYER_DEVDB_DIR=str(tmp_path / "devdb"))
    assert result.returncode == 0
    assert result.stdout.strip() == "not initialised"
    url = cli("dev-db", "url", DATALAYER_DEVDB_DIR=str(tmp_path / "devdb"))
    assert url.returncode == 1 and "not running" in url.stderr


def test_missing_keys_outside_production_warn_once_on_stderr(database_url: str) -> None:
    result = cli("health", DATABASE_URL=database_url, DATALAYER_KEYS="")
    assert result.returncode == 0
    assert "datalayer: WARNING: DATALAYER_KEYS is not set" in result.stderr


def test_production_without_keys_refuses_to_start(database_url: str) -> None:
    result = cli("health", DATABASE_URL=database_url, DATALAYER_ENV="production",
                 DATALAYER_KEYS="")
    assert result.returncode == 1
    assert "DATALAYER_KEYS is required when DATALAYER_ENV=production" in result.stderr


def test_first_start_keeps_stdout_clean_for_json(database_url: str) -> None:
    """Migrating a fresh database prints nothing to stdout (yoyo echoes SELECT results)."""
    name = f"dl_cli_{uuid.uuid4().hex[:8]}"
    url = create_database(name)
    try:
        result = cli("check", "--json", DATABASE_URL=url)
        assert result.returncode == 0, result.stderr
        assert all(q["ok"] for q in orjson.loads(result.stdout))
    finally:
        drop_database(name)
