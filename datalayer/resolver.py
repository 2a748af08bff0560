"""Dependency resolution over a fetched candidate graph (pure Python, no I/O).

:func:`resolve` picks, for every plugin reachable from the requirements, the highest version
that satisfies every constraint imposed on it (by the requirements and by the dependencies of
the versions picked so far), backtracking to lower versions when a choice leads to a dead end.
It fails with :class:`ResolutionConflict` naming the constraints that cannot hold together
and who imposed them, or the dependency cycle among the picked versions. Yanked versions are
not candidates (the graph query leaves them out); pre-releases only when asked for, or when
a range names one (see :mod:`datalayer.semver`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

from datalayer.core.errors import Conflict
from datalayer.semver import Range, Version, parse_range, version_from_key

__all__ = ["ROOT", "Candidate", "Constraint", "PackedCandidates", "Resolution",
           "ResolutionConflict", "Resolved", "resolve"]

ROOT = "<requirements>"
MAX_STEPS = 20_000


class Candidate:
    """One installable version of a plugin, with its dependencies (plugin id, range).

    Built from a packed line (:class:`PackedCandidates`): the version as text with its SQL
    precedence key, the dependencies as ``dep_ids`` and ``dep_ranges`` texts, both parsed on
    first use (ranges through ``ranges``, a cache shared by the candidates of one
    resolution): most candidates of a large graph are never picked, so most are never
    parsed."""

    __slots__ = ("_dep_ids", "_dep_ranges", "_deps", "_key", "_ranges", "_text", "_version",
                 "plugin_id", "plugin_name", "version_id")

    def __init__(self, plugin_id: uuid.UUID, plugin_name: str, version_id: uuid.UUID,
                 version: str, *, key: str, dep_ids: Sequence[uuid.UUID],
                 dep_ranges: Sequence[str], ranges: dict[str, Range]) -> None:
        self.plugin_id = plugin_id
        self.plugin_name = plugin_name
        self.version_id = version_id
        self._version: Version | None = None  # parsed on first use, with its SQL key
        self._text, self._key = version, key
        self._deps: tuple[tuple[uuid.UUID, Range], ...] | None = None
        self._dep_ids = dep_ids
        self._dep_ranges = dep_ranges
        self._ranges = ranges

    @property
    def version(self) -> Version:
        v = self._version
        if v is None:
            v = self._version = version_from_key(self._text, self._key)
        return v

    @property
    def deps(self) -> tuple[tuple[uuid.UUID, Range], ...]:
        if self._deps is None:
            cache = self._ranges
            out = []
            for dep, text in zip(self._dep_ids, self._dep_ranges, strict=True):
                rng = cache.get(text)
                if rng is None:
                    rng = cache[text] = parse_range(text)
                out.append((dep, rng))
            self._deps = tuple(out)
        return self._deps

    def __repr__(self) -> str:
        return f"Candidate({self.plugin_name}@{self.version})"


class PackedCandidates(Sequence[Candidate]):
    """The candidates of one plugin from its packed text (``app.plugin_graph_packed``: a
    line per version, highest first: id, version, vkey, comma-separated dependency ids,
    then one range per dependency, tab separated), each parsed on first access: the
    resolution usually takes the first candidate that fits and never looks at the rest, so
    a large graph costs a few allocations per plugin rather than several per version (fewer
    objects surviving into the collector's old generation, fewer full collections)."""

    __slots__ = ("_lines", "_name", "_parsed", "_pid", "_ranges")

    def __init__(self, plugin_id: uuid.UUID, plugin_name: str, versions: str,
                 ranges: dict[str, Range]) -> None:
        self._pid = plugin_id
        self._name = plugin_name
        self._lines = versions.split("\n") if versions else []
        self._parsed: list[Candidate | None] = [None] * len(self._lines)
        self._ranges = ranges

    def __len__(self) -> int:
        return len(self._lines)

    def _at(self, i: int) -> Candidate:
        c = self._parsed[i]
        if c is None:
            vid, text, key, ids, *ranges = self._lines[i].split("\t")
            c = self._parsed[i] = Candidate(
                self._pid, self._name, uuid.UUID(vid), text, key=key,
                dep_ids=[uuid.UUID(x) for x in ids.split(",")] if ids else [],
                dep_ranges=ranges, ranges=self._ranges)
        return c

    @overload
    def __getitem__(self, i: int) -> Candidate: ...
    @overload
    def __getitem__(self, i: slice) -> list[Candidate]: ...
    def __getitem__(self, i: int | slice) -> Candidate | list[Candidate]:
        if isinstance(i, slice):
            return [self._at(k) for k in range(*i.indices(len(self._lines)))]
        if i < 0:
            i += len(self._lines)
        if not 0 <= i < len(self._lines):
            raise IndexError(i)
        return self._at(i)

    def __iter__(self) -> Iterator[Candidate]:
        for i in range(len(self._lines)):
            yield self._at(i)


@dataclass(frozen=True, slots=True)
class Constraint:
    """``range`` on ``plugin``, imposed by ``required_by`` (``name@version`` or ROOT)."""

    plugin_id: uuid.UUID
    plugin: str
    range: str
    required_by: str

    def __str__(self) -> str:
        return f"{self.plugin} {self.range} (required by {self.required_by})"


@dataclass(frozen=True, slots=True)
class Resolved:
    plugin_id: uuid.UUID
    plugin_name: str
    version_id: uuid.UUID
    version: str


@dataclass(frozen=True, slots=True)
class Resolution:
    """The versions to install, dependencies before their dependents."""

    installs: list[Resolved]
    steps: int = 0

    def version_of(self, plugin_id: uuid.UUID) -> str | None:
        return next((r.version for r in self.installs if r.plugin_id == plugin_id), None)


class ResolutionConflict(Conflict):
    """No set of versions satisfies the constraints. ``constraints`` are the incompatible
    constraints (on one plugin) and who imposed them; ``cycle`` the plugin names of a
    dependency cycle, when that is the reason."""

    def __init__(self, message: str, *, constraints: Sequence[Constraint] = (),
                 cycle: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.constraints = list(constraints)
        self.cycle = list(cycle)


@dataclass
class _State:
    """The search. Constraints on a plugin are (range, imposing candidate or None for the
    requirements); ``undecided`` holds the constrained plugins not chosen yet, in the order
    they were first constrained (a dict as an ordered set: O(1) per change)."""

    candidates: Mapping[uuid.UUID, Sequence[Candidate]]
    names: dict[uuid.UUID, str]
    prerelease: bool
    constraints: dict[uuid.UUID, list[tuple[Range, Candidate | None]]] = field(
        default_factory=dict)
    undecided: dict[uuid.UUID, None] = field(default_factory=dict)
    chosen: dict[uuid.UUID, Candidate] = field(default_factory=dict)
    conflict: list[Constraint] | None = None
    steps: int = 0

    def options(self, pid: uuid.UUID) -> Iterator[Candidate]:
        """The candidates (highest first) that satisfy every constraint on ``pid``, lazily:
        most of the time the first one is taken and the rest are never looked at."""
        cons = [r for r, _ in self.constraints[pid]]
        pre = self.prerelease
        for c in self.candidates.get(pid, ()):
            v = c.version
            if all(r.admits(v, prerelease=pre) for r in cons):
                yield c

    def constrain(self, pid: uuid.UUID, rng: Range, by: Candidate | None) -> None:
        cons = self.constraints.get(pid)
        if cons is None:
            cons = self.constraints[pid] = []
            if pid not in self.chosen:
                self.undecided[pid] = None
        cons.append((rng, by))

    def unconstrain(self, pid: uuid.UUID) -> None:
        cons = self.constraints[pid]
        cons.pop()
        if not cons:
            del self.constraints[pid]
            self.undecided.pop(pid, None)

    def note(self, pid: uuid.UUID) -> None:
        if self.conflict is None:
            name = self.names.get(pid, str(pid))
            self.conflict = [
                Constraint(pid, name, str(r),
                           ROOT if by is None else f"{by.plugin_name}@{by.version}")
                for r, by in self.constraints[pid]]

    def solve(self) -> bool:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ResolutionConflict(f"dependency resolution gave up after {MAX_STEPS} steps "
                                     "(too many combinations); pin some versions")
        if not self.undecided:
            return True
        pid = next(iter(self.undecided))
        del self.undecided[pid]
        tried = False
        for cand in self.options(pid):
            tried = True
            self.chosen[pid] = cand
            added: list[uuid.UUID] = []
            ok = True
            for dep, rng in cand.deps:
                self.constrain(dep, rng, cand)
                added.append(dep)
                picked = self.chosen.get(dep)
                if picked is not None and not rng.admits(picked.version,
                                                         prerelease=self.prerelease):
                    ok = False
                    self.note(dep)
                    break
            if ok and self.solve():
                return True
            for dep in reversed(added):
                self.unconstrain(dep)
            del self.chosen[pid]
        if not tried:
            self.note(pid)
        # put it back first in line, as it was
        self.undecided = {pid: None, **self.undecided}
        return False


def _cycle(chosen: Mapping[uuid.UUID, Candidate]) -> list[str] | None:
    """A dependency cycle among the chosen versions (names, first repeated at the end).
    Iterative (no recursive closure: a closure that calls itself is a reference cycle that
    would keep the whole resolution alive until the collector runs)."""
    color: dict[uuid.UUID, int] = {}
    for root in chosen:
        if root in color:
            continue
        color[root] = 1
        stack: list[uuid.UUID] = [root]
        iters = [iter(chosen[root].deps)]
        while iters:
            for dep, _ in iters[-1]:
                if dep not in chosen:
                    continue
                state = color.get(dep)
                if state == 1:
                    loop = [*stack[stack.index(dep):], dep]
                    return [chosen[p].plugin_name for p in loop]
                if state is None:
                    color[dep] = 1
                    stack.append(dep)
                    iters.append(iter(chosen[dep].deps))
                    break
            else:
                color[stack.pop()] = 2
                iters.pop()
    return None


def _order(chosen: Mapping[uuid.UUID, Candidate]) -> list[Candidate]:
    """Dependencies first (the graph is acyclic here); iterative, as :func:`_cycle`."""
    out: list[Candidate] = []
    seen: set[uuid.UUID] = set()
    for root in sorted(chosen, key=lambda p: chosen[p].plugin_name):
        if root in seen:
            continue
        seen.add(root)
        stack = [root]
        iters = [iter(chosen[root].deps)]
        while iters:
            for dep, _ in iters[-1]:
                if dep in chosen and dep not in seen:
                    seen.add(dep)
                    stack.append(dep)
                    iters.append(iter(chosen[dep].deps))
                    break
            else:
                out.append(chosen[stack.pop()])
                iters.pop()
    return out


def resolve(requirements: Mapping[uuid.UUID, Range],
            candidates: Mapping[uuid.UUID, Sequence[Candidate]], *,
            names: Mapping[uuid.UUID, str] | None = None,
            prerelease: bool = False) -> Resolution:
    """Resolve ``requirements`` (plugin id -> range) against ``candidates`` (plugin id ->
    its installable versions, highest first). Raises :class:`ResolutionConflict`."""
    known = dict(names or {})
    for pid, cands in candidates.items():
        if pid not in known and cands:
            known[pid] = cands[0].plugin_name
    st = _State(candidates, known, prerelease)
    for pid, rng in requirements.items():
        st.constrain(pid, rng, None)
    if not st.solve():
        cons = st.conflict or []
        if len(cons) == 1 and not st.candidates.get(cons[0].plugin_id):
            raise ResolutionConflict(
                f"no installable version of {cons[0].plugin} is visible "
                f"(required by {cons[0].required_by})", constraints=cons)
        detail = "; ".join(map(str, cons))
        raise ResolutionConflict(f"no version satisfies every constraint: {detail}",
                                 constraints=cons)
    loop = _cycle(st.chosen)
    if loop:
        raise ResolutionConflict("dependency cycle: " + " -> ".join(loop), cycle=loop)
    return Resolution([Resolved(c.plugin_id, c.plugin_name, c.version_id, str(c.version))
                       for c in _order(st.chosen)], st.steps)
