"""Typed query handles: a registry query name bound to the row dataclass it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["RowQuery"]

T = TypeVar("T")


class Columns(Protocol):
    """What a builder reads: columns by name (an asyncpg Record, or a mapping)."""

    def __getitem__(self, key: str, /) -> Any: ...


def _builder(cls: type[T]) -> Callable[[Columns], T]:
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
        build: Callable[[Columns], T] = eval(  # noqa: S307
            f"lambda r: cls({args})", {"cls": cls})
        return build
    scope: dict[str, Any] = {"new": object.__new__, "cls": cls}
    lines = ["def build(r):", "    o = new(cls)"]
    for i, n in enumerate(names):
        scope[f"set{i}"] = getattr(cls, n).__set__
        lines.append(f"    set{i}(o, r[{n!r}])")
    lines.append("    return o")
    exec("\n".join(lines), scope)  # noqa: S102
    built: Callable[[Columns], T] = scope["build"]
    return built


@dataclass(frozen=True, slots=True)
class RowQuery(Generic[T]):
    """sqlc's typed handle: ``RowQuery("orgs.get", Organization)``.

    Repositories declare these at module level; a test prepares each one and checks that
    the dataclass fields match the result columns by name, order, type and nullability.
    """

    name: str
    row: type[T]
    build: Callable[[Columns], T] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.row):
            raise TypeError(f"RowQuery {self.name}: {self.row!r} is not a dataclass")
        object.__setattr__(self, "build", _builder(self.row))
