"""Typed query handles: a registry query name bound to the row dataclass it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["RowQuery"]

T = TypeVar("T")


def _builder(cls: type[T]) -> Callable[[Mapping[str, Any]], T]:
    """A function that builds ``cls`` from a record by column name, generated once.

    Row classes are frozen, slotted dataclasses without ``__post_init__``, so the fields can
    be written straight into their slots: ``o = object.__new__(cls)`` and one slot-descriptor
    store per field, which costs under half of calling the frozen ``__init__`` (that goes
    through ``object.__setattr__`` per field). Other classes get ``cls(a=r['a'], …)``.
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    slotted = "__slots__" in vars(cls) and not hasattr(cls, "__post_init__")
    if not slotted:
        args = ", ".join(f"{n}=r[{n!r}]" for n in names)
        build: Callable[[Mapping[str, Any]], T] = eval(  # noqa: S307
            f"lambda r: cls({args})", {"cls": cls})
        return build
    scope: dict[str, Any] = {"new": object.__new__, "cls": cls}
    lines = ["def build(r):", "    o = new(cls)"]
    for i, n in enumerate(names):
        scope[f"set{i}"] = getattr(cls, n).__set__
        lines.append(f"    set{i}(o, r[{n!r}])")
    lines.append("    return o")
    exec("\n".join(lines), scope)  # noqa: S102
    built: Callable[[Mapping[str, Any]], T] = scope["build"]
    return built


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
