"""SemVer 2.0 versions and ranges: precedence (property-tested against a reference
implementation of the spec's rules), the SQL key, range parsing, normalization and errors."""

from __future__ import annotations

import functools
import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datalayer import DataLayer
from datalayer.semver import RangeError, Version, VersionError, parse_range, parse_version

# -- strategies -------------------------------------------------------------------------------

_nums = st.integers(min_value=0, max_value=30) | st.integers(min_value=0, max_value=999_999_999)
_numeric_id = st.integers(min_value=0, max_value=10**12).map(str)
_alnum_id = st.from_regex(r"\A[0-9A-Za-z-]{0,6}[A-Za-z-][0-9A-Za-z-]{0,6}\Z")
_pre = st.lists(_numeric_id | _alnum_id | st.sampled_from(["alpha", "beta", "rc", "1", "2"]),
                max_size=4)
_build = st.lists(st.from_regex(r"\A[0-9A-Za-z-]{1,6}\Z"), max_size=2)


@st.composite
def versions(draw: st.DrawFn) -> Version:
    return Version(draw(_nums), draw(_nums), draw(_nums), tuple(draw(_pre)),
                   tuple(draw(_build)))


def spec_compare(a: Version, b: Version) -> int:
    """SemVer 2.0 section 11, written out independently of the key."""
    for x, y in zip(a.core(), b.core(), strict=True):
        if x != y:
            return -1 if x < y else 1
    if not a.pre and not b.pre:
        return 0
    if not a.pre:
        return 1
    if not b.pre:
        return -1
    for s, t in zip(a.pre, b.pre, strict=False):
        if s == t:
            continue
        sd, td = s.isdigit(), t.isdigit()
        if sd and td:
            return -1 if int(s) < int(t) else 1
        if sd != td:
            return -1 if sd else 1
        return -1 if s < t else 1
    if len(a.pre) == len(b.pre):
        return 0
    return -1 if len(a.pre) < len(b.pre) else 1


def sign(n: int) -> int:
    return (n > 0) - (n < 0)


# -- versions ---------------------------------------------------------------------------------

@given(versions(), versions())
def test_version_order_matches_spec_precedence(a: Version, b: Version) -> None:
    expected = spec_compare(a, b)
    got = sign((a.key() > b.key()) - (a.key() < b.key()))
    assert got == expected
    assert (a == b) == (expected == 0)
    assert (a < b) == (expected < 0)


@given(st.lists(versions(), min_size=2, max_size=30))
def test_version_order_is_total_and_consistent(vs: list[Version]) -> None:
    ordered = sorted(vs)
    by_spec = sorted(vs, key=functools.cmp_to_key(spec_compare))
    assert [v.key() for v in ordered] == [v.key() for v in by_spec]
    for x, y in itertools.pairwise(ordered):
        assert x <= y and not y < x


@given(versions())
def test_version_text_round_trips(v: Version) -> None:
    again = parse_version(str(v))
    assert again == v and again.build == v.build and str(again) == str(v)


def test_version_spec_example_chain() -> None:
    chain = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta",
             "1.0.0-beta.2", "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.2.0",
             "1.10.0", "2.0.0"]
    shuffled = chain[:]
    random.Random(7).shuffle(shuffled)
    assert [str(v) for v in sorted(map(parse_version, shuffled))] == chain
    assert parse_version("1.0.0+build.1") == parse_version("1.0.0+other")


@pytest.mark.parametrize("text", ["1", "1.2", "01.2.3", "1.02.3", "1.2.3-01", "1.2.3-",
                                  "1.2.3+", "v1.2.3", "1.2.3-a..b", " 1.2.3", "1.2.3.4",
                                  "1000000000.0.0"])
def test_version_invalid_texts_are_refused_with_a_reason(text: str) -> None:
    with pytest.raises(VersionError, match=r"semantic version|limited"):
        parse_version(text)


async def test_version_sql_key_equals_python_key(dl: DataLayer) -> None:
    """app.semver_key (the vkey column) and Version.key agree, so SQL orders as SemVer."""
    rng = random.Random(11)
    texts = ["0.0.0", "1.0.0-0", "1.0.0-00a", "1.0.0-a-b.9.10", "999999999.0.0-rc.1+b",
             "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta.11", "1.0.0+meta"]
    for _ in range(300):
        pre = [rng.choice(["alpha", "beta", "rc", "x-y", "a1"]) if rng.random() < 0.5
               else str(rng.randint(0, 10**6)) for _ in range(rng.randint(0, 3))]
        texts.append(f"{rng.randint(0, 20)}.{rng.randint(0, 20)}.{rng.randint(0, 20)}"
                     + ("-" + ".".join(pre) if pre else ""))
    async with dl.system() as db:
        rows = await db.connection.fetch(
            "SELECT v, app.semver_key(v) AS k FROM unnest($1::text[]) v", texts)
        bad = await db.connection.fetch(
            "SELECT v FROM unnest($1::text[]) v WHERE app.semver_key(v) IS NOT NULL",
            ["1.2", "01.0.0", "1.0.0-01", "1.0.0-", "x"])
        sql_sorted = await db.connection.fetch(
            "SELECT v FROM unnest($1::text[]) v "
            "ORDER BY app.semver_key(v) COLLATE \"C\", v", sorted(set(texts)))
    for r in rows:
        assert r["k"] == parse_version(r["v"]).key(), r["v"]
    assert bad == []
    keys = [parse_version(r["v"]).key() for r in sql_sorted]
    assert keys == sorted(keys)


