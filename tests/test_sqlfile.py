"""The query file parser and the :name → $n rewriter."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datalayer.core.errors import QueryLoadError, ValidationError
from datalayer.core.sqlfile import Shape, parse_text, rewrite


def test_rewrite_numbers_params_in_order_of_first_use() -> None:
    sql, params = rewrite("SELECT :b, :a, :b WHERE x = :c")
    assert sql == "SELECT $1, $2, $1 WHERE x = $3"
    assert params == ("b", "a", "c")


@pytest.mark.parametrize(
    "text",
    [
        "SELECT 1::int, now()::date",
        "SELECT ':x' , 'it''s :y'",
        "SELECT E'\\':x', e'a\\\\' ",
        'SELECT "col:x" FROM "t"" :y"',
        "SELECT $$ :x $$, $tag$ :y $tag$",
        "SELECT 1 -- :x comment\n",
        "SELECT /* :x /* nested :y */ :z */ 1",
        "SELECT f(a := 1)",
        "SELECT arr[1:2]",
        "SELECT U&'d\\0061t:a'",
    ],
)
def test_rewrite_leaves_non_parameters_alone(text: str) -> None:
    sql, params = rewrite(text)
    assert sql == text
    assert params == ()


def test_rewrite_param_followed_by_cast() -> None:
    assert rewrite("SELECT :id::uuid") == ("SELECT $1::uuid", ("id",))


def test_rewrite_identifier_ending_in_e_before_string_is_not_escape_string() -> None:
    # `type'…'` would be a typed literal; the quote still opens a plain string
    assert rewrite("SELECT date':x'") == ("SELECT date':x'", ())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("SELECT 'open", "unterminated string"),
        ("SELECT /* open", "unterminated /*"),
        ("SELECT $a$ open", "unterminated dollar quote"),
        ('SELECT "open', "unterminated quoted identifier"),
        ("SELECT $1", "positional placeholder $1"),
    ],
)
def test_rewrite_rejects_broken_sql(text: str, message: str) -> None:
    with pytest.raises(QueryLoadError, match=re.escape(message)):
        rewrite(text, "f.sql:3")


# -- property: fragments with known rewrites, concatenated with separators ---------------
_names = st.sampled_from(["id", "org_id", "name", "a", "b_2", "limit_", "x"])
_opaque = st.one_of(
    st.sampled_from(["::int", "::uuid[]", " := ", "1", "t.col", "arr[1:2]", "now()"]),
    st.text(alphabet="abc :$x_'", max_size=8).map(lambda s: "'" + s.replace("'", "''") + "'"),
    st.text(alphabet="abc :$x_\\'", max_size=8).map(
        lambda s: "E'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"),
    st.text(alphabet="abc :x_'\"", max_size=8).map(lambda s: '"' + s.replace('"', '""') + '"'),
    st.text(alphabet="abc :x_'", max_size=8).map(lambda s: "$q$" + s + "$q$"),
    st.text(alphabet="abc :x_'*", max_size=8).map(
        lambda s: "/*" + s.replace("*/", "") .replace("/*", "") + "*/"),
    st.text(alphabet="abc :x_'", max_size=8).map(lambda s: "--" + s + "\n"),
)
_fragment = st.one_of(_names.map(lambda n: ("param", n)), _opaque.map(lambda t: ("text", t)))


@given(st.lists(_fragment, max_size=12))
def test_rewrite_property(fragments: list[tuple[str, str]]) -> None:
    """Opaque fragments come out unchanged; each :name becomes the $n of its first use."""
    source, expected, order = [], [], []
    for kind, value in fragments:
        if kind == "param":
            if value not in order:
                order.append(value)
            source.append(":" + value)
            expected.append(f"${order.index(value) + 1}")
        else:
            source.append(value)
            expected.append(value)
    sql, params = rewrite(" ".join(source))
    assert sql == " ".join(expected)
    assert params == tuple(order)


@given(st.text(max_size=60))
def test_rewrite_never_crashes_unexpectedly(text: str) -> None:
    """Arbitrary text either rewrites or raises QueryLoadError, nothing else."""
    with contextlib.suppress(QueryLoadError):
        rewrite(text)


# -- files ------------------------------------------------------------------------------
GOOD = """\
-- File comment.

-- name: get :one
-- First line of doc.
-- Second line.
SELECT id FROM t WHERE id = :id;

-- name: bulk :copy
COPY t (id, name) FROM STDIN
"""


def test_parse_text_names_shapes_docs_and_provenance() -> None:
    get, bulk = parse_text(GOOD, namespace="things", filename="things.sql")
    assert get.name == "things.get"
    assert get.shape is Shape.ONE
    assert get.doc == "First line of doc.\nSecond line."
    assert get.params == ("id",)
    assert get.sql.startswith("/* datalayer:things.get */\n")
    assert get.sql.endswith("WHERE id = $1;")
    assert get.source == "things.sql:3"
    assert bulk.shape is Shape.COPY
    assert (bulk.copy_table, bulk.copy_columns) == ("t", ("id", "name"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("SELECT 1;\n-- name: a :one\nSELECT 1;", "f.sql:1: SQL before the first"),
        ("-- name: a :one\nSELECT 1;\n-- name: a :many\nSELECT 1;",
         "f.sql:3: duplicate query name 'a' (first defined at line 1)"),
        ("-- name: a :several\nSELECT 1;", "f.sql:1: unknown shape :several"),
        ("-- name: a\nSELECT 1;", "f.sql:1: query 'a' has no shape"),
        ("-- name:\nSELECT 1;", "f.sql:1: header needs a name"),
        ("-- name: a :one\n-- only a doc\n\n", "f.sql:1: query 'a' has an empty body"),
        ("-- name: a :one\n;\n", "f.sql:1: query 'a' has an empty body"),
        ("-- name: a-b :one\nSELECT 1;", "is not an identifier"),
        ("-- name: a :one extra\nSELECT 1;", "unexpected text after the shape"),
        ("-- name: a :copy\nINSERT INTO t VALUES (1)", "a :copy query must be"),
    ],
)
def test_parse_text_errors_name_file_and_line(text: str, message: str) -> None:
    with pytest.raises(QueryLoadError, match=re.escape(message)):
        parse_text(text, namespace="f", filename="f.sql")


def test_bind_by_keyword_checks_missing_and_unexpected() -> None:
    (q,) = parse_text("-- name: q :one\nSELECT :a, :b, :a", namespace="n", filename="n.sql")
    assert q.bind({"b": 2, "a": 1}) == [1, 2]
    with pytest.raises(ValidationError, match="missing b"):
        q.bind({"a": 1})
    with pytest.raises(ValidationError, match="unexpected c"):
        q.bind({"a": 1, "b": 2, "c": 3})
    with pytest.raises(ValidationError, match=r"missing b; unexpected z"):
        q.bind({"a": 1, "z": 3})
