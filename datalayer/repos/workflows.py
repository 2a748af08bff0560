"""Workflows (``queries/workflows.sql``). Placeholder: being built for issue 4."""

from __future__ import annotations

from datalayer.repos._base import Repository

__all__ = ["Workflows"]


class Workflows(Repository):
    """``db.workflows``."""

    __slots__ = ()
