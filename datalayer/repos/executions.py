"""Executions (``queries/executions.sql``). Placeholder: being built for issue 4."""

from __future__ import annotations

from datalayer.repos._base import Repository

__all__ = ["Executions"]


class Executions(Repository):
    """``db.executions``."""

    __slots__ = ()
