"""Seed data for development and benchmarks: ``datalayer seed --profile dev|bench --scale N``.

Each domain contributes one generator to :data:`GENERATORS`, run in order, each in its
own ``dl.system()`` session (the maintenance role, BYPASSRLS) and loaded through the
domain's ``:copy`` query in batches. A :class:`SeedPlan` decides how many rows each
domain gets and derives every organization id from the run id, so later generators
know the tenants without asking the database. Slugs carry the run id: seeding twice
never collides, and a run's rows can be found again.
"""

from __future__ import annotations

import random
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, TextIO

from datalayer.core.errors import ValidationError

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer
    from datalayer.core.session import Session

__all__ = [
    "BATCH_SIZE",
    "GENERATORS",
    "MAX_SCALE",
    "PROFILES",
    "ROWS_PER_SCALE",
    "Generator",
    "Progress",
    "SeedPlan",
    "seed",
    "seed_orgs",
    "seed_users",
    "user_email",
    "user_id",
]

PROFILES = ("dev", "bench")
MAX_SCALE = 10_000
BATCH_SIZE = 10_000
# Rows per unit of scale, per domain and profile. Later domains add their line here.
ROWS_PER_SCALE: dict[str, dict[str, int]] = {
    "orgs": {"dev": 3, "bench": 100},
    "users": {"dev": 15, "bench": 5_000},  # spread over the organizations
}
_RUN_ID = re.compile(r"[a-z0-9]{1,16}")
_NAMESPACE = uuid.UUID("5b1e6f0c-3c2d-4f6e-9a51-6a0d1c2b7e90")  # seed ids: uuid5(this, …)


