"""Typed query handles: a registry query name bound to the row dataclass it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["RowQuery"]

T = TypeVar("T")


def _builder(cls: type[T]) -> Callable[[Mapping[str, Any]], T]:
    """``lambda r: cls(a=r['a'], b=r['b'], …)``, generated once per row class.

    Builds by column name like ``cls(**record)`` at two thirds of its cost: the per-call
    path has no dict to build or unpack (dataclasses generates ``__init__`` the same way).
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    args = ", ".join(f"{n}=r[{n!r}]" for n in names)
    code = f"lambda r: cls({args})"
    build: Callable[[Mapping[str, Any]], T] = eval(code, {"cls": cls})  # noqa: S307
    return build


@dataclass(frozen=True, slots=True)
class RowQuery(Generic[T]):
    """sqlc's typed handle: ``RowQuery("orgs.get", Organization)``.

    Repositories declare these at module level; a test prepares each one and checks that
    the dataclass fields match the result columns by name, order, type and nullability.
    """

    name: str
    row: type[T]
    build: Callable[[Mapping[str, Any]], T] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.row):
            raise TypeError(f"RowQuery {self.name}: {self.row!r} is not a dataclass")
        object.__setattr__(self, "build", _builder(self.row))
