"""One error tree under :class:`DataLayerError`, and the one place driver errors are mapped.

Three kinds of failure stay distinct: misuse of the API (``ValidationError`` raised before
any round trip, ``ConfigError``), the database saying no (``Conflict``, ``PermissionDenied``,
…, mapped from SQLSTATE by :func:`translate`), and bugs (anything else, left alone).
Messages say what was wrong and what to do; they never carry parameter values, row
contents or secrets, because driver messages can (``invalid input syntax … "value"``).
"""

from __future__ import annotations

import asyncio
import re

import asyncpg

__all__ = [
    "ConfigError",
    "Conflict",
    "DataLayerError",
    "Deadlock",
    "LimitExceeded",
    "MigrationError",
    "NotFound",
    "PermissionDenied",
    "QueryLoadError",
    "RateLimited",
    "SchemaDrift",
    "SerializationFailure",
    "Timeout",
    "TransactionAborted",
    "Unavailable",
    "ValidationError",
    "translate",
]


class DataLayerError(Exception):
    """Root of every error this package raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        query: str | None = None,
        constraint: str | None = None,
        table: str | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.query = query
        self.constraint = constraint
        self.table = table
        self.column = column


class ConfigError(DataLayerError):
    """A setting is missing or invalid; the message names the variable."""


class QueryLoadError(DataLayerError):
    """A query file cannot be loaded; the message names the file and line."""


class NotFound(DataLayerError):
    """The row does not exist, or the current context may not see it."""


class Conflict(DataLayerError):
    """A unique or exclusion constraint refused the write; ``constraint`` names it."""


class ValidationError(DataLayerError):
    """Bad input: wrong arguments, or a CHECK / NOT NULL / foreign key / type refused it."""


class PermissionDenied(DataLayerError):
    """The context may not do this (privileges, row-level security, read-only session)."""


class RateLimited(DataLayerError):
    """Too many requests; ``retry_after`` seconds until the next one may pass."""

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LimitExceeded(DataLayerError):
    """A subscription limit refused the write (SQLSTATE DLQ01, raised by our triggers);
    ``constraint`` names the limit (``twin_limit_models``, …)."""


class Timeout(DataLayerError):
    """A statement, lock or pool acquire took longer than its configured limit."""


class Unavailable(DataLayerError):
    """The database (or Redis) cannot be reached, or the connection was lost."""


class SerializationFailure(DataLayerError):
    """A concurrent transaction won; re-run the whole transaction (``run_in_session`` does)."""


class Deadlock(SerializationFailure):
    """PostgreSQL broke a deadlock by aborting this transaction; re-run it."""


class TransactionAborted(DataLayerError):
    """A session ended normally but its transaction had already failed: an error raised
    inside the block was caught and ignored. It was rolled back; nothing was written."""


class MigrationError(DataLayerError):
    """Applying or rolling back migrations failed."""


class SchemaDrift(DataLayerError):
    """The database schema does not match this code: an edited migration, or a missing object."""


# SQLSTATE → (class, what it means, what to do). Exact codes first, then two-character
# class prefixes (psycopg does the same). Texts are fixed: no driver text leaks through.
_EXACT: dict[str, tuple[type[DataLayerError], str]] = {
    "23505": (Conflict, "a row with the same unique value already exists"),
    "23P01": (Conflict, "the row conflicts with an existing one (exclusion constraint)"),
    "23502": (ValidationError, "a required value is missing (NOT NULL)"),
    "23503": (ValidationError, "the row references a missing row, or is still referenced"),
    "23514": (ValidationError, "a value is outside what the CHECK constraint allows"),
    "22001": (ValidationError, "a value is too long for its column"),
    "22003": (ValidationError, "a number is out of range for its column"),
    "22P02": (ValidationError, "a value has the wrong format for its type"),
    "22007": (ValidationError, "a date or time value has the wrong format"),
    "22008": (ValidationError, "a date or time value is out of range"),
    "22023": (ValidationError, "an argument value is invalid"),
    "22004": (ValidationError, "a NULL value is not allowed here"),
    "2201X": (ValidationError, "a row count or offset is invalid"),
    "2201W": (ValidationError, "a limit is invalid"),
    "P0001": (ValidationError, "a database rule refused the change"),
    "DLQ01": (LimitExceeded, "a subscription limit was reached"),
    "42501": (PermissionDenied, "the current context may not do this"),
    "25006": (PermissionDenied, "the session is read-only; open a read-write session to write"),
    "57014": (Timeout, "the statement was cancelled (statement timeout or cancel request)"),
    "55P03": (Timeout, "a lock could not be taken in time (lock timeout)"),
    "25P03": (Timeout, "the transaction stayed idle too long and was ended"),
    "40001": (SerializationFailure, "a concurrent transaction changed the same data; retry"),
    "40P01": (Deadlock, "deadlock detected; retry the transaction"),
    "57P01": (Unavailable, "the server is shutting down"),
    "57P02": (Unavailable, "the server crashed"),
    "57P03": (Unavailable, "the server is starting up; retry shortly"),
    "53300": (Unavailable, "too many connections; lower the pool size or raise max_connections"),
    "42P01": (SchemaDrift, "a table the query uses does not exist; run migrations"),
    "42703": (SchemaDrift, "a column the query uses does not exist; run migrations"),
    "42883": (SchemaDrift, "a function the query uses does not exist; run migrations"),
    "3F000": (SchemaDrift, "a schema the query uses does not exist; run migrations"),
}
_PREFIX: dict[str, tuple[type[DataLayerError], str]] = {
    "08": (Unavailable, "the connection to the database failed"),
    "22": (ValidationError, "a value is invalid for its type"),
    "23": (ValidationError, "a constraint refused the change"),
    "28": (Unavailable, "the database refused the login; check DATABASE_URL"),
    "40": (SerializationFailure, "the transaction was rolled back; retry"),
    "53": (Unavailable, "the database is out of resources"),
    "57": (Unavailable, "the database stopped the operation"),
}

_KEY_COLUMNS = re.compile(r"^Key \((?P<cols>[^)]*)\)=")
_RLS = "row-level security"


def translate(exc: BaseException, query: str | None = None) -> DataLayerError | None:
    """Map a driver error to a :class:`DataLayerError`; ``None`` if it is not a driver error.

    Callers raise the result ``from exc`` so the original stays on ``__cause__``.
    """
    prefix = f"{query}: " if query else ""
    if isinstance(exc, asyncpg.PostgresError):
        state: str = getattr(exc, "sqlstate", "") or ""
        entry = _EXACT.get(state) or _PREFIX.get(state[:2])
        constraint = getattr(exc, "constraint_name", None)
        table = getattr(exc, "table_name", None)
        column = getattr(exc, "column_name", None)
        if entry is None:
            cls, text = DataLayerError, f"the database refused the statement (SQLSTATE {state})"
        else:
            cls, text = entry
        if state == "42501" and _RLS in str(exc):
            text = "row-level security refused the row for the current context"
        if getattr(exc, "server_source_function", None) == "exec_stmt_raise":
            # Raised by RAISE in our own PL/pgSQL (schema/): written to be shown, no values.
            text = str(exc)
        where = []
        if table:
            where.append(f"table {table}")
        if constraint:
            where.append(f"constraint {constraint}")
        if state == "23505":
            detail = getattr(exc, "detail", None) or ""
            m = _KEY_COLUMNS.match(detail)
            if m:  # column names only; the values after '=' stay out
                column = m.group("cols")
                where.append(f"columns ({column})")
        elif column:
            where.append(f"column {column}")
        suffix = f" [{', '.join(where)}]" if where else ""
        return cls(
            f"{prefix}{text}{suffix}",
            sqlstate=state,
            query=query,
            constraint=constraint,
            table=table,
            column=column,
        )
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError | ConnectionError | OSError):
        return Unavailable(f"{prefix}the connection to the database was lost", query=query)
    if isinstance(exc, asyncpg.InterfaceError) and (
        "connection is closed" in str(exc) or "released back to the pool" in str(exc)
    ):
        # asyncpg returns a connection that died under a live session to its pool at once;
        # a session that has ended cannot get here (it swaps in a closed marker).
        return Unavailable(f"{prefix}the connection to the database was lost", query=query)
    if isinstance(exc, asyncio.TimeoutError):
        return Timeout(f"{prefix}timed out waiting for the database", query=query)
    return None