@dataclass(frozen=True, slots=True)
class SeedPlan:
    """What one seed run creates. Validated on construction."""

    profile: str
    scale: int
    run_id: str
    _org_ids: tuple[uuid.UUID, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValidationError(
                f"seed profile must be one of {', '.join(PROFILES)}, not {self.profile!r}"
            )
        if (not isinstance(self.scale, int) or isinstance(self.scale, bool)
                or not 1 <= self.scale <= MAX_SCALE):
            raise ValidationError(
                f"seed scale must be an integer from 1 to {MAX_SCALE}, not {self.scale!r}"
            )
        if not isinstance(self.run_id, str) or not _RUN_ID.fullmatch(self.run_id):
            raise ValidationError("seed run id must be 1-16 lowercase letters and digits")
        ids = tuple(uuid.uuid5(_NAMESPACE, f"{self.run_id}/org/{i}")
                    for i in range(self.rows("orgs")))
        object.__setattr__(self, "_org_ids", ids)

    def rows(self, domain: str) -> int:
        """How many rows ``domain`` gets in this plan."""
        try:
            per_scale = ROWS_PER_SCALE[domain][self.profile]
        except KeyError:
            raise ValidationError(f"no seed row count for domain {domain!r}") from None
        return per_scale * self.scale

    @property
    def org_ids(self) -> tuple[uuid.UUID, ...]:
        """The seeded organizations' ids, in order (derived from the run id)."""
        return self._org_ids

    def slug(self, i: int) -> str:
        """Organization ``i``'s slug: unique per run, matches the slug CHECK."""
        return f"{self.profile}-{self.run_id}-{i}"

    def rng(self, domain: str) -> random.Random:
        """A generator's random source, reproducible from the run id."""
        return random.Random(f"{self.run_id}/{domain}")  # not for secrets


class Progress:
    """A stderr progress bar without dependencies: redrawn in place on a terminal
    (``[#####     ]  50% orgs 5000/10000``), one line per batch otherwise."""

    __slots__ = ("_done", "_label", "_out", "_total", "_tty", "_width")

    def __init__(self, out: TextIO = sys.stderr, *, width: int = 30) -> None:
        self._out = out
        self._tty = out.isatty()
        self._width = width
        self._label = ""
        self._total = 0
        self._done = 0

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._done = label, total, 0
        if self._tty:
            self._draw()

    def advance(self, n: int) -> None:
        self._done += n
        if self._tty:
            self._draw()
        else:
            print(f"{self._label} {self._done}/{self._total} ({self._percent()}%)",
                  file=self._out, flush=True)

    def finish(self) -> None:
        if self._tty:
            self._draw()
            self._out.write("\n")
            self._out.flush()

    def _percent(self) -> int:
        return 100 if self._total <= 0 else min(100, self._done * 100 // self._total)

    def _draw(self) -> None:
        filled = self._width * self._percent() // 100
        bar = "#" * filled + " " * (self._width - filled)
        self._out.write(f"\r[{bar}] {self._percent():3d}% {self._label} "
                        f"{self._done}/{self._total}")
        self._out.flush()


Generator = Callable[["Session", SeedPlan, Progress], Awaitable[int]]


def batches(total: int, size: int = BATCH_SIZE) -> Iterator[range]:
    """``range(total)`` in consecutive chunks of at most ``size``."""
    for start in range(0, total, size):
        yield range(start, min(start + size, total))


_PLANS = ("free", "free", "free", "starter", "pro", "enterprise")
_WORDS = ("Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Tyrell",
          "Cyberdyne", "Soylent", "Aperture", "Wonka")


async def seed_orgs(db: Session, plan: SeedPlan, progress: Progress) -> int:
    """Organizations: ``plan.org_ids``, created over the last year."""
    rng = plan.rng("orgs")
    ids = plan.org_ids
    now = datetime.now(UTC)
    progress.start("orgs", len(ids))
    loaded = 0
    for chunk in batches(len(ids)):
        records = [
            (ids[i], plan.slug(i), f"{rng.choice(_WORDS)} {plan.profile} {i}",
             rng.choice(_PLANS), {"seed": plan.run_id},
             now - timedelta(seconds=rng.randrange(365 * 86_400)))
            for i in chunk
        ]
        n = await db.copy("orgs.copy_rows", records)
        loaded += n
        progress.advance(n)
    progress.finish()
    return loaded


def user_id(plan: SeedPlan, i: int) -> uuid.UUID:
    """Seeded user ``i``'s id (derived from the run id, like the organizations')."""
    return uuid.uuid5(_NAMESPACE, f"{plan.run_id}/user/{i}")


def user_email(plan: SeedPlan, i: int) -> str:
    return f"user{i}-{plan.run_id}@{plan.profile}.example.test"


async def seed_users(db: Session, plan: SeedPlan, progress: Progress) -> int:
    """Users, each a member of one organization (round robin); the first user of an
    organization is its owner, a few per hundred are admins or viewers. Accounts have no
    password (they cannot log in): seeding is for reads and benchmarks."""
    rng = plan.rng("users")
    orgs = plan.org_ids
    now = datetime.now(UTC)
    total = plan.rows("users")
    progress.start("users", total)
    loaded = 0
    for chunk in batches(total):
        users, members = [], []
        for i in chunk:
            uid, created = user_id(plan, i), now - timedelta(seconds=rng.randrange(86_400 * 300))
            users.append((uid, user_email(plan, i), f"User {i}", rng.choice(_TIERS), created))
            role = "owner" if i < len(orgs) else rng.choice(_MEMBER_ROLES)
            members.append((orgs[i % len(orgs)], uid, role, created))
        await db.copy("users.copy_rows", users)
        await db.copy("memberships.copy_rows", members)
        loaded += len(users)
        progress.advance(len(users))
    progress.finish()
    return loaded


_TIERS = ("free", "free", "pro", "enterprise")
_MEMBER_ROLES = ("member",) * 17 + ("admin", "viewer", "guest")

# (domain, generator) in dependency order; later domains append theirs.
GENERATORS: tuple[tuple[str, Generator], ...] = (
    ("orgs", seed_orgs),
    ("users", seed_users),
)


async def seed(dl: DataLayer, *, profile: str, scale: int, out: TextIO = sys.stderr,
               run_id: str | None = None) -> dict[str, int]:
    """Seed every domain for ``profile`` at ``scale``; rows created per domain.

    ``run_id`` (default: random) names the run in every slug. Raises ``ValidationError``
    for a bad profile, scale or run id before touching the database.
    """
    plan = SeedPlan(profile, scale, run_id if run_id is not None else uuid.uuid4().hex[:8])
    progress = Progress(out)
    counts: dict[str, int] = {}
    for domain, generate in GENERATORS:
        async with dl.system() as db:
            counts[domain] = await generate(db, plan, progress)
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"seed {plan.profile} x{plan.scale} (run {plan.run_id}): {summary}",
          file=out, flush=True)
    return counts
