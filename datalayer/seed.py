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
    "seed_digitwin",
    "seed_executions",
    "seed_orgs",
    "seed_users",
    "seed_workflows",
    "user_email",
    "user_id",
    "workflow_record",
]

PROFILES = ("dev", "bench")
MAX_SCALE = 10_000
BATCH_SIZE = 10_000
# Rows per unit of scale, per domain and profile. Later domains add their line here.
ROWS_PER_SCALE: dict[str, dict[str, int]] = {
    "orgs": {"dev": 3, "bench": 100},
    "users": {"dev": 15, "bench": 5_000},  # spread over the organizations
    "workflows": {"dev": 12, "bench": 1_000},  # round robin over the organizations
    "executions": {"dev": 30, "bench": 10_000},  # over the workflows; 0-5 nodes each
    # DigiTwin users (the first seeded users; every other one on pro), each with a voice and
    # a face model, DIGITWIN_DOCS documents and DIGITWIN_SESSIONS sessions.
    "digitwin": {"dev": 4, "bench": 50},
}
# Per DigiTwin user, by profile: (documents, chunks per document, sessions, turns per
# session). Within the free tier's limits (10 documents, 500 turns a month).
DIGITWIN_SHAPE: dict[str, tuple[int, int, int, int]] = {
    "dev": (3, 5, 3, 6), "bench": (8, 25, 10, 20)}
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

_VERBS = ("Sync", "Triage", "Summarize", "Route", "Enrich", "Approve", "Classify", "Archive",
          "Notify", "Translate", "Score", "Reconcile")
_NOUNS = ("invoices", "tickets", "leads", "emails", "contracts", "orders", "documents",
          "alerts", "reviews", "payments", "reports", "messages")
_NODE_TYPES = ("trigger", "http", "llm", "code", "if", "output")
_WF_TAGS = ("finance", "support", "sales", "ops", "llm", "nightly", "urgent", "internal",
            "customer", "beta")
_WF_STATUSES = ("active",) * 5 + ("draft",) * 3 + ("paused", "archived")


