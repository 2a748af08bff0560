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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from datalayer.core.errors import Conflict
from datalayer.semver import Range, Version

__all__ = ["ROOT", "Candidate", "Constraint", "Resolution", "ResolutionConflict", "Resolved",
           "resolve"]

ROOT = "<requirements>"
MAX_STEPS = 20_000


@dataclass(frozen=True, slots=True)
class Candidate:
    """One installable version of a plugin, with its dependencies (plugin id, range)."""

    plugin_id: uuid.UUID
    plugin_name: str
    version_id: uuid.UUID
    version: Version
    deps: tuple[tuple[uuid.UUID, Range], ...] = ()


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
    candidates: Mapping[uuid.UUID, Sequence[Candidate]]
    names: dict[uuid.UUID, str]
    prerelease: bool
    constraints: dict[uuid.UUID, list[tuple[Constraint, Range]]] = field(default_factory=dict)
    chosen: dict[uuid.UUID, Candidate] = field(default_factory=dict)
    conflict: list[Constraint] | None = None
    steps: int = 0

    def options(self, pid: uuid.UUID) -> list[Candidate]:
        cons = self.constraints[pid]
        pre = self.prerelease
        return [c for c in self.candidates.get(pid, ())
                if all(r.admits(c.version, prerelease=pre) for _, r in cons)]

    def note(self, pid: uuid.UUID) -> None:
        if self.conflict is None:
            self.conflict = [k for k, _ in self.constraints[pid]]

    def solve(self) -> bool:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise ResolutionConflict(f"dependency resolution gave up after {MAX_STEPS} steps "
                                     "(too many combinations); pin some versions")
        pid = next((p for p in self.constraints if p not in self.chosen), None)
        if pid is None:
            return True
        opts = self.options(pid)
        if not opts:
            self.note(pid)
            return False
        for cand in opts:
            self.chosen[pid] = cand
            added: list[uuid.UUID] = []
            ok = True
            by = f"{cand.plugin_name}@{cand.version}"
            for dep, rng in cand.deps:
                k = Constraint(dep, self.names.get(dep, str(dep)), str(rng), by)
                self.constraints.setdefault(dep, []).append((k, rng))
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
                self.constraints[dep].pop()
                if not self.constraints[dep]:
                    del self.constraints[dep]
            del self.chosen[pid]
        return False


def _cycle(chosen: Mapping[uuid.UUID, Candidate]) -> list[str] | None:
    """A dependency cycle among the chosen versions (names, first repeated at the end)."""
    color: dict[uuid.UUID, int] = {}
    stack: list[uuid.UUID] = []

    def visit(pid: uuid.UUID) -> list[str] | None:
        color[pid] = 1
        stack.append(pid)
        for dep, _ in chosen[pid].deps:
            if dep not in chosen:
                continue
            if color.get(dep) == 1:
                loop = [*stack[stack.index(dep):], dep]
                return [chosen[p].plugin_name for p in loop]
            if dep not in color:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        color[pid] = 2
        return None

    for pid in chosen:
        if pid not in color:
            found = visit(pid)
            if found:
                return found
    return None


def _order(chosen: Mapping[uuid.UUID, Candidate]) -> list[Candidate]:
    """Dependencies first (the graph is acyclic here)."""
    out: list[Candidate] = []
    seen: set[uuid.UUID] = set()

    def visit(pid: uuid.UUID) -> None:
        seen.add(pid)
        for dep, _ in chosen[pid].deps:
            if dep in chosen and dep not in seen:
                visit(dep)
        out.append(chosen[pid])

    for pid in sorted(chosen, key=lambda p: chosen[p].plugin_name):
        if pid not in seen:
            visit(pid)
    return out


def resolve(requirements: Mapping[uuid.UUID, Range],
            candidates: Mapping[uuid.UUID, Sequence[Candidate]], *,
            names: Mapping[uuid.UUID, str] | None = None,
            prerelease: bool = False) -> Resolution:
    """Resolve ``requirements`` (plugin id -> range) against ``candidates`` (plugin id ->
    its installable versions, highest first). Raises :class:`ResolutionConflict`."""
    known = dict(names or {})
    for cands in candidates.values():
        for c in cands:
            known.setdefault(c.plugin_id, c.plugin_name)
    st = _State(candidates, known, prerelease)
    for pid, rng in requirements.items():
        k = Constraint(pid, known.get(pid, str(pid)), str(rng), ROOT)
        st.constraints.setdefault(pid, []).append((k, rng))
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
