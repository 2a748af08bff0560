"""Semantic Versioning 2.0: versions, their precedence key, and dependency ranges.

:func:`Version.key` is the text whose code-point order is SemVer precedence; PostgreSQL
computes the same text (``app.semver_key``, column ``plugin_versions.vkey``, collation "C"),
so SQL ``ORDER BY vkey`` and Python ``sorted(key=Version.key)`` agree.

Range syntax (npm-style): ``*`` / ``x`` (any), exact ``1.2.3`` or ``=1.2.3``, comparators
``>=1.0 <2.0`` (space = and), X-ranges ``1.x`` ``1.2.*`` ``1``, caret ``^1.2.0`` (same
left-most non-zero part), tilde ``~1.4`` (same minor), hyphen ``1.2.3 - 2.0.0``, and unions
``A || B``. :func:`parse_range` returns a :class:`Range` whose ``str()`` is the normalized
form stored in ``plugin_dependencies.range``. A pre-release version satisfies a range only
when pre-releases are asked for, or when a comparator of the range names a pre-release of
the same major.minor.patch (``>=1.2.0-beta.1`` admits ``1.2.0-rc.1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from datalayer.core.errors import ValidationError

__all__ = ["Comparator", "Range", "RangeError", "Version", "VersionError", "parse_range",
           "parse_version", "version_from_key"]

_NUM = r"0|[1-9]\d*"
_PRE_ID = r"0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*"
_VERSION_RE = re.compile(
    rf"^(?P<major>{_NUM})\.(?P<minor>{_NUM})\.(?P<patch>{_NUM})"
    rf"(?:-(?P<pre>(?:{_PRE_ID})(?:\.(?:{_PRE_ID}))*))?"
    r"(?:\+(?P<build>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$")
_MAX_PART = 999_999_999  # 9 digits: the width of the key (and int4 in SQL)


class VersionError(ValidationError):
    """A text is not a SemVer 2.0 version."""


class RangeError(ValidationError):
    """A text is not a valid version range."""


@dataclass(frozen=True, slots=True)
class Version:
    """A SemVer 2.0 version. Equality and order are precedence (build metadata ignored)."""

    major: int
    minor: int
    patch: int
    pre: tuple[str, ...] = ()
    build: tuple[str, ...] = ()
    _key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_key", self._make_key())

    @property
    def prerelease(self) -> bool:
        return bool(self.pre)

    def key(self) -> str:
        """The precedence key (the same text as SQL ``app.semver_key``)."""
        return self._key

    def _make_key(self) -> str:
        out = f"{self.major:09d}.{self.minor:09d}.{self.patch:09d}"
        if not self.pre:
            return out + "\x03"
        parts = []
        for ident in self.pre:
            parts.append(f"0{len(ident):03d}{ident}" if ident.isdigit() else "1" + ident)
        return out + "\x02" + "\x01".join(parts)

    def core(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def __str__(self) -> str:
        out = f"{self.major}.{self.minor}.{self.patch}"
        if self.pre:
            out += "-" + ".".join(self.pre)
        if self.build:
            out += "+" + ".".join(self.build)
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __lt__(self, other: Version) -> bool:
        return self._key < other._key

    def __le__(self, other: Version) -> bool:
        return self._key <= other._key

    def __gt__(self, other: Version) -> bool:
        return self._key > other._key

    def __ge__(self, other: Version) -> bool:
        return self._key >= other._key


def version_from_key(text: str, key: str) -> Version:
    """A version from its text and its precedence key as PostgreSQL computed it (the
    ``vkey`` column): the fast path for many rows read back from the database. Releases
    without build metadata skip the regular expression."""
    if "-" in text or "+" in text:
        return parse_version(text)
    major, minor, patch = text.split(".")
    v: Version = object.__new__(Version)
    object.__setattr__(v, "major", int(major))
    object.__setattr__(v, "minor", int(minor))
    object.__setattr__(v, "patch", int(patch))
    object.__setattr__(v, "pre", ())
    object.__setattr__(v, "build", ())
    object.__setattr__(v, "_key", key)
    return v


def parse_version(text: str) -> Version:
    """A version from its text; :class:`VersionError` saying what is wrong otherwise."""
    if not isinstance(text, str):
        raise VersionError("a version must be a string like 1.2.3")
    m = _VERSION_RE.match(text)
    if m is None:
        raise VersionError(f"{text[:64]!r} is not a semantic version (MAJOR.MINOR.PATCH, "
                           "optional -pre.release and +build; no leading zeros)")
    nums = int(m["major"]), int(m["minor"]), int(m["patch"])
    if max(nums) > _MAX_PART:
        raise VersionError(f"{text[:64]!r}: version numbers are limited to {_MAX_PART}")
    pre = tuple(m["pre"].split(".")) if m["pre"] else ()
    build = tuple(m["build"].split(".")) if m["build"] else ()
    return Version(*nums, pre, build)


# -- ranges ---------------------------------------------------------------------------------

_OPS = (">=", "<=", ">", "<", "=")


@dataclass(frozen=True, slots=True)
class Comparator:
    op: str  # one of _OPS
    version: Version

    def test(self, v: Version) -> bool:
        a, b = v._key, self.version._key
        if self.op == ">=":
            return a >= b
        if self.op == "<=":
            return a <= b
        if self.op == ">":
            return a > b
        if self.op == "<":
            return a < b
        return a == b

    def __str__(self) -> str:
        return f"{self.op}{self.version}"


@dataclass(frozen=True, slots=True)
class Range:
    """A union (``||``) of comparator sets (all must hold); an empty set means any version."""

    sets: tuple[tuple[Comparator, ...], ...]

    def admits(self, v: Version, *, prerelease: bool = False) -> bool:
        """Does ``v`` satisfy the range (see the module docstring for pre-releases)?"""
        for comps in self.sets:
            if not all(c.test(v) for c in comps):
                continue
            if not v.pre or prerelease:
                return True
            if any(c.version.pre and c.version.core() == v.core()
                   and c.version.pre != ("0",) for c in comps):
                return True
        return False

    def interval(self) -> tuple[Version | None, Version | None]:
        """(introduced, fixed): the range as ``>=introduced <fixed`` for advisories;
        :class:`RangeError` when it is not one such interval."""
        if len(self.sets) != 1:
            raise RangeError("an affected range must be one interval (no ||)")
        lo: Version | None = None
        hi: Version | None = None
        for c in self.sets[0]:
            if c.op == ">=" and lo is None:
                lo = c.version
            elif c.op == "<" and hi is None:
                hi = c.version
            else:
                raise RangeError("an affected range must have the form '>=A <B', '<B' or "
                                 f"'>=A' (got {self})")
        return lo, hi

    def __str__(self) -> str:
        if any(not comps for comps in self.sets):
            return "*"
        return " || ".join(" ".join(map(str, comps)) for comps in self.sets)


_PARTIAL_RE = re.compile(
    r"^v?(?P<major>\d+|[xX*])(?:\.(?P<minor>\d+|[xX*])(?:\.(?P<patch>\d+|[xX*])"
    r"(?:-(?P<pre>[0-9A-Za-z.-]+))?(?:\+(?P<build>[0-9A-Za-z.-]+))?)?)?$")


@dataclass(frozen=True, slots=True)
class _Partial:
    major: int | None
    minor: int | None
    patch: int | None
    pre: tuple[str, ...]

    def floor(self) -> Version:
        return Version(self.major or 0, self.minor or 0, self.patch or 0, self.pre)


def _num(part: str | None, text: str) -> int | None:
    if part is None or part in ("x", "X", "*"):
        return None
    if len(part) > 1 and part.startswith("0"):
        raise RangeError(f"{text!r}: numbers have no leading zeros")
    n = int(part)
    if n > _MAX_PART:
        raise RangeError(f"{text!r}: version numbers are limited to {_MAX_PART}")
    return n


def _partial(text: str, whole: str) -> _Partial:
    m = _PARTIAL_RE.match(text)
    if m is None:
        raise RangeError(f"invalid version range {whole!r}: {text!r} is not a version or "
                         "partial version (like 1, 1.2, 1.2.3, 1.x)")
    major, minor, patch = (_num(m["major"], text), _num(m["minor"], text),
                           _num(m["patch"], text))
    if (major is None and minor is not None) or (minor is None and patch is not None):
        raise RangeError(f"invalid version range {whole!r}: in {text!r} a wildcard is "
                         "followed by a number")
    pre: tuple[str, ...] = ()
    if m["pre"]:
        if patch is None:
            raise RangeError(f"invalid version range {whole!r}: a pre-release needs a full "
                             f"version in {text!r}")
        pre = parse_version(f"{major}.{minor}.{patch}-{m['pre']}").pre
    return _Partial(major, minor, patch, pre)


def _upper(p: _Partial) -> Version | None:
    """The exclusive upper bound of an X-range (``1.2`` -> ``<1.3.0-0``); None for ``*``."""
    if p.major is None:
        return None
    if p.minor is None:
        return Version(p.major + 1, 0, 0, ("0",))
    return Version(p.major, p.minor + 1, 0, ("0",))


def _xrange(p: _Partial) -> list[Comparator]:
    if p.patch is not None and p.minor is not None and p.major is not None:
        return [Comparator("=", p.floor())]
    hi = _upper(p)
    if hi is None:
        return []
    return [Comparator(">=", p.floor()), Comparator("<", hi)]


def _caret(p: _Partial, whole: str) -> list[Comparator]:
    if p.major is None:
        return []
    lo = p.floor()
    if p.major > 0 or p.minor is None:
        hi = Version(p.major + 1, 0, 0, ("0",))
    elif p.minor > 0 or p.patch is None:
        hi = Version(0, p.minor + 1, 0, ("0",))
    else:
        hi = Version(0, 0, (p.patch or 0) + 1, ("0",))
    return [Comparator(">=", lo), Comparator("<", hi)]


def _tilde(p: _Partial) -> list[Comparator]:
    if p.major is None:
        return []
    lo = p.floor()
    hi = Version(p.major + 1, 0, 0, ("0",)) if p.minor is None else \
        Version(p.major, p.minor + 1, 0, ("0",))
    return [Comparator(">=", lo), Comparator("<", hi)]


def _operator(op: str, p: _Partial) -> list[Comparator]:
    if p.major is None:  # >=* and friends: any (or nothing for < / >)
        return [] if op in (">=", "<=", "=") else [Comparator("<", Version(0, 0, 0, ("0",)))]
    exact = p.minor is not None and p.patch is not None
    if op == "=":
        return _xrange(p)
    if op == ">=":
        return [Comparator(">=", p.floor())]
    if op == "<":
        return [Comparator("<", p.floor() if exact else Version(
            p.major, p.minor or 0, 0, ("0",)))]
    if op == ">":
        if exact:
            return [Comparator(">", p.floor())]
        hi = _upper(p)
        assert hi is not None
        return [Comparator(">=", Version(hi.major, hi.minor, hi.patch))]
    # <=
    if exact:
        return [Comparator("<=", p.floor())]
    hi = _upper(p)
    assert hi is not None
    return [Comparator("<", hi)]


_TOKEN_RE = re.compile(r"^(\^|~>?|>=|<=|>|<|=)?\s*(.*)$")


def _comparator_set(text: str, whole: str) -> tuple[Comparator, ...]:
    text = text.strip()
    if not text:
        raise RangeError(f"invalid version range {whole!r}: an empty alternative around '||'")
    hy = re.fullmatch(r"(\S+)\s+-\s+(\S+)", text)
    if hy:
        lo, hi = _partial(hy[1], whole), _partial(hy[2], whole)
        return tuple(_operator(">=", lo) + _operator("<=", hi))
    # glue operators to their version: ">= 1.0" -> ">=1.0"
    tokens = re.sub(r"(\^|~>?|>=|<=|>|<|=)\s+", r"\1", text).split()
    out: list[Comparator] = []
    for tok in tokens:
        m = _TOKEN_RE.match(tok)
        assert m is not None
        op, rest = m[1] or "", m[2]
        if not rest:
            raise RangeError(f"invalid version range {whole!r}: {op!r} without a version")
        if rest[0] in "<>=^~":
            raise RangeError(f"invalid version range {whole!r}: unexpected operator in "
                             f"{tok!r}")
        p = _partial(rest, whole)
        if op == "^":
            out += _caret(p, whole)
        elif op.startswith("~"):
            out += _tilde(p)
        elif op:
            out += _operator(op, p)
        else:
            out += _xrange(p)
    return tuple(out)


def parse_range(text: str) -> Range:
    """Parse a range (see the module docstring); :class:`RangeError` names what is wrong."""
    if not isinstance(text, str):
        raise RangeError("a version range must be a string")
    if len(text) > 200:
        raise RangeError("a version range is at most 200 characters")
    stripped = text.strip()
    if stripped in ("", "*", "x", "X", "latest"):
        return Range(((),))
    bad = re.search(r"[^0-9A-Za-z.\-+*^~<>=|\s]", stripped)
    if bad:
        raise RangeError(f"invalid version range {text!r}: unexpected character "
                         f"{bad.group()!r} at position {bad.start()}")
    if re.search(r"(?<!\|)\|(?!\|)", stripped):
        raise RangeError(f"invalid version range {text!r}: use '||' for alternatives")
    return Range(tuple(_comparator_set(part, text) for part in stripped.split("||")))