def workflow_record(plan: SeedPlan, rng: random.Random, i: int,
                    now: datetime) -> tuple[object, ...]:
    """Seeded workflow ``i`` as a ``workflows.copy_rows`` record: organization ``i`` modulo
    the organizations (so they interleave, as tenants do over time), owned by a member of
    it, a small React-Flow chain of nodes, a few tags; 15% private, 1% public templates."""
    orgs = plan.org_ids
    k = i % len(orgs)
    per_org = max(1, plan.rows("users") // len(orgs))
    owner = user_id(plan, k + len(orgs) * rng.randrange(per_org))
    verb, noun = rng.choice(_VERBS), rng.choice(_NOUNS)
    n = rng.randint(2, 6)
    nodes = [{"id": f"n{j}", "type": "trigger" if j == 0 else rng.choice(_NODE_TYPES[1:]),
              "position": {"x": 220 * j, "y": rng.randrange(-80, 80)},
              "data": {"label": f"{verb} step {j}"}} for j in range(n)]
    edges = [{"id": f"e{j}", "source": f"n{j}", "target": f"n{j + 1}"} for j in range(n - 1)]
    roll = rng.random()
    public = roll < 0.01
    visibility = "public" if public else ("private" if roll < 0.16 else "organization")
    age = rng.randrange(1, 365 * 86_400)
    created = now - timedelta(seconds=age)
    updated = created + timedelta(seconds=rng.randrange(age))
    description = f"{verb.lower()}s incoming {noun} and hands them to {rng.choice(_NOUNS)}"
    return (orgs[k], uuid.uuid5(_NAMESPACE, f"{plan.run_id}/workflow/{i}"),
            f"{verb} {noun} {i}", description, nodes, edges,
            {"timeout_s": rng.choice((30, 60, 300))}, rng.choice(_WF_STATUSES), owner, None,
            rng.sample(_WF_TAGS, rng.randint(0, 3)), public, visibility, created, updated)


async def seed_workflows(db: Session, plan: SeedPlan, progress: Progress) -> int:
    """Workflows (each with its version 1, written by the versioning trigger), spread round
    robin over the organizations and owned by their members."""
    rng = plan.rng("workflows")
    now = datetime.now(UTC)
    total = plan.rows("workflows")
    progress.start("workflows", total)
    loaded = 0
    for chunk in batches(total):
        n = await db.copy("workflows.copy_rows", [workflow_record(plan, rng, i, now)
                                                  for i in chunk])
        loaded += n
        progress.advance(n)
    progress.finish()
    return loaded


_EXECUTION_OUTCOMES = ("succeeded",) * 80 + ("failed",) * 12 + ("cancelled",) * 5 + (
    "timed_out", "queued", "queued")


async def seed_executions(db: Session, plan: SeedPlan, progress: Progress) -> int:
    """Executions of the seeded workflows over the last week (mostly succeeded; some
    failed, cancelled, timed out; a few queued for later), each finished one with its node
    executions. Loaded with COPY as the maintenance role, which may insert history in any
    state; the triggers record each one's transition and workflow statistics. Skipped (0)
    when the run has no workflows."""
    workflows = await db.many("executions.seed_workflows", org_ids=list(plan.org_ids))
    if not workflows:
        return 0
    await db.many("partitions.ensure", months_ahead=1, months_back=1)
    rng = plan.rng("executions")
    now = datetime.now(UTC)
    total = plan.rows("executions")
    progress.start("executions", total)
    loaded = 0
    for chunk in batches(total):
        runs: list[tuple[object, ...]] = []
        nodes: list[tuple[object, ...]] = []
        for i in chunk:
            wf = workflows[i % len(workflows)]
            eid = uuid.uuid5(_NAMESPACE, f"{plan.run_id}/execution/{i}")
            status = rng.choice(_EXECUTION_OUTCOMES)
            created = now - timedelta(seconds=rng.randrange(7 * 86_400))
            trigger = rng.choice(("manual", "webhook", "schedule", "schedule"))
            if status == "queued":
                runs.append((wf["org_id"], eid, wf["id"], wf["current_version"], trigger, {},
                             {"n": i}, None, None, status, 0, 1, 3, None,
                             now + timedelta(seconds=rng.randrange(3600, 86_400)), None, None,
                             None, None, created))
                continue
            started = created + timedelta(milliseconds=rng.randrange(5, 2_000))
            at = started
            steps = rng.randint(0, 5)
            for k in range(steps):
                took = timedelta(milliseconds=int(rng.lognormvariate(5, 1.2)))
                failed = status == "failed" and k == steps - 1
                nodes.append((wf["org_id"], uuid.uuid5(_NAMESPACE, f"{eid}/node/{k}"), eid,
                              f"n{k}", f"Step {k}", rng.choice(_NODE_TYPES[1:]),
                              "failed" if failed else "succeeded", {"k": k},
                              None if failed else {"ok": True},
                              {"message": "upstream returned 502"} if failed else None, 1,
                              at, at + took, created))
                at += took
            finished = at + timedelta(milliseconds=rng.randrange(1, 50))
            error = {"message": "upstream returned 502"} if status == "failed" else None
            runs.append((wf["org_id"], eid, wf["id"], wf["current_version"], trigger, {},
                         {"n": i}, {"ok": True} if status == "succeeded" else None, error,
                         status, 0, 1, 3, None, created, None, None, started, finished,
                         created))
        await db.copy("executions.copy_rows", runs)
        await db.copy("executions.copy_nodes", nodes)
        loaded += len(runs)
        progress.advance(len(runs))
    progress.finish()
    return loaded


_TWIN_WORDS = (
    "roadmap", "budget", "hiring", "latency", "voice", "avatar", "customer", "revenue",
    "pricing", "launch", "privacy", "security", "travel", "family", "garden", "recipe",
    "marathon", "guitar", "python", "postgres", "meeting", "contract", "invoice", "quarter",
    "strategy", "design", "research", "feedback", "onboarding", "support", "partner", "market",
    "the", "and", "with", "for", "about", "our", "team", "plan", "notes", "ideas")


async def seed_digitwin(db: Session, plan: SeedPlan, progress: Progress) -> int:
    """DigiTwin data for the first seeded users (free and pro, alternating): a ready,
    active voice and face model each, ready documents with generated chunks, and ended
    conversation sessions with turns over the last three weeks; all generated server-side
    (generate_series), a batch of users per statement. Returns the turns created."""
    n = min(plan.rows("digitwin"), plan.rows("users"))
    docs, chunks, sessions, turns = DIGITWIN_SHAPE[plan.profile]
    orgs = plan.org_ids
    await db.many("partitions.ensure", months_ahead=1, months_back=1)
    progress.start("digitwin", n)
    created = 0
    for chunk in batches(n, 200):
        users = [user_id(plan, i) for i in chunk]
        pair = {"org_ids": [orgs[i % len(orgs)] for i in chunk], "user_ids": users}
        await db.scalar("models.seed", pro_user_ids=users[1::2], **pair)
        await db.scalar("knowledge.seed_documents", per_user=docs, chunks=chunks,
                        vocabulary=list(_TWIN_WORDS), **pair)
        await db.scalar("conversations.seed_sessions", per_user=sessions, days=20, **pair)
        created += await db.scalar("conversations.seed_turns", per_session=turns, **pair)
        await db.execrows("conversations.seed_close", **pair)
        progress.advance(len(users))
    progress.finish()
    return int(created)


# (domain, generator) in dependency order; later domains append theirs.
GENERATORS: tuple[tuple[str, Generator], ...] = (
    ("orgs", seed_orgs),
    ("users", seed_users),
    ("workflows", seed_workflows),
    ("executions", seed_executions),  # after workflows: runs of the seeded workflows
    ("digitwin", seed_digitwin),  # after users: models, documents, conversations of users
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
