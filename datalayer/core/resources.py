"""Where the SQL files live: inside the wheel, or beside the package in a source checkout."""

from __future__ import annotations

from pathlib import Path

__all__ = ["resource_dir"]

_PACKAGE = Path(__file__).resolve().parent.parent


def resource_dir(name: str) -> Path:
    """``schema``, ``queries`` or ``benchmarks``: the wheel ships them under
    ``datalayer/_resources/``; a source checkout (or editable install) has them at the top."""
    bundled = _PACKAGE / "_resources" / name
    if bundled.is_dir():
        return bundled
    return _PACKAGE.parent / name
