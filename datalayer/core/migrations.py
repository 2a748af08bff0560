"""Migrations: yoyo over psycopg 3, serialized across processes, with a checksum ledger.

* Serialization: a session-level advisory lock on a dedicated connection. Several
  processes starting at once queue on it (up to ``migration_lock_timeout_s``) and all come
  up; the first applies, the others find nothing to do. PostgreSQL releases the lock when
  its connection dies, so a process killed mid-migration cannot leave the database locked;
  a ``yoyo_lock`` row it left behind is stale by construction and is cleared.
* Ledger: yoyo identifies a migration by a hash of its *name*. ``_datalayer_checksums``
  records the sha256 of each applied file; an applied file that changed (or vanished)
  stops start-up with ``SchemaDrift`` naming it. Landed migrations are never edited.
* Roles: after applying, the login role of ``DATABASE_URL`` is granted the run-time and
  maintenance roles, which it switches to per session.

Everything here is synchronous (yoyo is); ``DataLayer.start`` runs it in a thread.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from yoyo import get_backend, read_migrations
from yoyo.exceptions import LockTimeout

from datalayer.core.context import APP_ROLE, MAINT_ROLE
from datalayer.core.errors import MigrationError, SchemaDrift, Timeout
from datalayer.settings import Settings

__all__ = ["MigrationStatus", "apply", "rollback", "status", "verify"]

_LOCK_KEY = 0x64_61_74_61_6C_79  # "datly": one advisory lock key for migrations
_LEDGER = "_datalayer_checksums"


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    id: str
    applied: bool
    sha256: str
    recorded_sha256: str | None  # what the ledger holds for an applied file


# A migration connection whose client died must not keep running (and holding locks)
# until its statement ends: the server checks the socket every second.
_DEAD_CLIENT_CHECK = "-c client_connection_check_interval=1000"


def _yoyo_uri(url: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    if not any(k == "options" for k, _ in query):
        query.append(("options", _DEAD_CLIENT_CHECK))
    return urlunsplit(parts._replace(scheme="postgresql+psycopg", query=urlencode(query)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def _locked(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """Hold the migration advisory lock for the block, waiting up to the configured timeout."""
    try:
        conn = psycopg.connect(settings.migration_url, autocommit=True,
                               options=_DEAD_CLIENT_CHECK)
    except psycopg.OperationalError as exc:
        raise MigrationError(f"cannot connect with DATALAYER_ADMIN_URL/DATABASE_URL: "
                             f"{type(exc).__name__}") from exc
    with conn:
        deadline = time.monotonic() + settings.migration_lock_timeout_s
        while True:
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (_LOCK_KEY,)).fetchone()
            if got and got[0]:
                break
            if time.monotonic() > deadline:
                raise Timeout(
                    f"another process held the migration lock for more than "
                    f"{settings.migration_lock_timeout_s:g}s "
                    "(DATALAYER_MIGRATION_LOCK_TIMEOUT_S); is a long migration running?"
                )
            time.sleep(0.05)
        # We hold the advisory lock, so any yoyo lock row is left by a dead process.
        conn.execute("""
            DO $$ BEGIN
              IF to_regclass('yoyo_lock') IS NOT NULL THEN DELETE FROM yoyo_lock; END IF;
            END $$""")
        conn.execute(f"""CREATE TABLE IF NOT EXISTS {_LEDGER} (
            migration_id text PRIMARY KEY,
            sha256 text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())""")
        yield conn


def _ledger(conn: psycopg.Connection[Any]) -> dict[str, str]:
    rows = conn.execute(f"SELECT migration_id, sha256 FROM {_LEDGER}").fetchall()
    return {r[0]: r[1] for r in rows}


def _read(schema_dir: Path) -> Any:
    if not schema_dir.is_dir():
        raise MigrationError(f"migration directory {schema_dir} does not exist")
    return read_migrations(str(schema_dir))


def _check_drift(migrations: Any, applied_ids: set[str], ledger: dict[str, str]) -> None:
    files = {m.id: Path(m.path) for m in migrations}
    for mid in sorted(applied_ids):
        if mid not in files:
            raise SchemaDrift(
                f"migration {mid} is applied to the database but missing from this code's "
                "schema/ directory; deploy code that includes it"
            )
        recorded = ledger.get(mid)
        if recorded is not None and recorded != _sha256(files[mid]):
            raise SchemaDrift(
                f"migration file {files[mid].name} changed after it was applied "
                f"(sha256 {_sha256(files[mid])[:12]}…, applied {recorded[:12]}…); "
                "never edit a landed migration: revert the edit and add a new migration"
            )


def apply(settings: Settings, schema_dir: Path) -> list[str]:
    """Apply pending migrations; return their ids. Safe to call from many processes."""
    migrations = _read(schema_dir)
    with _locked(settings) as conn:
        backend = get_backend(_yoyo_uri(settings.migration_url))
        try:
            backend.get_applied_migration_hashes()  # creates yoyo's tables when missing
            applied_ids = {r[0] for r in backend.execute(
                "SELECT migration_id FROM _yoyo_migration").fetchall()}
            _check_drift(migrations, applied_ids, _ledger(conn))
            pending = backend.to_apply(migrations)
            done: list[str] = []
            try:
                with backend.lock(timeout=settings.migration_lock_timeout_s):
                    for m in pending:
                        backend.apply_migrations(migrations.__class__([m]))
                        conn.execute(
                            f"INSERT INTO {_LEDGER} (migration_id, sha256) VALUES (%s, %s) "
                            "ON CONFLICT (migration_id) DO UPDATE SET sha256 = EXCLUDED.sha256, "
                            "applied_at = now()",
                            (m.id, _sha256(Path(m.path))),
                        )
                        done.append(m.id)
            except LockTimeout as exc:
                raise Timeout(f"yoyo migration lock not released in time: {exc}") from exc
            except psycopg.Error as exc:
                failed = pending[len(done)].id if len(done) < len(pending) else "?"
                raise MigrationError(
                    f"migration {failed} failed: {type(exc).__name__}: "
                    f"{exc.diag.message_primary or exc}"
                ) from exc
            _grant_login_role(settings, conn)
            return done
        finally:
            backend.connection.close()


def _grant_login_role(settings: Settings, admin: psycopg.Connection[Any]) -> None:
    """Let the run-time login role switch to the app and maintenance roles."""
    roles = admin.execute(
        "SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s)", ([APP_ROLE, MAINT_ROLE],)
    ).fetchone()
    if not roles or roles[0] != 2:
        return  # not migrated far enough yet
    with psycopg.connect(settings.database_url, autocommit=True) as login:
        row = login.execute(
            "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    if row is None or row[1]:
        return  # superusers may SET ROLE to anything
    admin.execute(sql.SQL("GRANT {}, {} TO {}").format(
        sql.Identifier(APP_ROLE), sql.Identifier(MAINT_ROLE), sql.Identifier(row[0])))


def status(settings: Settings, schema_dir: Path) -> list[MigrationStatus]:
    """Every migration file with whether it is applied and its recorded checksum."""
    migrations = _read(schema_dir)
    try:
        backend = get_backend(_yoyo_uri(settings.migration_url))
    except psycopg.OperationalError as exc:
        raise MigrationError(f"cannot connect to read migration status: {type(exc).__name__}") \
            from exc
    try:
        applied = set(backend.get_applied_migration_hashes())
        ledger: dict[str, str] = {}
        exists = backend.execute(f"SELECT to_regclass('{_LEDGER}') IS NOT NULL").fetchone()
        if exists and exists[0]:
            ledger = {r[0]: r[1] for r in backend.execute(
                f"SELECT migration_id, sha256 FROM {_LEDGER}").fetchall()}
        return [MigrationStatus(m.id, m.hash in applied, _sha256(Path(m.path)),
                                ledger.get(m.id)) for m in migrations]
    finally:
        backend.connection.close()


def verify(settings: Settings, schema_dir: Path) -> None:
    """Raise ``SchemaDrift`` unless every migration is applied and unchanged."""
    rows = status(settings, schema_dir)
    for r in rows:
        if r.applied and r.recorded_sha256 and r.recorded_sha256 != r.sha256:
            raise SchemaDrift(f"migration file {r.id}.sql changed after it was applied; "
                              "revert the edit and add a new migration")
    pending = [r.id for r in rows if not r.applied]
    if pending:
        raise SchemaDrift(f"{len(pending)} migration(s) not applied ({', '.join(pending)}); "
                          "run 'datalayer migrate apply' or set DATALAYER_MIGRATE_ON_START=true")


def rollback(settings: Settings, schema_dir: Path, *, count: int | None = 1) -> list[str]:
    """Roll back the last ``count`` applied migrations (all with ``count=None``)."""
    migrations = _read(schema_dir)
    with _locked(settings) as conn:
        backend = get_backend(_yoyo_uri(settings.migration_url))
        try:
            targets = list(backend.to_rollback(migrations))
            if count is not None:
                targets = targets[:count]
            done: list[str] = []
            with backend.lock(timeout=settings.migration_lock_timeout_s):
                for m in targets:
                    try:
                        backend.rollback_migrations(migrations.__class__([m]))
                    except psycopg.Error as exc:
                        raise MigrationError(
                            f"rollback of {m.id} failed: {exc.diag.message_primary or exc}"
                        ) from exc
                    conn.execute(f"DELETE FROM {_LEDGER} WHERE migration_id = %s", (m.id,))
                    done.append(m.id)
            return done
        finally:
            backend.connection.close()
