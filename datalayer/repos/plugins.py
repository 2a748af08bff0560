"""Plugins (``queries/plugins.sql``, ``schema/0020_plugins.sql``): catalog, versions,
dependency resolution, governance, installations per environment and usage analytics.

Who sees what: a plugin belongs to its publisher organization. Publisher-side methods
(create, update, publish_version, set statuses, advisories) act on the context's own rows
under RLS. Catalog reads (:meth:`Plugins.get`, :meth:`search`, :meth:`resolve`,
:meth:`dependents`, :meth:`advisories`, :meth:`policy_check`) go through SECURITY DEFINER
functions that return public, listed plugins and the context's own, nothing else.

Installing runs the context organization's policies in SQL (a trigger on
``plugin_installations`` calls ``app.plugin_policy_check``): a violation raises
:class:`ValidationError` whose message names the policy. Every installation change is a
deployment record; :meth:`rollback` restores the previous one in one statement.
Secrets are one Keyring blob per change in ``plugin_secrets`` bound to
``(org, 'plugin_secrets', id, 'secret')`` and registered for key rotation.

Maintenance jobs (``dl.system()``): :func:`plugin_usage_rollup`, :func:`plugin_quality_refresh`.
"""

from __future__ import annotations

import builtins
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from datalayer.config_schema import check_schema, secret_names, validate
from datalayer.core.errors import NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import Page, Repository, check_choice, check_limit, page_of
from datalayer.resolver import PackedCandidates, Resolution, resolve
from datalayer.security.keyring import DecryptionError
from datalayer.semver import Range, parse_range, parse_version

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = [
    "ENVIRONMENTS",
    "POLICIES",
    "AdoptionDay",
    "Advisory",
    "Alert",
    "Decision",
    "Dependent",
    "Deployment",
    "Exemption",
    "GraphRow",
    "Installation",
    "PackedGraphRow",
    "Plugin",
    "PluginVersion",
    "Plugins",
    "Policy",
    "SearchHit",
    "Sla",
    "Stage",
    "UsageDay",
    "UsageEvent",
    "Violation",
    "plugin_quality_refresh",
    "plugin_usage_rollup",
    "validate_manifest",
]

ENVIRONMENTS = ("development", "staging", "production")
POLICIES = ("no_critical_vulnerability", "approved_publishers_only", "license_allowlist",
            "production_approved_only")
EXEMPTABLE = (*POLICIES, "approval_workflow")
SEVERITIES = ("low", "medium", "high", "critical")
USAGE_KINDS = ("install", "uninstall", "invocation", "error")
_TABLE, _COLUMN = "plugin_secrets", "secret"
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")
_ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
                       r":[A-Za-z_][A-Za-z0-9_]*$")
_PERMISSION_RE = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*(?::(?:read|write|execute))?$")
_CHECKSUM_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


