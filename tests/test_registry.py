"""The registry: loading, and the contract between queries, the schema and row dataclasses."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import importlib
import ipaddress
import pkgutil
import re
import types
import typing
import uuid
from pathlib import Path
from typing import Any

import pytest

import datalayer.repos
from datalayer import DataLayer, RowQuery
from datalayer.core.errors import QueryLoadError
from datalayer.core.registry import QueryInfo, Registry
from datalayer.core.resources import resource_dir
from datalayer.core.sqlfile import Shape


def test_registry_loads_every_query_file_with_namespaced_names() -> None:
    reg = Registry.load(resource_dir("queries"))
    files = {p.stem for p in resource_dir("queries").glob("*.sql")}
    assert {name.split(".")[0] for name in reg} == files
    assert reg["orgs.get"].shape is Shape.ONE
    assert reg["orgs.get"].doc.startswith("The current context's organization")


def test_registry_load_errors_name_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "good.sql").write_text("-- name: a :one\nSELECT 1;\n")
    (tmp_path / "bad.sql").write_text("-- name: a :one\nSELECT 1;\n\n-- name: b :nope\nSELECT 2;\n")
    with pytest.raises(QueryLoadError, match=re.escape("bad.sql:4: unknown shape :nope")):
        Registry.load(tmp_path)
    with pytest.raises(QueryLoadError, match="does not exist"):
        Registry.load(tmp_path / "missing")


def test_registry_lookup_suggests_close_names() -> None:
    reg = Registry.load(resource_dir("queries"))
    with pytest.raises(Exception, match=r"did you mean orgs\.get"):
        reg["orgs.gett"]


@pytest.fixture(scope="module")
async def infos(dl: DataLayer) -> dict[str, QueryInfo]:
    return {i.name: i for i in await dl.validate()}


async def test_every_registry_query_prepares_against_the_schema(
    infos: dict[str, QueryInfo],
) -> None:
    failures = {n: i.error for n, i in infos.items() if not i.ok}
    assert not failures
    assert infos["orgs.get"].params == (("id", "uuid"),)
    cols = {c.name: c for c in infos["orgs.get"].columns}
    assert (cols["slug"].nullable, cols["deleted_at"].nullable) == (False, True)
    assert infos["orgs.count_all"].columns[0].nullable is None  # computed


async def test_validate_reports_a_broken_query(dl: DataLayer, tmp_path: Path) -> None:
    (tmp_path / "broken.sql").write_text(
        "-- name: nope :one\nSELECT no_such_column FROM organizations;\n"
        "-- name: silent :one\nUPDATE organizations SET name = name WHERE false;\n")
    layer = DataLayer(dl.settings, extra_queries=[tmp_path])
    await layer.start()
    try:
        by_name = {i.name: i for i in await layer.validate()}
    finally:
        await layer.close()
    assert "no_such_column" in (by_name["broken.nope"].error or "")
    assert "returns no columns" in (by_name["broken.silent"].error or "")


# -- row dataclasses match their queries ----------------------------------------------------------
_PG_TO_PY: dict[str, tuple[type, ...]] = {
    "uuid": (uuid.UUID,),
    "text": (str,), "varchar": (str,), "citext": (str,), "name": (str,), "bpchar": (str,),
    "int2": (int,), "int4": (int,), "int8": (int,),
    "bool": (bool,),
    "float4": (float,), "float8": (float,),
    "numeric": (decimal.Decimal,),
    "timestamptz": (dt.datetime,), "timestamp": (dt.datetime,), "date": (dt.date,),
    "interval": (dt.timedelta,),
    "bytea": (bytes,),
    "inet": (ipaddress.IPv4Address, ipaddress.IPv6Address),
    "jsonb": (dict, list, object), "json": (dict, list, object),
    "_text": (list,), "_uuid": (list,), "_int4": (list,), "_int8": (list,),
}


def _row_queries() -> list[RowQuery[Any]]:
    found: list[RowQuery[Any]] = []
    for mod in pkgutil.iter_modules(datalayer.repos.__path__):
        module = importlib.import_module(f"datalayer.repos.{mod.name}")
        found += [v for v in vars(module).values() if isinstance(v, RowQuery)]
    return found


def _split_optional(annotation: Any) -> tuple[set[Any], bool]:
    """The non-None members of an annotation and whether None is allowed."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = set(typing.get_args(annotation))
        return args - {type(None)}, type(None) in args
    return {annotation}, False


def test_row_query_discovery_finds_the_repositories() -> None:
    names = {q.name for q in _row_queries()}
    assert {"orgs.get", "orgs.create", "orgs.list_visible"} <= names


@pytest.mark.parametrize("rq", _row_queries(), ids=lambda q: q.name)
async def test_row_dataclass_matches_query_columns(
    rq: RowQuery[Any], infos: dict[str, QueryInfo],
) -> None:
    info = infos[rq.name]
    fields = dataclasses.fields(rq.row)
    assert [f.name for f in fields] == [c.name for c in info.columns], (
        f"{rq.row.__name__} fields differ from the columns of {rq.name}")
    hints = typing.get_type_hints(rq.row)
    for col in info.columns:
        members, optional = _split_optional(hints[col.name])
        if col.nullable is True:
            assert optional, f"{rq.row.__name__}.{col.name} is nullable in SQL: add '| None'"
        if col.nullable is False:
            assert not optional, f"{rq.row.__name__}.{col.name} is NOT NULL: drop '| None'"
        expected = _PG_TO_PY.get(col.type)
        if expected is None or Any in members:
            continue
        origins = {typing.get_origin(m) or m for m in members}
        assert origins & set(expected), (
            f"{rq.row.__name__}.{col.name}: {hints[col.name]} does not hold {col.type}")
