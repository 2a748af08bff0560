"""datalayer: an async, raw-SQL PostgreSQL data layer with tenant isolation enforced by RLS."""

from datalayer.core.context import Context
from datalayer.core.database import DataLayer
from datalayer.core.errors import (
    ConfigError,
    Conflict,
    DataLayerError,
    Deadlock,
    LimitExceeded,
    MigrationError,
    NotFound,
    PermissionDenied,
    RateLimited,
    SchemaDrift,
    SerializationFailure,
    Timeout,
    TransactionAborted,
    Unavailable,
    ValidationError,
)
from datalayer.core.rows import RowQuery
from datalayer.core.session import Session
from datalayer.settings import Settings

__all__ = [
    "ConfigError",
    "Conflict",
    "Context",
    "DataLayer",
    "DataLayerError",
    "Deadlock",
    "LimitExceeded",
    "MigrationError",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "RowQuery",
    "SchemaDrift",
    "SerializationFailure",
    "Session",
    "Settings",
    "Timeout",
    "TransactionAborted",
    "Unavailable",
    "ValidationError",
]
