"""The query registry: every named query of ``queries/*.sql``, loaded once, checked by the DB.

``Registry.validate`` prepares each query on a migrated database and reports its parameter
types, result columns and, for columns read straight from a table, their nullability. That is
what sqlc does for Go, done at run time: ``datalayer check`` prints it and fails on any error,
and a test compares each repository's row dataclass with it.
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
from asyncpg.pool import PoolConnectionProxy
from psycopg import pq

from datalayer.core.errors import QueryLoadError, ValidationError
from datalayer.core.sqlfile import Query, Shape, parse_file

__all__ = ["Column", "QueryInfo", "Registry"]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str  # PostgreSQL type name, schema-qualified outside pg_catalog
    nullable: bool | None  # None: computed expression, nullability unknown


@dataclass(frozen=True, slots=True)
class QueryInfo:
    """What the database says about one query."""

    name: str
    shape: Shape
    params: tuple[tuple[str, str], ...]  # (parameter name, PostgreSQL type)
    columns: tuple[Column, ...]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Registry(Mapping[str, Query]):
    """Name → :class:`Query`. Immutable after load; lookups are a dict access."""

    __slots__ = ("_queries",)

    def __init__(self, queries: dict[str, Query]) -> None:
        self._queries = queries

    @classmethod
    def load(cls, *directories: Path) -> Registry:
        """Load every ``*.sql`` in ``directories``; errors name the file and line."""
        queries: dict[str, Query] = {}
        for directory in directories:
            if not directory.is_dir():
                raise QueryLoadError(f"query directory {directory} does not exist")
        paths = [p for d in directories for p in sorted(d.glob("*.sql"))]
        for path in paths:
            for q in parse_file(path):
                if q.name in queries:  # cannot happen within a file; guards stems like a.b
                    raise QueryLoadError(
                        f"{q.source}: duplicate query {q.name} (also at {queries[q.name].source})"
                    )
                queries[q.name] = q
        return cls(queries)

    def __getitem__(self, name: str) -> Query:
        try:
            return self._queries[name]
        except KeyError:
            raise self.unknown(name) from None

    def unknown(self, name: str) -> ValidationError:
        close = difflib.get_close_matches(name, self._queries, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return ValidationError(f"unknown query {name!r}{hint}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._queries)

    def __len__(self) -> int:
        return len(self._queries)

    @property
    def raw(self) -> dict[str, Query]:
        """The underlying dict, for hot paths that handle a missing key themselves."""
        return self._queries

    async def validate(self, conn: asyncpg.Connection | PoolConnectionProxy,
                       dsn: str) -> list[QueryInfo]:
        """Prepare every query on ``conn`` and describe it; one :class:`QueryInfo` per query.

        Parameter and column types come from asyncpg's prepared statements; nullability
        needs the table OID and column number of each result column, which libpq exposes
        (``PQftable``/``PQftablecol``) and asyncpg does not, so a psycopg connection to
        ``dsn`` describes the same statements. Costs two round trips per query.
        """
        origins = await asyncio.to_thread(_describe_origins, dsn, list(self._queries.values()))
        notnull = await _notnull_map(conn, {o for cols in origins.values() for o in cols if o})
        infos: list[QueryInfo] = []
        for q in self._queries.values():
            if q.shape is Shape.COPY:
                infos.append(await _validate_copy(conn, q))
                continue
            try:
                stmt = await conn.prepare(q.sql)
            except asyncpg.PostgresError as exc:
                infos.append(QueryInfo(q.name, q.shape, (), (), f"{type(exc).__name__}: {exc}"))
                continue
            params = tuple(
                (p, _type_name(t)) for p, t in zip(q.params, stmt.get_parameters(), strict=True)
            )
            cols = []
            for i, a in enumerate(stmt.get_attributes()):
                origin = origins.get(q.name, [])[i] if i < len(origins.get(q.name, [])) else None
                cols.append(Column(a.name, _type_name(a.type),
                                   None if origin is None else not notnull.get(origin, False)))
            error = None
            if q.shape in (Shape.ONE, Shape.MANY, Shape.SCALAR) and not cols:
                error = f"shape :{q.shape.value} but the statement returns no columns"
            infos.append(QueryInfo(q.name, q.shape, params, tuple(cols), error))
        return infos


def _type_name(t: object) -> str:
    schema = getattr(t, "schema", "pg_catalog")
    name = str(getattr(t, "name", "?"))
    return name if schema == "pg_catalog" else f"{schema}.{name}"


def _describe_origins(dsn: str, queries: list[Query]) -> dict[str, list[tuple[int, int] | None]]:
    """(table oid, attnum) of each result column, or None for computed columns."""
    out: dict[str, list[tuple[int, int] | None]] = {}
    with psycopg.connect(dsn, autocommit=True) as c:
        pg = c.pgconn
        for q in queries:
            if q.shape is Shape.COPY:
                continue
            res = pg.prepare(b"", q.sql.encode())
            if res.status != pq.ExecStatus.COMMAND_OK:
                continue  # asyncpg reports the error
            d = pg.describe_prepared(b"")
            cols: list[tuple[int, int] | None] = []
            for i in range(d.nfields):
                table, col = d.ftable(i), d.ftablecol(i)
                cols.append((table, col) if table and col > 0 else None)
            out[q.name] = cols
    return out


async def _notnull_map(
    conn: asyncpg.Connection | PoolConnectionProxy, origins: set[tuple[int, int]]
) -> dict[tuple[int, int], bool]:
    if not origins:
        return {}
    rows = await conn.fetch(
        "SELECT a.attrelid::int8 AS rel, a.attnum::int AS num, a.attnotnull "
        "FROM pg_attribute a JOIN unnest($1::int8[], $2::int[]) AS o(rel, num) "
        "ON a.attrelid = o.rel::oid AND a.attnum = o.num",
        [o[0] for o in origins],
        [o[1] for o in origins],
    )
    return {(r["rel"], r["num"]): r["attnotnull"] for r in rows}


async def _validate_copy(conn: asyncpg.Connection | PoolConnectionProxy, q: Query) -> QueryInfo:
    assert q.copy_table is not None
    rows = await conn.fetch(
        "SELECT a.attname, CASE WHEN n.nspname = 'pg_catalog' THEN t.typname "
        "ELSE n.nspname || '.' || t.typname END AS type, a.attnotnull "
        "FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
        "JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 "
        "AND NOT a.attisdropped",
        q.copy_table,
    )
    by_name = {r["attname"]: r for r in rows}
    if not rows:
        return QueryInfo(q.name, q.shape, (), (), f"table {q.copy_table} does not exist")
    missing = [c for c in q.copy_columns if c not in by_name]
    if missing:
        return QueryInfo(q.name, q.shape, (), (),
                         f"{q.copy_table} has no column(s) {', '.join(missing)}")
    cols = tuple(Column(c, by_name[c]["type"], not by_name[c]["attnotnull"])
                 for c in q.copy_columns)
    return QueryInfo(q.name, q.shape, (), cols)
