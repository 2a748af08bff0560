"""Typed namespaces: rebuild a row dataclass from the JSON the cache stored.

orjson writes dataclasses, UUIDs and datetimes natively (the codec adds bytes, Decimal and
timedelta); reading gives plain JSON back. :func:`row_converter` builds, once per class, a
function that turns that JSON into the dataclass again, converting each field by its
annotation (UUID, datetime, date, time, Decimal, bytes, timedelta; ``X | None`` allowed).
Other annotations (str, int, lists, dicts, Any) pass through as JSON gave them.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import decimal
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["row_converter"]

T = TypeVar("T")


def _b64(value: Any) -> bytes:
    return base64.b64decode(value)


def _seconds(value: Any) -> dt.timedelta:
    return dt.timedelta(seconds=value)


_CONVERT: dict[Any, Callable[[Any], Any]] = {
    uuid.UUID: uuid.UUID,
    dt.datetime: dt.datetime.fromisoformat,
    dt.date: dt.date.fromisoformat,
    dt.time: dt.time.fromisoformat,
    decimal.Decimal: decimal.Decimal,
    bytes: _b64,
    dt.timedelta: _seconds,
}


def _base(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else None
    return annotation


def row_converter(cls: type[T]) -> Callable[[Any], T]:
    """A function ``JSON object -> cls`` (a dataclass); raises TypeError/ValueError/KeyError
    on data that does not fit, which the cache treats as an unreadable entry."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = [(f.name, _CONVERT.get(_base(hints[f.name]))) for f in dataclasses.fields(cls)]

    def convert(data: Any) -> T:
        kwargs = {}
        for name, conv in fields:
            value = data[name]
            kwargs[name] = value if conv is None or value is None else conv(value)
        return cls(**kwargs)

    return convert
