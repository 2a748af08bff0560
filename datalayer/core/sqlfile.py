"""Parse named-query ``.sql`` files into :class:`Query` objects.

A file holds blocks introduced by an sqlc-style header::

    -- name: get_by_email :one
    -- One live user by email, case-insensitive.
    SELECT id, email FROM users WHERE lower(email) = lower(:email);

Comment lines right after the header are the docstring. ``:name`` parameters are
rewritten to ``$n`` once, here, so nothing is parsed per call. The rewriter leaves
``::casts``, ``:=``, string literals (``'…'``, ``E'…'``), quoted identifiers, dollar
quotes and comments alone, and a repeated name reuses its ``$n``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from datalayer.core.errors import QueryLoadError

__all__ = ["Query", "Shape", "parse_file", "parse_text", "rewrite"]


class Shape(enum.Enum):
    """What a query returns; picks the asyncpg call."""

    ONE = "one"  # fetchrow: a row or None
    MANY = "many"  # fetch: a list of rows
    SCALAR = "scalar"  # fetchval: first column of the first row
    EXEC = "exec"  # execute: the status string
    EXECROWS = "execrows"  # execute: the affected row count
    COPY = "copy"  # copy_records_to_table: rows into a table


@dataclass(frozen=True, slots=True)
class Query:
    """One named query, ready to execute: ``sql`` is final text with ``$n`` placeholders.

    ``sql`` starts with a provenance comment (``/* datalayer:orgs.get */``) so server
    logs and ``pg_stat_statements`` lead back here; it is fixed at load time, so
    asyncpg's statement cache keys on it like on any other constant text.
    """

    name: str
    shape: Shape
    sql: str
    params: tuple[str, ...]
    doc: str
    source: str  # "file:line" of the header, for messages
    copy_table: str | None = None
    copy_columns: tuple[str, ...] = ()

    def bind(self, kwargs: dict[str, object]) -> list[object]:
        """Positional arguments for ``kwargs``; raises before any round trip on a mismatch."""
        try:
            args = [kwargs[p] for p in self.params]
        except KeyError:
            args = None
        if args is None or len(kwargs) != len(self.params):
            from datalayer.core.errors import ValidationError

            missing = [p for p in self.params if p not in kwargs]
            extra = sorted(k for k in kwargs if k not in self.params)
            parts = []
            if missing:
                parts.append("missing " + ", ".join(missing))
            if extra:
                parts.append("unexpected " + ", ".join(extra))
            raise ValidationError(
                f"{self.name}: {'; '.join(parts)} (expects: {', '.join(self.params) or 'none'})",
                query=self.name,
            )
        return args


_HEADER = re.compile(r"^--\s*name:\s*(?P<name>\S+)?\s*(?::(?P<shape>\w+))?\s*(?P<rest>.*)$")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")
_POSITIONAL = re.compile(r"\$[0-9]+")
_COPY = re.compile(
    r"^\s*COPY\s+(?P<table>[A-Za-z_][A-Za-z0-9_.]*)\s*\((?P<cols>[^)]*)\)\s+FROM\s+STDIN\s*;?\s*$",
    re.IGNORECASE,
)


def rewrite(sql: str, where: str = "<sql>") -> tuple[str, tuple[str, ...]]:
    """Rewrite ``:name`` parameters to ``$n``; return the new text and the names in ``$n`` order.

    Raises :class:`QueryLoadError` for an unterminated literal, comment or dollar quote,
    and for ``$n`` placeholders written by hand (use ``:name``).
    """
    out: list[str] = []
    names: dict[str, int] = {}
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c == "-" and nxt == "-":  # line comment
            j = sql.find("\n", i)
            j = n if j < 0 else j
            out.append(sql[i:j])
            i = j
        elif c == "/" and nxt == "*":  # block comment; PostgreSQL nests them
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                raise QueryLoadError(f"{where}: unterminated /* comment")
            out.append(sql[i:j])
            i = j
        elif c == "'" or (c in "eE" and nxt == "'" and not _ident_before(sql, i)):
            start = i
            escapes = c != "'"
            i = i + 2 if escapes else i + 1
            while True:
                if i >= n:
                    raise QueryLoadError(f"{where}: unterminated string literal")
                ch = sql[i]
                if escapes and ch == "\\":
                    i += 2
                elif ch == "'":
                    if i + 1 < n and sql[i + 1] == "'":
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    i += 1
            out.append(sql[start:i])
        elif c == '"':  # quoted identifier
            j = i + 1
            while True:
                j = sql.find('"', j)
                if j < 0:
                    raise QueryLoadError(f"{where}: unterminated quoted identifier")
                if sql.startswith('""', j):
                    j += 2
                    continue
                break
            out.append(sql[i : j + 1])
            i = j + 1
        elif c == "$":
            m = _DOLLAR_TAG.match(sql, i)
            if m and not _ident_before(sql, i):
                tag = m.group(0)
                end = sql.find(tag, m.end())
                if end < 0:
                    raise QueryLoadError(f"{where}: unterminated dollar quote {tag}")
                out.append(sql[i : end + len(tag)])
                i = end + len(tag)
            elif (pm := _POSITIONAL.match(sql, i)) and not _ident_before(sql, i):
                raise QueryLoadError(
                    f"{where}: positional placeholder {pm.group(0)} found;"
                    " write :name parameters instead"
                )
            else:
                out.append(c)
                i += 1
        elif c == ":":
            if nxt == ":":  # ::cast
                out.append("::")
                i += 2
            elif nxt == "=":  # named argument notation f(a := 1)
                out.append(":=")
                i += 2
            else:
                m = _IDENT.match(sql, i + 1)
                if m:
                    name = m.group(0)
                    idx = names.setdefault(name, len(names) + 1)
                    out.append(f"${idx}")
                    i = m.end()
                else:
                    out.append(c)
                    i += 1
        else:
            # copy a run of ordinary characters in one slice
            j = i + 1
            while j < n and sql[j] not in "-/'eE\"$:":
                j += 1
            out.append(sql[i:j])
            i = j
    return "".join(out), tuple(names)


def _ident_before(sql: str, i: int) -> bool:
    """True when ``sql[i]`` continues an identifier (``name'`` is not E'', ``a$1$`` no quote)."""
    return i > 0 and (sql[i - 1].isalnum() or sql[i - 1] in "_$")


def parse_text(text: str, *, namespace: str, filename: str) -> list[Query]:
    """Parse one file's text; query names become ``<namespace>.<name>``."""
    queries: list[Query] = []
    seen: dict[str, int] = {}
    lines = text.splitlines()
    header_rows = [i for i, line in enumerate(lines) if line.lstrip().startswith("--") and
                   re.match(r"^\s*--\s*name:", line)]
    # Anything but comments and blank lines before the first header is an error.
    first = header_rows[0] if header_rows else len(lines)
    for i in range(first):
        stripped = lines[i].strip()
        if stripped and not stripped.startswith("--"):
            raise QueryLoadError(
                f"{filename}:{i + 1}: SQL before the first '-- name:' header; "
                "every query needs a '-- name: <name> :<shape>' line"
            )
    for k, start in enumerate(header_rows):
        end = header_rows[k + 1] if k + 1 < len(header_rows) else len(lines)
        where = f"{filename}:{start + 1}"
        m = _HEADER.match(lines[start].strip())
        if not m or not m.group("name"):
            raise QueryLoadError(f"{where}: header needs a name: '-- name: <name> :<shape>'")
        name, shape_text, rest = m.group("name"), m.group("shape"), m.group("rest").strip()
        if not _IDENT.fullmatch(name):
            raise QueryLoadError(f"{where}: query name {name!r} is not an identifier")
        if shape_text is None:
            raise QueryLoadError(
                f"{where}: query {name!r} has no shape; add one of "
                + " ".join(":" + s.value for s in Shape)
            )
        try:
            shape = Shape(shape_text)
        except ValueError:
            raise QueryLoadError(
                f"{where}: unknown shape :{shape_text} for {name!r}; use one of "
                + " ".join(":" + s.value for s in Shape)
            ) from None
        if rest:
            raise QueryLoadError(f"{where}: unexpected text after the shape: {rest!r}")
        if name in seen:
            raise QueryLoadError(
                f"{where}: duplicate query name {name!r} (first defined at line {seen[name]})"
            )
        seen[name] = start + 1
        body_lines = lines[start + 1 : end]
        doc: list[str] = []
        j = 0
        while j < len(body_lines) and body_lines[j].lstrip().startswith("--"):
            doc.append(body_lines[j].lstrip()[2:].strip())
            j += 1
        body = "\n".join(body_lines[j:]).strip()
        if not _has_code(body):
            raise QueryLoadError(f"{where}: query {name!r} has an empty body")
        full = f"{namespace}.{name}"
        sql, params = rewrite(body, where)
        copy_table: str | None = None
        copy_columns: tuple[str, ...] = ()
        if shape is Shape.COPY:
            cm = _COPY.match(body)
            if not cm:
                raise QueryLoadError(
                    f"{where}: a :copy query must be 'COPY table (col, ...) FROM STDIN'"
                )
            copy_table = cm.group("table")
            copy_columns = tuple(c.strip() for c in cm.group("cols").split(",") if c.strip())
        queries.append(
            Query(
                name=full,
                shape=shape,
                sql=f"/* datalayer:{full} */\n{sql}",
                params=params,
                doc="\n".join(doc).strip(),
                source=where,
                copy_table=copy_table,
                copy_columns=copy_columns,
            )
        )
    return queries


def _has_code(body: str) -> bool:
    stripped, _ = rewrite(body)
    code = re.sub(r"--[^\n]*", "", stripped)
    code = re.sub(r"/\*.*?\*/", "", code, flags=re.S)
    return bool(code.strip(" \n\t;"))


def parse_file(path: Path) -> list[Query]:
    """Parse ``path``; the namespace is the file stem (``queries/orgs.sql`` → ``orgs.*``)."""
    return parse_text(path.read_text(encoding="utf-8"), namespace=path.stem, filename=path.name)