# -- rows -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Plugin:
    org_id: uuid.UUID
    id: uuid.UUID
    name: str
    display_name: str
    summary: str
    description: str
    tags: list[str]
    categories: list[str]
    compat: list[str]
    license: str
    visibility: str
    status: str
    sla_p95_ms: int
    sla_error_rate: float
    quality_score: float | None
    latest_version: str | None
    publisher: str | None  # the publisher organization's name ('' when it is the context's)
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchHit:
    org_id: uuid.UUID
    id: uuid.UUID
    name: str
    display_name: str
    summary: str
    tags: list[str]
    categories: list[str]
    compat: list[str]
    license: str
    visibility: str
    status: str
    quality_score: float | None
    latest_version: str | None
    publisher: str
    rank: float


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginVersion:
    org_id: uuid.UUID
    id: uuid.UUID
    plugin_id: uuid.UUID
    version: str
    prerelease: bool
    manifest: Any
    changelog: str
    checksum: str
    size_bytes: int
    status: str
    status_reason: str | None
    quality_score: float | None
    published_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphRow:
    plugin_id: uuid.UUID
    plugin_name: str
    org_id: uuid.UUID
    version_id: uuid.UUID
    version: str
    vkey: str
    prerelease: bool
    dep_plugin_ids: list[uuid.UUID]
    dep_ranges: list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class PackedGraphRow:
    """One plugin of the candidate graph with its versions packed in one text (see
    ``app.plugin_graph_packed`` and :class:`datalayer.resolver.PackedCandidates`)."""

    plugin_id: uuid.UUID
    plugin_name: str
    versions: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Dependent:
    plugin_id: uuid.UUID
    plugin_name: str
    org_id: uuid.UUID
    version_id: uuid.UUID
    version: str
    status: str
    range: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Stage:
    org_id: uuid.UUID
    id: uuid.UUID
    position: int
    name: str
    required_role: str
    environments: list[str]
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    org_id: uuid.UUID
    id: uuid.UUID
    plugin_id: uuid.UUID
    version_id: uuid.UUID
    stage_id: uuid.UUID
    decision: str
    reason: str | None
    decided_by: uuid.UUID | None
    decided_role: str | None
    decided_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    org_id: uuid.UUID
    policy: str
    enabled: bool
    config: Any
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Exemption:
    org_id: uuid.UUID
    id: uuid.UUID
    plugin_id: uuid.UUID
    policy: str
    justification: str
    approved_by: uuid.UUID
    expires_at: datetime
    created_at: datetime
    active: bool | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Violation:
    """A policy that refuses an install, and why."""

    policy: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Advisory:
    id: uuid.UUID
    plugin_id: uuid.UUID
    identifier: str
    severity: str
    summary: str
    affected: str
    fixed_in: str | None
    status: str
    published_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    installation_id: uuid.UUID
    plugin_id: uuid.UUID
    environment: str
    version: str
    advisory_id: uuid.UUID
    identifier: str
    severity: str
    fixed_in: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Installation:
    org_id: uuid.UUID
    id: uuid.UUID
    plugin_id: uuid.UUID
    publisher_org_id: uuid.UUID
    environment: str
    version_id: uuid.UUID
    version: str
    config: Any
    secret_id: uuid.UUID | None
    enabled: bool
    last_action: str
    installed_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Deployment:
    org_id: uuid.UUID
    id: int
    plugin_id: uuid.UUID
    environment: str
    action: str
    version_id: uuid.UUID | None
    version: str | None
    config: Any | None
    secret_id: uuid.UUID | None
    enabled: bool | None
    deployed_by: uuid.UUID | None
    deployed_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageDay:
    org_id: uuid.UUID
    plugin_id: uuid.UUID
    day: date
    installs: int
    uninstalls: int
    invocations: int
    errors: int
    latency_n: int
    p50_ms: float | None
    p95_ms: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class AdoptionDay:
    day: date
    active_orgs: int
    invocations: int
    errors: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Sla:
    plugin_id: uuid.UUID
    invocations: int
    errors: int
    error_rate: float
    p95_ms: float | None
    sla_p95_ms: int
    sla_error_rate: float
    compliant: bool


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One usage event for :meth:`Plugins.ingest_usage`."""

    plugin_id: uuid.UUID
    kind: str
    latency_ms: float | None = None
    occurred_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class _SecretRow:
    id: uuid.UUID
    secret: bytes = field(repr=False)


CREATE = RowQuery("plugins.create", Plugin)
GET = RowQuery("plugins.get", Plugin)
UPDATE = RowQuery("plugins.update", Plugin)
SET_STATUS = RowQuery("plugins.set_status", Plugin)
SEARCH = RowQuery("plugins.search", SearchHit)
CREATE_VERSION = RowQuery("plugins.create_version", PluginVersion)
GET_VERSION = RowQuery("plugins.get_version", PluginVersion)
SET_VERSION_STATUS = RowQuery("plugins.set_version_status", PluginVersion)
UPDATE_DRAFT = RowQuery("plugins.update_draft", PluginVersion)
LIST_VERSIONS = RowQuery("plugins.list_versions", PluginVersion)
GRAPH = RowQuery("plugins.graph", GraphRow)
GRAPH_PACKED = RowQuery("plugins.graph_packed", PackedGraphRow)
DEPENDENTS = RowQuery("plugins.dependents", Dependent)
ADD_STAGE = RowQuery("plugins.add_stage", Stage)
LIST_STAGES = RowQuery("plugins.list_stages", Stage)
DECIDE = RowQuery("plugins.decide", Decision)
DECISIONS = RowQuery("plugins.decisions", Decision)
SET_POLICY = RowQuery("plugins.set_policy", Policy)
LIST_POLICIES = RowQuery("plugins.list_policies", Policy)
GRANT_EXEMPTION = RowQuery("plugins.grant_exemption", Exemption)
LIST_EXEMPTIONS = RowQuery("plugins.list_exemptions", Exemption)
POLICY_CHECK = RowQuery("plugins.policy_check", Violation)
ADD_ADVISORY = RowQuery("plugins.add_advisory", Advisory)
SET_ADVISORY_STATUS = RowQuery("plugins.set_advisory_status", Advisory)
ADVISORIES = RowQuery("plugins.advisories", Advisory)
ALERTS = RowQuery("plugins.alerts", Alert)
INSTALL = RowQuery("plugins.install", Installation)
SET_ENABLED = RowQuery("plugins.set_enabled", Installation)
ROLLBACK = RowQuery("plugins.rollback", Installation)
INSTALLATION = RowQuery("plugins.installation", Installation)
INSTALLATIONS = RowQuery("plugins.installations", Installation)
DEPLOYMENTS = RowQuery("plugins.deployments", Deployment)
GET_SECRET = RowQuery("plugins.get_secret", _SecretRow)
USAGE_DAILY = RowQuery("plugins.usage_daily", UsageDay)
ADOPTION = RowQuery("plugins.adoption", AdoptionDay)
SLA = RowQuery("plugins.sla", Sla)


def validate_manifest(manifest: object) -> dict[str, Any]:
    """Check a version manifest: ``name`` (the plugin name format), ``entry_point``
    (``package.module:function``), ``permissions`` (a list like ``workflows.read``,
    ``http:execute``), ``config_schema`` (the supported JSON Schema subset, an object
    schema), optional ``test_coverage`` (0-1). Raises :class:`ValidationError` naming the
    field."""
    if not isinstance(manifest, Mapping):
        raise ValidationError("manifest must be an object")
    name = manifest.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValidationError("manifest.name must be a plugin name (lowercase letters, digits "
                              "and '-', 1-64 characters)")
    entry = manifest.get("entry_point")
    if not isinstance(entry, str) or not _ENTRY_RE.match(entry):
        raise ValidationError("manifest.entry_point must look like 'package.module:function'")
    perms = manifest.get("permissions")
    if not isinstance(perms, list):
        raise ValidationError("manifest.permissions must be a list of permission names")
    for i, p in enumerate(perms):
        if not isinstance(p, str) or not _PERMISSION_RE.match(p):
            raise ValidationError(f"manifest.permissions[{i}] must look like 'workflows.read' "
                                  "or 'http:execute'")
    if len(set(perms)) != len(perms):
        raise ValidationError("manifest.permissions lists a permission twice")
    schema = manifest.get("config_schema")
    check_schema(schema, "manifest.config_schema")
    assert isinstance(schema, Mapping)
    if schema.get("type", "object") != "object":
        raise ValidationError("manifest.config_schema must describe an object")
    cov = manifest.get("test_coverage")
    if cov is not None and (isinstance(cov, bool) or not isinstance(cov, int | float)
                            or not 0 <= cov <= 1):
        raise ValidationError("manifest.test_coverage must be a number between 0 and 1")
    if len(orjson.dumps(manifest)) > 60_000:
        raise ValidationError("manifest is larger than 60 kB")
    return dict(manifest)


class Plugins(Repository):
    """``db.plugins``: see the module docstring."""

    __slots__ = ()

    # -- catalog ----------------------------------------------------------------------------
    async def create(self, name: str, *, display_name: str | None = None, summary: str = "",
                     description: str = "", tags: Sequence[str] = (),
                     categories: Sequence[str] = (), compat: Sequence[str] = (),
                     license: str = "proprietary", visibility: str = "private",
                     sla_p95_ms: int = 1000, sla_error_rate: float = 0.01) -> Plugin:
        """A draft plugin of the context organization (writers)."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValidationError("name must be lowercase letters, digits and '-' "
                                  "(1-64 characters, not starting or ending with '-')")
        check_choice(visibility, ("private", "public"), "visibility")
        row = await self._db.fetch_one(
            CREATE, id=uuid.uuid4(), name=name, display_name=display_name or name,
            summary=summary, description=description, tags=list(tags),
            categories=list(categories), compat=list(compat), license=license,
            visibility=visibility, sla_p95_ms=sla_p95_ms, sla_error_rate=sla_error_rate)
        assert row is not None
        return row

    async def get(self, plugin_id: uuid.UUID) -> Plugin | None:
        """A listed public plugin or one of the context's own; None otherwise."""
        return await self._db.fetch_one(GET, id=plugin_id)

    async def update(self, plugin_id: uuid.UUID, *, display_name: str | None = None,
                     summary: str | None = None, description: str | None = None,
                     tags: Sequence[str] | None = None,
                     categories: Sequence[str] | None = None,
                     compat: Sequence[str] | None = None, license: str | None = None,
                     visibility: str | None = None, sla_p95_ms: int | None = None,
                     sla_error_rate: float | None = None) -> Plugin:
        if visibility is not None:
            check_choice(visibility, ("private", "public"), "visibility")
        row = await self._db.fetch_one(
            UPDATE, id=plugin_id, display_name=display_name, summary=summary,
            description=description, tags=None if tags is None else list(tags),
            categories=None if categories is None else list(categories),
            compat=None if compat is None else list(compat), license=license,
            visibility=visibility, sla_p95_ms=sla_p95_ms, sla_error_rate=sla_error_rate)
        if row is None:
            raise NotFound("plugin not found or not writable by this role", query=UPDATE.name)
        return row

    async def set_status(self, plugin_id: uuid.UUID, status: str) -> Plugin:
        """Move an own plugin along draft -> in_review -> approved | rejected, approved <->
        deprecated (approve/reject/deprecate: owners and admins)."""
        check_choice(status, ("draft", "in_review", "approved", "rejected", "deprecated"), "status")
        row = await self._db.fetch_one(SET_STATUS, id=plugin_id, status=status)
        if row is None:
            raise NotFound("plugin not found or not writable by this role",
                           query=SET_STATUS.name)
        return row

    async def delete(self, plugin_id: uuid.UUID) -> bool:
        return await self._db.execrows("plugins.delete", id=plugin_id) == 1

    async def search(self, query: str | None = None, *, category: str | None = None,
                     publisher: uuid.UUID | None = None, compat: str | None = None,
                     min_quality: float | None = None,
                     after: tuple[float, uuid.UUID] | None = None, limit: int = 20,
                     typo_tolerant: bool = True) -> Page[SearchHit]:
        """Ranked catalog search (public listed plugins and the context's own). Without
        ``query``: by quality score. When the words match nothing and ``typo_tolerant``, the
        names most similar to ``query`` (pg_trgm; a second round trip). Keyset-paginated:
        pass ``page.next`` as ``after``."""
        check_limit(limit, 100)
        if query is not None and len(query) > 200:
            raise ValidationError("query must be at most 200 characters")
        rank, after_id = after if after is not None else (0.0, None)
        params: dict[str, object] = dict(
            query=query, category=category, publisher=publisher, compat=compat,
            min_quality=min_quality, after_rank=rank, after_id=after_id, limit=limit)
        rows = await self._db.fetch_many(SEARCH, fuzzy=False, **params)
        if not rows and query and typo_tolerant:
            rows = await self._db.fetch_many(SEARCH, fuzzy=True, **params)
        return page_of(rows, limit, lambda h: (h.rank, h.id))

    # -- versions ---------------------------------------------------------------------------
    async def publish_version(self, plugin_id: uuid.UUID, version: str, manifest: object, *,
                              checksum: str, size_bytes: int, changelog: str = "",
                              dependencies: Mapping[uuid.UUID, str] | None = None,
                              submit: bool = True) -> PluginVersion:
        """A new version of an own plugin with its dependencies (plugin id -> range), in one
        statement; submitted for review unless ``submit=False`` (then it stays a draft).
        Version, manifest and ranges are validated first (:class:`ValidationError` says
        what is wrong); ranges are stored normalized."""
        parse_version(version)
        man = validate_manifest(manifest)
        if not isinstance(checksum, str) or not _CHECKSUM_RE.match(checksum):
            raise ValidationError("checksum must be 'sha256:' followed by 64 hex digits")
        deps = dict(dependencies or {})
        if plugin_id in deps:
            raise ValidationError("a version cannot depend on its own plugin")
        ranges = [str(parse_range(r)) for r in deps.values()]
        row = await self._db.fetch_one(
            CREATE_VERSION, id=uuid.uuid4(), plugin_id=plugin_id, version=version,
            manifest=man, changelog=changelog, checksum=checksum, size_bytes=size_bytes,
            dep_plugin_ids=list(deps), dep_ranges=ranges)
        if row is None:
            raise NotFound("plugin not found or not writable by this role",
                           query=CREATE_VERSION.name)
        if submit:
            return await self.set_version_status(row.id, "in_review")
        return row

    async def get_version(self, version_id: uuid.UUID) -> PluginVersion | None:
        return await self._db.fetch_one(GET_VERSION, id=version_id)

    async def set_version_status(self, version_id: uuid.UUID, status: str, *,
                                 reason: str | None = None) -> PluginVersion:
        """in_review (writers); approved, rejected, deprecated, yanked (owners, admins)."""
        check_choice(status, ("in_review", "approved", "rejected", "deprecated", "yanked"),
                "status")
        if status in ("rejected", "yanked") and not reason:
            raise ValidationError(f"a reason is required to mark a version {status}")
        row = await self._db.fetch_one(SET_VERSION_STATUS, id=version_id, status=status,
                                       reason=reason)
        if row is None:
            raise NotFound("version not found or not writable by this role",
                           query=SET_VERSION_STATUS.name)
        return row

    async def approve_version(self, version_id: uuid.UUID) -> PluginVersion:
        return await self.set_version_status(version_id, "approved")

    async def yank(self, version_id: uuid.UUID, reason: str) -> PluginVersion:
        return await self.set_version_status(version_id, "yanked", reason=reason)

    async def update_draft(self, version_id: uuid.UUID, manifest: object) -> PluginVersion:
        row = await self._db.fetch_one(UPDATE_DRAFT, id=version_id,
                                       manifest=validate_manifest(manifest))
        if row is None:
            raise NotFound("version not found or not writable by this role",
                           query=UPDATE_DRAFT.name)
        return row

    async def versions(self, plugin_id: uuid.UUID, *,
                       limit: int = 100) -> builtins.list[PluginVersion]:
        """An own plugin's versions, highest precedence first (ordered in SQL)."""
        return await self._db.fetch_many(LIST_VERSIONS, plugin_id=plugin_id,
                                         limit=check_limit(limit))

    # -- dependencies -----------------------------------------------------------------------
    async def graph(self, roots: Sequence[uuid.UUID]) -> builtins.list[GraphRow]:
        """Every installable version reachable from ``roots`` (one round trip)."""
        return await self._db.fetch_many(GRAPH, roots=list(roots))

    async def resolve(self, requirements: Mapping[uuid.UUID, str], *,
                      prerelease: bool = False) -> Resolution:
        """The versions to install for ``requirements`` (plugin id -> range): the candidate
        graph in one round trip, then backtracking in process (:mod:`datalayer.resolver`).
        Raises :class:`~datalayer.resolver.ResolutionConflict`."""
        reqs = {pid: parse_range(r) for pid, r in requirements.items()}
        if not reqs:
            return Resolution([])
        # One row per plugin, its versions packed in one text and parsed lazily (raw
        # records: columns as in PackedGraphRow): a 1,000-version graph is 50 short rows.
        rows = await self._db.many(GRAPH_PACKED.name, roots=builtins.list(reqs))
        ranges: dict[str, Range] = {}
        names: dict[uuid.UUID, str] = {}
        cands: dict[uuid.UUID, PackedCandidates] = {}
        for pid, name, versions in rows:
            names[pid] = name
            cands[pid] = PackedCandidates(pid, name, versions, ranges)
        return resolve(reqs, cands, names=names, prerelease=prerelease)

    async def dependents(self, plugin_id: uuid.UUID, *,
                         version: str | None = None) -> builtins.list[Dependent]:
        """Versions (visible to the context) that depend on ``plugin_id``; with ``version``,
        only those whose range admits it ("what breaks if I yank this?"). One query."""
        rows = await self._db.fetch_many(DEPENDENTS, plugin_id=plugin_id)
        if version is None:
            return rows
        v = parse_version(version)
        admits: dict[str, bool] = {}  # most dependents share a few range texts
        out = []
        for d in rows:
            ok = admits.get(d.range)
            if ok is None:
                ok = admits[d.range] = parse_range(d.range).admits(v, prerelease=True)
            if ok:
                out.append(d)
        return out

    # -- governance -------------------------------------------------------------------------
    async def add_stage(self, position: int, name: str, *, required_role: str = "admin",
                        environments: Sequence[str] = ENVIRONMENTS) -> Stage:
        """An approval stage of the context organization (owners, admins)."""
        check_choice(required_role, ("owner", "admin", "member"), "required_role")
        for e in environments:
            check_choice(e, ENVIRONMENTS, "environment")
        row = await self._db.fetch_one(ADD_STAGE, id=uuid.uuid4(), position=position,
                                       name=name, required_role=required_role,
                                       environments=builtins.list(environments))
        assert row is not None
        return row

    async def stages(self) -> builtins.list[Stage]:
        return await self._db.fetch_many(LIST_STAGES)

    async def decide(self, plugin_id: uuid.UUID, version_id: uuid.UUID, stage_id: uuid.UUID,
                     decision: str, *, reason: str | None = None) -> Decision:
        """Record a stage's decision (in stage order, by the stage's role; a rejection, with
        a reason, ends the version's workflow)."""
        check_choice(decision, ("approved", "rejected"), "decision")
        if decision == "rejected" and not reason:
            raise ValidationError("a rejection needs a reason")
        row = await self._db.fetch_one(DECIDE, plugin_id=plugin_id, version_id=version_id,
                                       stage_id=stage_id, decision=decision, reason=reason)
        assert row is not None
        return row

    async def decisions(self, version_id: uuid.UUID) -> builtins.list[Decision]:
        return await self._db.fetch_many(DECISIONS, version_id=version_id)

    async def set_policy(self, policy: str, *, enabled: bool = True,
                         licenses: Sequence[str] | None = None) -> Policy:
        check_choice(policy, POLICIES, "policy")
        config: dict[str, Any] = {}
        if policy == "license_allowlist":
            if not licenses:
                raise ValidationError("license_allowlist needs licenses")
            config["licenses"] = builtins.list(licenses)
        row = await self._db.fetch_one(SET_POLICY, policy=policy, enabled=enabled,
                                       config=config)
        assert row is not None
        return row

    async def policies(self) -> builtins.list[Policy]:
        return await self._db.fetch_many(LIST_POLICIES)

    async def approve_publisher(self, publisher_org_id: uuid.UUID) -> bool:
        return await self._db.execrows("plugins.approve_publisher",
                                       publisher_org_id=publisher_org_id) == 1

    async def grant_exemption(self, plugin_id: uuid.UUID, policy: str, justification: str, *,
                              ttl: timedelta) -> Exemption:
        """Let ``plugin_id`` pass ``policy`` until now + ``ttl`` (owners, admins)."""
        check_choice(policy, EXEMPTABLE, "policy")
        if not 10 <= len(justification) <= 2000:
            raise ValidationError("justification must be 10-2000 characters")
        if ttl <= timedelta(0) or ttl > timedelta(days=366):
            raise ValidationError("ttl must be positive and at most a year")
        row = await self._db.fetch_one(GRANT_EXEMPTION, plugin_id=plugin_id, policy=policy,
                                       justification=justification,
                                       ttl_s=ttl.total_seconds())
        assert row is not None
        return row

    async def exemptions(self, plugin_id: uuid.UUID | None = None,
                         ) -> builtins.list[Exemption]:
        return await self._db.fetch_many(LIST_EXEMPTIONS, plugin_id=plugin_id)

    async def policy_check(self, plugin_id: uuid.UUID, version_id: uuid.UUID,
                           environment: str) -> builtins.list[Violation]:
        """The context organization's policies that refuse installing this version here
        (empty: allowed). The same check runs inside :meth:`install`."""
        check_choice(environment, ENVIRONMENTS, "environment")
        return await self._db.fetch_many(POLICY_CHECK, plugin_id=plugin_id,
                                         version_id=version_id, environment=environment)

    # -- vulnerabilities --------------------------------------------------------------------
    async def add_advisory(self, plugin_id: uuid.UUID, identifier: str, severity: str,
                           affected: str, *, summary: str = "") -> Advisory:
        """An open advisory on an own plugin; ``affected`` is a range of one interval
        (``>=1.0.0 <1.4.2``, ``<2.0.1``); its upper bound is the fixed-in version."""
        check_choice(severity, SEVERITIES, "severity")
        rng = parse_range(affected)
        lo, hi = rng.interval()
        row = await self._db.fetch_one(
            ADD_ADVISORY, plugin_id=plugin_id, identifier=identifier, severity=severity,
            summary=summary, affected=str(rng),
            introduced=None if lo is None else str(lo), fixed_in=None if hi is None else str(hi))
        if row is None:
            raise NotFound("plugin not found or not writable by this role",
                           query=ADD_ADVISORY.name)
        return row

    async def withdraw_advisory(self, advisory_id: uuid.UUID) -> Advisory:
        row = await self._db.fetch_one(SET_ADVISORY_STATUS, id=advisory_id, status="withdrawn")
        if row is None:
            raise NotFound("advisory not found", query=SET_ADVISORY_STATUS.name)
        return row

    async def advisories(self, plugin_id: uuid.UUID) -> builtins.list[Advisory]:
        return await self._db.fetch_many(ADVISORIES, plugin_id=plugin_id)

    async def alerts(self) -> builtins.list[Alert]:
        """The context's installations affected by an open advisory (worst first)."""
        return await self._db.fetch_many(ALERTS)

    # -- installations ----------------------------------------------------------------------
    async def install(self, plugin_id: uuid.UUID, version_id: uuid.UUID, environment: str, *,
                      config: Mapping[str, Any] | None = None,
                      secrets: Mapping[str, Any] | None = None) -> Installation:
        """Install (or move to ``version_id`` / reconfigure) a plugin in an environment.
        ``config`` is validated against the version manifest's ``config_schema`` (properties
        marked ``secret`` belong in ``secrets``, which are encrypted). The policy check runs
        in SQL; a violation raises :class:`ValidationError` naming the policy."""
        check_choice(environment, ENVIRONMENTS, "environment")
        org_id = self._tenant_org("install a plugin")
        ver = await self.get_version(version_id)
        if ver is None or ver.plugin_id != plugin_id:
            raise NotFound("plugin version not found", query=GET_VERSION.name)
        schema = ver.manifest.get("config_schema", {}) if isinstance(ver.manifest, dict) else {}
        secret_keys = secret_names(schema)
        cfg = dict(config or {})
        sec = dict(secrets or {})
        if set(cfg) & secret_keys:
            raise ValidationError(f"config.{sorted(set(cfg) & secret_keys)[0]} is a secret: "
                                  "pass it in secrets")
        if set(sec) - secret_keys:
            raise ValidationError(f"secrets.{sorted(set(sec) - secret_keys)[0]} is not a "
                                  "secret of this plugin's configuration")
        validate({**cfg, **sec}, schema)
        secret_id = None
        if sec:
            secret_id = uuid.uuid4()
            blob = self._db.dl.keyring.encrypt(orjson.dumps(sec), org_id=org_id,
                                               table=_TABLE, row_id=secret_id, column=_COLUMN)
            await self._db.scalar("plugins.store_secret", id=secret_id, plugin_id=plugin_id,
                                  environment=environment, secret=blob)
        row = await self._db.fetch_one(INSTALL, plugin_id=plugin_id, environment=environment,
                                       version_id=version_id, config=cfg, secret_id=secret_id)
        assert row is not None
        return row

    async def set_enabled(self, plugin_id: uuid.UUID, environment: str,
                          enabled: bool) -> Installation:
        row = await self._db.fetch_one(SET_ENABLED, plugin_id=plugin_id,
                                       environment=environment, enabled=enabled)
        if row is None:
            raise NotFound("installation not found", query=SET_ENABLED.name)
        return row

    async def uninstall(self, plugin_id: uuid.UUID, environment: str) -> bool:
        return await self._db.execrows("plugins.uninstall", plugin_id=plugin_id,
                                       environment=environment) == 1

    async def rollback(self, plugin_id: uuid.UUID, environment: str) -> Installation:
        """Restore the deployment before the latest one (version, config, secrets, enabled)
        in one statement. The policy check runs again when the version changes."""
        check_choice(environment, ENVIRONMENTS, "environment")
        row = await self._db.fetch_one(ROLLBACK, plugin_id=plugin_id, environment=environment)
        if row is None:
            raise NotFound("no earlier deployment to roll back to", query=ROLLBACK.name)
        return row

    async def installation(self, plugin_id: uuid.UUID,
                           environment: str) -> Installation | None:
        return await self._db.fetch_one(INSTALLATION, plugin_id=plugin_id,
                                        environment=environment)

    async def installations(self, environment: str | None = None,
                            ) -> builtins.list[Installation]:
        return await self._db.fetch_many(INSTALLATIONS, environment=environment)

    async def deployments(self, plugin_id: uuid.UUID, environment: str, *,
                          limit: int = 50) -> builtins.list[Deployment]:
        return await self._db.fetch_many(DEPLOYMENTS, plugin_id=plugin_id,
                                         environment=environment, limit=check_limit(limit))

    async def secrets(self, installation: Installation) -> dict[str, Any]:
        """The decrypted secrets of an installation (empty when it has none)."""
        if installation.secret_id is None:
            return {}
        row = await self._db.fetch_one(GET_SECRET, id=installation.secret_id)
        if row is None:
            raise NotFound("installation secrets not found", query=GET_SECRET.name)
        plain = self._db.dl.keyring.decrypt(row.secret, org_id=installation.org_id,
                                            table=_TABLE, row_id=row.id, column=_COLUMN)
        try:
            out: dict[str, Any] = orjson.loads(plain)
        except orjson.JSONDecodeError:
            raise DecryptionError("installation secrets are not JSON") from None
        return out

    # -- usage ------------------------------------------------------------------------------
    async def ingest_usage(self, events: Sequence[UsageEvent], *,
                           org_id: uuid.UUID | None = None) -> int:
        """Store usage events in one statement (unnest); returns how many."""
        if not events:
            return 0
        kinds = [e.kind for e in events]
        if not set(kinds) <= set(USAGE_KINDS):
            raise ValidationError(f"usage kind must be one of {', '.join(USAGE_KINDS)}")
        return await self._db.execrows(
            "plugins.ingest_usage", org_id=org_id, plugin_ids=[e.plugin_id for e in events],
            kinds=kinds, latencies=[e.latency_ms for e in events],
            occurred_at=[e.occurred_at for e in events])

    async def usage_daily(self, plugin_id: uuid.UUID, *,
                          days: int = 30) -> builtins.list[UsageDay]:
        return await self._db.fetch_many(USAGE_DAILY, plugin_id=plugin_id, days=days)

    async def adoption(self, plugin_id: uuid.UUID, *,
                       days: int = 30) -> builtins.list[AdoptionDay]:
        """Active organizations and calls per day of an own plugin (aggregates only)."""
        return await self._db.fetch_many(ADOPTION, plugin_id=plugin_id, days=days)

    async def sla(self, plugin_id: uuid.UUID, *, days: int = 30) -> Sla | None:
        """p95 latency and error rate of an own plugin against its objective."""
        return await self._db.fetch_one(SLA, plugin_id=plugin_id, days=days)


async def plugin_usage_rollup(dl: DataLayer, *, days: int = 2) -> dict[str, int]:
    """Maintenance job: recompute the daily usage roll-up of the last ``days`` UTC days
    (idempotent: whole days are recomputed from the raw events)."""
    async with dl.system() as db:
        n: int = await db.scalar("plugins.usage_rollup", days=days)
    return {"days_rows": n}


async def plugin_quality_refresh(dl: DataLayer) -> dict[str, int]:
    """Maintenance job: recompute the quality score of every published version."""
    async with dl.system() as db:
        n: int = await db.scalar("plugins.quality_refresh")
    return {"versions": n}