# -- ranges -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "normalized"), [
    ("^1.2.0", ">=1.2.0 <2.0.0-0"),
    ("^0.2.3", ">=0.2.3 <0.3.0-0"),
    ("^0.0.3", ">=0.0.3 <0.0.4-0"),
    ("~1.4", ">=1.4.0 <1.5.0-0"),
    ("~1.4.2", ">=1.4.2 <1.5.0-0"),
    (">=1.0 <2.0", ">=1.0.0 <2.0.0-0"),
    (">= 1.0.0", ">=1.0.0"),
    ("1.2.3", "=1.2.3"),
    ("=1.2.3-beta.1", "=1.2.3-beta.1"),
    ("*", "*"),
    ("", "*"),
    ("1.x", ">=1.0.0 <2.0.0-0"),
    ("1.2.*", ">=1.2.0 <1.3.0-0"),
    ("1", ">=1.0.0 <2.0.0-0"),
    (">1.2", ">=1.3.0"),
    ("<=1.2", "<1.3.0-0"),
    ("1.2.3 - 2.0.0", ">=1.2.3 <=2.0.0"),
    ("^1.0.0 || ^3.0.0", ">=1.0.0 <2.0.0-0 || >=3.0.0 <4.0.0-0"),
])
def test_range_parses_to_normalized_form(text: str, normalized: str) -> None:
    r = parse_range(text)
    assert str(r) == normalized
    assert parse_range(str(r)) == r


@pytest.mark.parametrize(("text", "message"), [
    ("^1.2.x.3", "not a version or partial version"),
    (">=", "without a version"),
    ("1.2.3 | 2", r"use '\|\|'"),
    ("^1.2 || ", "empty alternative"),
    ("~>>1", "unexpected operator"),
    ("1.x.3", "wildcard is followed by a number"),
    ("01.2.3", "leading zeros"),
    ("1.2.3;drop", "unexpected character ';' at position 5"),
    ("1.2-beta", "not a version or partial version"),
])
def test_range_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(RangeError, match=message):
        parse_range(text)


@pytest.mark.parametrize(("rng", "version", "ok"), [
    ("^1.2.0", "1.2.0", True), ("^1.2.0", "1.9.9", True), ("^1.2.0", "2.0.0", False),
    ("^1.2.0", "1.1.9", False), ("~1.4", "1.4.9", True), ("~1.4", "1.5.0", False),
    (">=1.0 <2.0", "1.99.0", True), (">=1.0 <2.0", "2.0.0-rc.1", False),
    ("*", "0.0.1", True), ("1.x", "1.3.0", True), ("1.x", "2.0.0", False),
    ("^1.2.0", "1.5.0-beta.1", False),  # pre-releases need asking
    (">=1.5.0-beta.1", "1.5.0-beta.2", True),  # ... unless the range names one of that core
    (">=1.5.0-beta.1", "1.6.0-beta.2", False),
    ("1.2.3 - 2.0.0", "2.0.0", True), ("^1.0.0 || ^3.0.0", "3.1.0", True),
    ("^1.0.0 || ^3.0.0", "2.1.0", False),
])
def test_range_admits(rng: str, version: str, ok: bool) -> None:
    assert parse_range(rng).admits(parse_version(version)) is ok


def test_range_admits_prereleases_when_asked() -> None:
    assert parse_range("^1.2.0").admits(parse_version("1.5.0-beta.1"), prerelease=True)
    assert not parse_range("^1.2.0").admits(parse_version("2.0.0-beta.1"), prerelease=True)


@given(versions(), versions())
def test_range_between_two_versions_matches_precedence(a: Version, b: Version) -> None:
    lo, hi = sorted([a, b])
    lo_t = str(Version(*lo.core(), lo.pre))
    hi_t = str(Version(*hi.core(), hi.pre))
    r = parse_range(f">={lo_t} <={hi_t}")
    assert parse_range(str(r)) == r
    assert r.admits(lo, prerelease=True) and r.admits(hi, prerelease=True)


def test_range_interval_for_advisories() -> None:
    lo, hi = parse_range(">=1.0.0 <1.4.2").interval()
    assert (str(lo), str(hi)) == ("1.0.0", "1.4.2")
    assert parse_range("<2.0.1").interval()[0] is None
    with pytest.raises(RangeError, match="one interval"):
        parse_range("^1.0.0 || ^2.0.0").interval()
    with pytest.raises(RangeError, match="must have the form"):
        parse_range("<=1.0.0").interval()
