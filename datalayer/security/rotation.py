"""Online key rotation: re-encrypt every registered encrypted column under the active key.

The columns come from one place, ``app.encrypted_columns`` (each migration that adds an
encrypted column registers it there); identifiers used in SQL come only from that table and
are quoted. With ``DATALAYER_KEYS`` listing the new key first and the old ones after,
:func:`rotate` walks each column in primary-key order, in batches (one short transaction
each, as the maintenance role), and for every blob not under the active key:

1. decrypts it (any key of the ring), encrypts the plaintext under the active key,
   decrypts the new blob and compares, all in-process, before anything is written;
2. writes it with compare-and-swap: ``UPDATE … WHERE pk = … AND col = <the blob read>``,
   so a row changed meanwhile (a concurrent writer) is skipped, not overwritten.

Rows already under the active key are never selected, so a second run changes nothing and a
run interrupted anywhere (a crash, a cancelled task) simply continues when run again. After
each pass it counts, in SQL, the rows whose blob names another key (a concurrent writer still
running with the old ring puts some back); passes repeat while any are left and progress is
made (at most ``MAX_PASSES``), and :class:`RotationIncomplete` is raised if any is left.
Reads and writes keep working throughout: the application's keyring holds both keys, so
rows under either decrypt. Registered id and org columns must be uuid.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from datalayer.core.errors import DataLayerError
from datalayer.core.session import guarded
from datalayer.repos.audit import GLOBAL_ORG
from datalayer.security.keyring import DecryptionError, Keyring

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = ["EncryptedColumn", "RotationIncomplete", "RotationProgress", "RotationReport",
           "encrypted_columns", "remaining", "rotate"]

log = logging.getLogger("datalayer.security.rotation")
MAX_PASSES = 5


class RotationIncomplete(DataLayerError):
    """Rows still reference a key other than the active one after the run."""


@dataclass(frozen=True, slots=True)
class EncryptedColumn:
    """One row of ``app.encrypted_columns``."""

    table: str
    column: str
    org_column: str | None
    id_column: str

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"


@dataclass(frozen=True, slots=True)
class RotationProgress:
    """Handed to the ``progress`` callback after every batch."""

    column: str  # "table.column"
    batch: int  # batches done in this column, this pass
    rotated: int  # rows re-encrypted in this column so far
    skipped: int  # rows changed concurrently (left for the next pass)
    total: int  # rows of this column under another key when the column started


@dataclass(slots=True)
class RotationReport:
    """What a run did. ``rotated``/``skipped``/``failed`` per "table.column"."""

    active_kid: str
    rotated: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    passes: int = 0
    seconds: float = 0.0

    @property
    def total_rotated(self) -> int:
        return sum(self.rotated.values())

    def as_dict(self) -> dict[str, Any]:
        return {"active_kid": self.active_kid, "rotated": dict(self.rotated),
                "skipped": dict(self.skipped), "failed": dict(self.failed),
                "batches": self.batches, "passes": self.passes,
                "seconds": round(self.seconds, 3)}


# Called after every batch; may return an awaitable, which is awaited before the next batch.
Progress = Callable[[RotationProgress], object]

_COLUMNS_SQL = """
SELECT table_name, column_name, org_column, id_column
FROM app.encrypted_columns ORDER BY table_name, column_name
"""


def _q(ident: str) -> str:
    """A quoted SQL identifier (identifiers come only from app.encrypted_columns)."""
    return '"' + ident.replace('"', '""') + '"'


class _Sql:
    """The statements of one registered column."""

    def __init__(self, col: EncryptedColumn) -> None:
        t, c, i = _q(col.table), _q(col.column), _q(col.id_column)
        o = _q(col.org_column) if col.org_column else None
        stale = f"{c} IS NOT NULL AND app.keyring_kid({c}) IS DISTINCT FROM $1"
        # select: $2 first batch (no cursor yet); $3, $4 the cursor (org, id) of the last
        # batch; $6 only this organization (NULL: all). count: $2 only this organization.
        if o is None:
            self.select = (f"SELECT NULL::uuid AS org, {i} AS id, {c} AS blob FROM public.{t} "
                           f"WHERE {stale} AND ($2::boolean OR {i} > $4) "
                           f"AND $3::uuid IS NULL AND $6::uuid IS NULL ORDER BY {i} LIMIT $5")
            self.count = f"SELECT count(*) FROM public.{t} WHERE {stale} AND $2::uuid IS NULL"
            match = f"t.{i} = v.id"
        else:
            self.select = (f"SELECT {o} AS org, {i} AS id, {c} AS blob FROM public.{t} "
                           f"WHERE {stale} AND ($6::uuid IS NULL OR {o} = $6) "
                           f"AND ($2::boolean OR ({o}, {i}) > ($3, $4)) "
                           f"ORDER BY {o}, {i} LIMIT $5")
            self.count = (f"SELECT count(*) FROM public.{t} "
                          f"WHERE {stale} AND ($2::uuid IS NULL OR {o} = $2)")
            match = f"t.{o} = v.org AND t.{i} = v.id"
        self.update = (f"UPDATE public.{t} AS t SET {c} = v.new "
                       f"FROM unnest($1::uuid[], $2::uuid[], $3::bytea[], $4::bytea[]) "
                       f"AS v(org, id, old, new) WHERE {match} AND t.{c} = v.old "
                       f"RETURNING t.{i}")


async def encrypted_columns(dl: DataLayer) -> list[EncryptedColumn]:
    """Every registered encrypted column."""
    async with dl.system() as db:
        rows = await guarded(db.connection.fetch(_COLUMNS_SQL), "rotation.columns")
    return [EncryptedColumn(r["table_name"], r["column_name"], r["org_column"],
                            r["id_column"]) for r in rows]


async def remaining(dl: DataLayer, kid: str | None = None, *,
                    org_id: UUID | None = None) -> dict[str, int]:
    """Rows per "table.column" whose blob is under a key other than ``kid`` (default: the
    active key), counted in SQL from the blobs' key-id bytes; with ``org_id``, only that
    organization's rows of the columns that have an org column."""
    kid = kid or dl.keyring.active_kid
    out = {}
    cols = [c for c in await encrypted_columns(dl) if org_id is None or c.org_column]
    async with dl.system() as db:
        for col in cols:
            count = db.connection.fetchval(_Sql(col).count, kid, org_id)
            out[col.name] = int(await guarded(count, "rotation.count"))
    return out


