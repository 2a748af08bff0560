"""Real tests of datalayer.devdb: throwaway clusters on the machine's PostgreSQL binaries.

Roots live in a fresh mode-755 directory under the temp dir (pytest's tmp_path sits under a
mode-700 directory that the unprivileged server user could not traverse when we run as root).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from datalayer.devdb import DevDB, DevDBError, default_root, find_binaries, port_open

needs_server = pytest.mark.skipif(find_binaries() is None, reason="no PostgreSQL server binaries")


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="devdb-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def db(base: Path) -> Iterator[DevDB]:
    devdb = DevDB(base / "devdb")
    yield devdb
    with contextlib.suppress(DevDBError):
        devdb.stop()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _execute(url: str, sql: str) -> None:
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        conn.execute(sql)


def _scalar(url: str, sql: str) -> object:
    with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


@needs_server
def test_start_returns_a_url_that_accepts_connections(db: DevDB) -> None:
    url = db.start()
    port = _port(url)
    assert url == f"postgresql://postgres@127.0.0.1:{port}/postgres"
    assert _scalar(url, "select 1") == 1
    assert (db.root / "port").read_text().strip() == str(port)
    assert (db.root / "log").is_file()
    assert port_open("127.0.0.1", port)


@needs_server
def test_start_is_idempotent_and_status_reports_running(db: DevDB) -> None:
    url = db.start()
    assert db.start() == url
    assert db.url() == url
    assert db.is_running()
    assert db.status() == f"running on {_port(url)}"


@needs_server
def test_stop_then_start_keeps_data(db: DevDB) -> None:
    url = db.start()
    _execute(url, "create table keep_me (id int); insert into keep_me values (42)")
    assert db.stop() is True
    assert db.status() == "stopped"
    assert not db.is_running()
    assert db.url() is None
    assert not port_open("127.0.0.1", _port(url))
    assert db.stop() is False
    again = db.start()
    assert again == url  # the stored port is reused while it is free
    assert _scalar(again, "select id from keep_me") == 42


@needs_server
def test_fresh_root_is_not_initialised(base: Path) -> None:
    fresh = DevDB(base / "fresh")
    assert fresh.status() == "not initialised"
    assert fresh.url() is None
    assert not fresh.is_running()
    assert fresh.stop() is False


@needs_server
def test_long_root_gets_a_short_socket_dir(base: Path) -> None:
    long_db = DevDB(base / ("x" * 100) / "devdb")
    sock = long_db.socket_dir()
    assert sock.name.startswith("datalayer-devdb-")
    assert long_db.root not in sock.parents
    assert len(str(sock / ".s.PGSQL.65535")) <= 100
    try:
        url = long_db.start()
        assert _scalar(url, "select current_setting('unix_socket_directories')") == str(sock)
        assert long_db.stop() is True
    finally:
        with contextlib.suppress(DevDBError):
            long_db.stop()
        shutil.rmtree(sock, ignore_errors=True)


@pytest.mark.skipif(
    importlib.util.find_spec("pgserver") is not None, reason="pgserver is installed"
)
def test_without_binaries_or_pgserver_the_fallback_says_what_to_install(base: Path) -> None:
    with pytest.raises(DevDBError, match=r"datalayer\[embedded\]"):
        DevDB(base / "nothing")._pgserver_uri()


@needs_server
@pytest.mark.skipif(os.geteuid() != 0, reason="traversal check only applies when run as root")
def test_root_rejects_a_root_the_server_user_cannot_reach(base: Path) -> None:
    private = base / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(DevDBError, match="DATALAYER_DEVDB_DIR"):
        DevDB(private / "devdb").start()


def test_port_open() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_open("127.0.0.1", port)
    assert not port_open("127.0.0.1", port, timeout=0.2)


def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DATALAYER_DEVDB_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_root() == tmp_path / ".datalayer" / "devdb"
    monkeypatch.setenv("DATALAYER_DEVDB_DIR", str(tmp_path / "elsewhere"))
    assert default_root() == tmp_path / "elsewhere"
    assert DevDB().root == tmp_path / "elsewhere"


@needs_server
def test_find_binaries_returns_a_dir_with_initdb_and_pg_ctl() -> None:
    bindir = find_binaries()
    assert bindir is not None
    assert (bindir / "initdb").is_file()
    assert (bindir / "pg_ctl").is_file()