def _reencrypt(keyring: Keyring, col: EncryptedColumn, org: UUID | None, row_id: Any,
               blob: bytes) -> bytes:
    place: dict[str, Any] = {"org_id": org, "table": col.table, "row_id": str(row_id),
                             "column": col.column}
    plain = keyring.decrypt(blob, **place)
    new = keyring.encrypt(plain, **place)
    if keyring.decrypt(new, **place) != plain:  # pragma: no cover - a broken cipher
        raise DecryptionError(f"re-encrypted {col.name} did not decrypt to the same value")
    return new


async def _pass(dl: DataLayer, col: EncryptedColumn, report: RotationReport, *, total: int,
                batch: int, progress: Progress | None, org_id: UUID | None) -> int:
    """One walk over a column that had ``total`` rows under another key when counted;
    returns rows skipped (changed concurrently or undecryptable)."""
    sql, keyring, kid = _Sql(col), dl.keyring, dl.keyring.active_kid
    after_id: Any = None
    after_org: UUID | None = None
    n = skipped = 0
    while total:
        async with dl.system() as db:
            rows = await guarded(db.connection.fetch(sql.select, kid, after_id is None,
                                                     after_org, after_id, batch, org_id),
                                 "rotation.select")
        if not rows:
            break
        orgs, ids, olds, news = [], [], [], []
        for r in rows:
            try:
                new = _reencrypt(keyring, col, r["org"], r["id"], bytes(r["blob"]))
            except DecryptionError as exc:
                report.failed[col.name] = report.failed.get(col.name, 0) + 1
                log.error("rotation cannot decrypt a row; it is left as it is",
                          extra={"column": col.name, "row_id": str(r["id"]),
                                 "error": str(exc)})
                continue
            orgs.append(r["org"])
            ids.append(r["id"])
            olds.append(bytes(r["blob"]))
            news.append(new)
        done = 0
        if ids:
            async with dl.system() as db:
                done = len(await guarded(db.connection.fetch(sql.update, orgs, ids, olds, news),
                                         "rotation.update"))
        last = rows[-1]
        after_id, after_org = last["id"], last["org"]
        n += 1
        report.batches += 1
        report.rotated[col.name] = report.rotated.get(col.name, 0) + done
        report.skipped[col.name] = report.skipped.get(col.name, 0) + len(ids) - done
        skipped += len(ids) - done
        if progress is not None:
            shown = progress(RotationProgress(col.name, n, report.rotated[col.name],
                                              report.skipped[col.name], total))
            if inspect.isawaitable(shown):
                await shown
        if len(rows) < batch:
            break
    return skipped


async def _audit_rotation(dl: DataLayer, report: RotationReport, *, org_id: UUID | None,
                          complete: bool) -> None:
    """One 'security.key_rotated' audit event: in the organization's chain for a
    one-tenant rotation, in the global chain otherwise."""
    async with dl.system() as db:
        await db.audit.record(
            "security.key_rotated", result="success" if complete else "failure",
            org_id=org_id or GLOBAL_ORG, resource_type="keyring",
            resource_id=report.active_kid,
            details={"rotated": report.total_rotated, "failed": report.failed,
                     "passes": report.passes})


async def rotate(dl: DataLayer, *, batch: int = 500, progress: Progress | None = None,
                 check: bool = True, org_id: UUID | None = None) -> RotationReport:
    """Re-encrypt every registered encrypted column under ``dl.keyring.active_kid``.

    Resumable and idempotent (rows under the active key are never touched); safe alongside
    live traffic (compare-and-swap per row). With ``check`` (the default), ends by asserting
    in SQL that no row references another key: :class:`RotationIncomplete` otherwise.
    With ``org_id``, only that organization's rows of the columns that have an org column
    (e.g. to re-encrypt one tenant); the default and the CLI cover everything.
    """
    if not 1 <= batch <= 10_000:
        raise DataLayerError("batch must be between 1 and 10000")
    started = time.monotonic()
    report = RotationReport(dl.keyring.active_kid)
    cols = [c for c in await encrypted_columns(dl) if org_id is None or c.org_column]
    for col in cols:
        report.rotated.setdefault(col.name, 0)
        report.skipped.setdefault(col.name, 0)
    # One count per column and pass: the count that closes a pass opens the next one.
    left = {k: v for k, v in (await remaining(dl, org_id=org_id)).items() if v}
    for p in range(MAX_PASSES):
        if not left:
            break
        report.passes = p + 1
        before = report.total_rotated
        skipped = 0
        for col in cols:
            if left.get(col.name):
                skipped += await _pass(dl, col, report, total=left[col.name], batch=batch,
                                       progress=progress, org_id=org_id)
        left = {k: v for k, v in (await remaining(dl, org_id=org_id)).items() if v}
        # done; or nothing this pass can fix (undecryptable rows, or no progress at all)
        if not left or report.failed or (report.total_rotated == before and not skipped):
            break
    report.seconds = time.monotonic() - started
    log.info("key rotation finished", extra=report.as_dict())
    await _audit_rotation(dl, report, org_id=org_id, complete=not left)
    if check and left:
        raise RotationIncomplete(
            f"rows still under a key other than {report.active_kid!r}: "
            + ", ".join(f"{k}: {v}" for k, v in left.items())
            + (f" (undecryptable: {report.failed})" if report.failed else "")
            + "; fix the cause and run the rotation again")
    return report
