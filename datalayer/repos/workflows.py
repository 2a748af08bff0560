"""Workflows, versions, shares, templates and statistics (``queries/workflows.sql``).

Who may read or change a workflow is decided by the policies of
``schema/0007_workflows.sql`` (visibility private / team / organization / public, shares
with view or edit permission); this module checks arguments and shapes content first so
that mistakes come back naming the field. Every change of nodes, edges or settings makes
a new immutable version in the same transaction (a database trigger, by content hash).

Export and import use the ``datalayer.workflow`` JSON document, format version 1::

    {"format": "datalayer.workflow", "version": 1,
     "workflow": {"id", "name", "description", "nodes", "edges", "settings", "status",
                  "tags", "is_template", "visibility", "current_version"},
     "versions": [{"version", "nodes", "edges", "settings"}, ...]   # optional history}

:mod:`datalayer.repos.workflow_format` describes it field by field. An import checks the
whole document before writing anything, then writes it under a savepoint: all of it or,
on any error, none of it.
"""

from __future__ import annotations

import builtins
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from datalayer.core.errors import Conflict, NotFound, PermissionDenied, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import LAST, Page, Repository, check_limit, page_of
from datalayer.repos.workflow_format import (
    STATUSES,
    VISIBILITIES,
    Content,
    check_description,
    check_graph,
    check_name,
    check_settings,
    check_tags,
    dump_document,
    make_document,
    parse_document,
)

__all__ = [
    "PERMISSIONS",
    "STATUSES",
    "VISIBILITIES",
    "Share",
    "Template",
    "TemplateSummary",
    "Version",
    "VersionInfo",
    "Workflow",
    "WorkflowHit",
    "WorkflowStats",
    "WorkflowSummary",
    "Workflows",
]

PERMISSIONS = ("view", "edit")
_NO_RANK = (math.inf, uuid.UUID(int=0))


@dataclass(frozen=True, slots=True, kw_only=True)
class Workflow:
    org_id: uuid.UUID
    id: uuid.UUID
    name: str
    description: str
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    settings: dict[str, Any]
    status: str
    owner_id: uuid.UUID
    team_id: uuid.UUID | None
    tags: list[str]
    is_template: bool
    visibility: str
    current_version: int
    content_hash: bytes
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowSummary:
    """A list entry: a workflow without its content."""

    org_id: uuid.UUID
    id: uuid.UUID
    name: str
    description: str
    status: str
    owner_id: uuid.UUID
    team_id: uuid.UUID | None
    tags: list[str]
    is_template: bool
    visibility: str
    current_version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowHit(WorkflowSummary):
    """A search result; ``rank`` is ts_rank (higher is better)."""

    rank: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TemplateSummary:
    """An entry of the public template catalog (every organization's live public templates)."""

    org_id: uuid.UUID
    id: uuid.UUID
    name: str
    description: str
    tags: list[str]
    current_version: int
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Template:
    """A template's content: the organization's own, or from the public catalog."""

    org_id: uuid.UUID
    id: uuid.UUID
    name: str
    description: str
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    settings: dict[str, Any]
    tags: list[str]
    current_version: int
    updated_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class VersionInfo:
    org_id: uuid.UUID
    workflow_id: uuid.UUID
    version: int
    content_hash: bytes
    created_by: uuid.UUID | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Version:
    org_id: uuid.UUID
    workflow_id: uuid.UUID
    version: int
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    settings: dict[str, Any]
    content_hash: bytes
    created_by: uuid.UUID | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class Share:
    org_id: uuid.UUID
    id: uuid.UUID
    workflow_id: uuid.UUID
    user_id: uuid.UUID | None
    team_id: uuid.UUID | None
    permission: str
    created_by: uuid.UUID | None
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkflowStats:
    """Execution statistics. Success rate leaves cancellations out; durations (ms) cover
    the executions that reported one; p95 comes from a log-scale histogram (within 19%)."""

    org_id: uuid.UUID
    workflow_id: uuid.UUID
    executions: int
    successes: int
    failures: int
    cancellations: int
    success_rate: float | None
    avg_duration_ms: float | None
    p95_duration_ms: float | None
    min_duration_ms: int | None
    max_duration_ms: int | None
    last_execution_at: datetime | None


CREATE = RowQuery("workflows.create", Workflow)
GET = RowQuery("workflows.get", Workflow)
GET_TEMPLATE = RowQuery("workflows.get_template", Template)
LIST = RowQuery("workflows.list", WorkflowSummary)
SEARCH = RowQuery("workflows.search", WorkflowHit)
PUBLIC_TEMPLATES = RowQuery("workflows.public_templates", TemplateSummary)
UPDATE = RowQuery("workflows.update", Workflow)
SET_TEAM = RowQuery("workflows.set_team", Workflow)
VERSIONS = RowQuery("workflows.versions", VersionInfo)
GET_VERSION = RowQuery("workflows.get_version", Version)
HISTORY = RowQuery("workflows.history", Version)
RESTORE = RowQuery("workflows.restore", Workflow)
INSTANTIATE = RowQuery("workflows.instantiate", Workflow)
SHARE_USER = RowQuery("workflows.share_with_user", Share)
SHARE_TEAM = RowQuery("workflows.share_with_team", Share)
SHARES = RowQuery("workflows.shares", Share)
STATS = RowQuery("workflows.stats", WorkflowStats)


def _choice(value: str | None, allowed: tuple[str, ...], name: str) -> None:
    if value is not None and value not in allowed:
        raise ValidationError(f"{name}: must be one of {', '.join(allowed)}")


def _tag_list(tags: Iterable[str] | None, name: str) -> list[str] | None:
    if tags is None:
        return None
    out = check_tags(tags, field=name)
    if not out:
        raise ValidationError(f"{name}: give at least one tag (or None for no filter)")
    return out


def _items(value: object, name: str) -> builtins.list[Any] | None:
    """A list copy of a node or edge sequence (None stays None); the items are checked by
    ``check_graph``."""
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise ValidationError(f"{name}: must be a list of {name[:-1]} objects")
    return builtins.list(value)


def _object(value: object) -> object:
    return dict(value) if isinstance(value, Mapping) and not isinstance(value, dict) else value


def _summary_key(w: WorkflowSummary) -> tuple[datetime, uuid.UUID]:
    return (w.updated_at, w.id)


class Workflows(Repository):
    """``db.workflows``: the context organization's workflows, as its policies allow."""

    __slots__ = ()

    # -- workflows ------------------------------------------------------------------------
    async def create(self, name: str, *, description: str = "",
                     nodes: Sequence[Mapping[str, Any]] = (),
                     edges: Sequence[Mapping[str, Any]] = (),
                     settings: Mapping[str, Any] | None = None, status: str = "draft",
                     tags: Iterable[str] = (), team_id: uuid.UUID | None = None,
                     owner_id: uuid.UUID | None = None, is_template: bool = False,
                     visibility: str = "organization") -> Workflow:
        """Create a workflow and its version 1. The owner is the context user unless an
        admin names another member. One round trip."""
        node_list, edge_list = _items(nodes, "nodes"), _items(edges, "edges")
        settings_obj = {} if settings is None else _object(settings)
        check_name(name)
        check_description(description)
        check_graph(node_list, edge_list)
        check_settings(settings_obj)
        _choice(status, STATUSES, "status")
        _choice(visibility, VISIBILITIES, "visibility")
        if visibility == "team" and team_id is None:
            raise ValidationError("visibility: 'team' needs a team_id")
        if visibility == "public" and not is_template:
            raise ValidationError("visibility: only templates can be public")
        wf = await self._db.fetch_one(
            CREATE, name=name, description=description, nodes=node_list, edges=edge_list,
            settings=settings_obj, status=status, owner_id=owner_id, team_id=team_id,
            tags=check_tags(tags), is_template=is_template, visibility=visibility,
            current_version=1)
        assert wf is not None
        return wf

    async def get(self, workflow_id: uuid.UUID) -> Workflow | None:
        """A live workflow of the context organization that the context may see."""
        return await self._db.fetch_one(GET, id=workflow_id)

    async def get_template(self, template_id: uuid.UUID) -> Template | None:
        """A template of the context organization, or a public template of any."""
        return await self._db.fetch_one(GET_TEMPLATE, id=template_id)

    async def list(self, *, status: str | None = None, owner_id: uuid.UUID | None = None,
                   team_id: uuid.UUID | None = None, tag: str | None = None,
                   tags_any: Iterable[str] | None = None,
                   tags_all: Iterable[str] | None = None, is_template: bool | None = None,
                   after: tuple[datetime, uuid.UUID] | None = None,
                   limit: int = 50) -> Page[WorkflowSummary]:
        """Live workflows the context may see, most recently updated first. Filters combine
        (AND); ``tag`` is ``tags_all=[tag]``. Pass ``page.next`` as ``after``."""
        _choice(status, STATUSES, "status")
        all_tags = _tag_list(tags_all, "tags_all")
        if tag is not None:
            one = check_tags([tag], field="tag")
            all_tags = (all_tags or []) + [t for t in one if t not in (all_tags or [])]
        updated, wid = after or LAST
        rows = await self._db.fetch_many(
            LIST, before_updated_at=updated, before_id=wid, status=status, owner_id=owner_id,
            team_id=team_id, is_template=is_template, tags_any=_tag_list(tags_any, "tags_any"),
            tags_all=all_tags, limit=check_limit(limit))
        return page_of(rows, limit, _summary_key)

    async def find_by_tags(self, tags: Iterable[str], *, match: Literal["any", "all"] = "any",
                           after: tuple[datetime, uuid.UUID] | None = None,
                           limit: int = 50) -> Page[WorkflowSummary]:
        """Workflows carrying any (or all) of ``tags``, most recently updated first."""
        if match == "any":
            return await self.list(tags_any=tags, after=after, limit=limit)
        if match == "all":
            return await self.list(tags_all=tags, after=after, limit=limit)
        raise ValidationError("match: must be 'any' or 'all'")

    async def search(self, query: str, *, status: str | None = None,
                     after: tuple[float, uuid.UUID] | None = None,
                     limit: int = 20) -> Page[WorkflowHit]:
        """Full-text search (websearch syntax) over name, description and tags, best rank
        first. Pass ``page.next`` as ``after``."""
        if not isinstance(query, str) or not query.strip() or "\x00" in query:
            raise ValidationError("query: must be a non-empty search text")
        if len(query) > 1000:
            raise ValidationError("query: at most 1,000 characters")
        _choice(status, STATUSES, "status")
        rank, wid = after or _NO_RANK
        rows = await self._db.fetch_many(SEARCH, query=query, status=status, after_rank=rank,
                                         after_id=wid, limit=check_limit(limit))
        return page_of(rows, limit, lambda h: (h.rank, h.id))

    async def public_templates(self, *, after: tuple[datetime, uuid.UUID] | None = None,
                               limit: int = 50) -> Page[TemplateSummary]:
        """The public template catalog: live public templates of every organization, most
        recently updated first (read from every organization, written by none)."""
        updated, wid = after or LAST
        rows = await self._db.fetch_many(PUBLIC_TEMPLATES, before_updated_at=updated,
                                         before_id=wid, limit=check_limit(limit))
        return page_of(rows, limit, lambda t: (t.updated_at, t.id))

    async def update(self, workflow_id: uuid.UUID, *, name: str | None = None,
                     description: str | None = None,
                     nodes: Sequence[Mapping[str, Any]] | None = None,
                     edges: Sequence[Mapping[str, Any]] | None = None,
                     settings: Mapping[str, Any] | None = None, status: str | None = None,
                     tags: Iterable[str] | None = None, is_template: bool | None = None,
                     visibility: str | None = None,
                     expected_version: int | None = None) -> Workflow:
        """Change a workflow (None keeps a value). A change of nodes, edges or settings
        makes version ``current_version + 1``; saving the same content makes none.

        With ``expected_version``, ``Conflict`` if someone saved a new version since.
        ``NotFound`` when the workflow is not visible, ``PermissionDenied`` when it is but
        this context may not change it. One round trip (two on failure)."""
        node_list, edge_list = _items(nodes, "nodes"), _items(edges, "edges")
        settings_obj = None if settings is None else _object(settings)
        if name is not None:
            check_name(name)
        if description is not None:
            check_description(description)
        check_graph(node_list, edge_list)
        if settings_obj is not None:
            check_settings(settings_obj)
        _choice(status, STATUSES, "status")
        _choice(visibility, VISIBILITIES, "visibility")
        wf = await self._db.fetch_one(
            UPDATE, id=workflow_id, name=name, description=description, nodes=node_list,
            edges=edge_list, settings=settings_obj, status=status,
            tags=None if tags is None else check_tags(tags), is_template=is_template,
            visibility=visibility, expected_version=expected_version)
        if wf is None:
            raise await self._why_not_written(workflow_id, expected_version)
        return wf

    async def _why_not_written(self, workflow_id: uuid.UUID,
                               expected_version: int | None = None) -> Exception:
        seen = await self.get(workflow_id)
        if seen is None:
            return NotFound("workflow not found (or not visible to this context)",
                            query=UPDATE.name)
        if expected_version is not None and seen.current_version != expected_version:
            return Conflict(f"the workflow is at version {seen.current_version}, not "
                            f"{expected_version}: someone saved it meanwhile; reload and retry",
                            query=UPDATE.name)
        return PermissionDenied("this context may read the workflow but not change it",
                                query=UPDATE.name)

    async def set_team(self, workflow_id: uuid.UUID, team_id: uuid.UUID | None) -> Workflow:
        """Give the workflow to a team (None: to no team). Owner or admin; a non-admin
        only to a team of theirs."""
        wf = await self._db.fetch_one(SET_TEAM, id=workflow_id, team_id=team_id)
        if wf is None:
            raise await self._why_not_written(workflow_id)
        return wf

    async def transfer(self, workflow_id: uuid.UUID, owner_id: uuid.UUID) -> None:
        """Make another member the owner (owner or admin). An UPDATE may not hide a row from
        the one who makes it, so a non-admin owner of a private workflow is refused
        (``PermissionDenied``) unless a share keeps it visible to them: share it with
        yourself first. Returns nothing for the same reason."""
        if await self._db.execrows("workflows.transfer", id=workflow_id, owner_id=owner_id) != 1:
            raise await self._why_not_written(workflow_id)

    async def delete(self, workflow_id: uuid.UUID, *, hard: bool = False) -> bool:
        """Soft-delete (hidden, restorable with :meth:`undelete`), or with ``hard=True``
        delete it with its versions, shares and statistics. False if nothing was deleted."""
        name = "workflows.hard_delete" if hard else "workflows.soft_delete"
        return await self._db.execrows(name, id=workflow_id) == 1

    async def undelete(self, workflow_id: uuid.UUID) -> bool:
        return await self._db.execrows("workflows.undelete", id=workflow_id) == 1

    # -- versions -------------------------------------------------------------------------
    async def versions(self, workflow_id: uuid.UUID, *, after: int | None = None,
                       limit: int = 50) -> Page[VersionInfo]:
        """Versions newest first (without content); pass ``page.next[0]`` as ``after``."""
        rows = await self._db.fetch_many(
            VERSIONS, workflow_id=workflow_id,
            before_version=2**31 - 1 if after is None else after, limit=check_limit(limit))
        return page_of(rows, limit, lambda v: (v.version,))

    async def get_version(self, workflow_id: uuid.UUID, version: int) -> Version | None:
        return await self._db.fetch_one(GET_VERSION, workflow_id=workflow_id, version=version)

    async def restore(self, workflow_id: uuid.UUID, version: int) -> Workflow:
        """Make an old version's content current: a new version with that content (none
        if it already is the current content). ``NotFound`` without such a version."""
        wf = await self._db.fetch_one(RESTORE, id=workflow_id, version=version)
        if wf is None:
            if await self.get_version(workflow_id, version) is None:
                raise NotFound(f"workflow version {version} not found", query=RESTORE.name)
            raise await self._why_not_written(workflow_id)
        return wf

    # -- templates ------------------------------------------------------------------------
    async def instantiate(self, template_id: uuid.UUID, *, name: str | None = None,
                          team_id: uuid.UUID | None = None) -> Workflow:
        """A new draft workflow, owned by the context user, with a template's content (the
        organization's own template or a public one). ``NotFound`` if there is none."""
        if name is not None:
            check_name(name)
        wf = await self._db.fetch_one(INSTANTIATE, template_id=template_id, name=name,
                                      team_id=team_id)
        if wf is None:
            raise NotFound("template not found (or not visible to this context)",
                           query=INSTANTIATE.name)
        return wf

    # -- shares ---------------------------------------------------------------------------
    async def share(self, workflow_id: uuid.UUID, *, user_id: uuid.UUID | None = None,
                    team_id: uuid.UUID | None = None, permission: str = "view") -> Share:
        """Share with one member or one team (or change the permission of that share).
        The workflow's owner and admins share; the grantee must be of this organization."""
        if (user_id is None) == (team_id is None):
            raise ValidationError("share with exactly one of user_id or team_id")
        _choice(permission, PERMISSIONS, "permission")
        if user_id is not None:
            share = await self._db.fetch_one(SHARE_USER, workflow_id=workflow_id,
                                             user_id=user_id, permission=permission)
        else:
            share = await self._db.fetch_one(SHARE_TEAM, workflow_id=workflow_id,
                                             team_id=team_id, permission=permission)
        assert share is not None
        return share

    async def unshare(self, share_id: uuid.UUID) -> bool:
        return await self._db.execrows("workflows.unshare", id=share_id) == 1

    async def shares(self, workflow_id: uuid.UUID) -> builtins.list[Share]:
        """The shares of a workflow this context may see (owner and admins: all)."""
        return await self._db.fetch_many(SHARES, workflow_id=workflow_id)

    # -- statistics -----------------------------------------------------------------------
    async def stats(self, workflow_id: uuid.UUID) -> WorkflowStats | None:
        """Execution statistics from the workflow's running totals (one row; executions
        are not scanned). None if the workflow is not visible."""
        return await self._db.fetch_one(STATS, id=workflow_id)

    # -- export / import ------------------------------------------------------------------
    async def export(self, workflow_id: uuid.UUID, *, history: bool = True) -> dict[str, Any]:
        """The export document (``datalayer.workflow`` v1) of a visible workflow, with its
        version history unless ``history=False``. Two round trips (one without history)."""
        wf = await self.get(workflow_id)
        if wf is None:
            raise NotFound("workflow not found (or not visible to this context)",
                           query=GET.name)
        versions = None
        if history:
            rows = await self._db.fetch_many(HISTORY, workflow_id=workflow_id)
            versions = [Content(version=v.version, nodes=v.nodes, edges=v.edges,
                                settings=v.settings) for v in rows]
        return make_document({
            "id": str(wf.id), "name": wf.name, "description": wf.description,
            "nodes": wf.nodes, "edges": wf.edges, "settings": wf.settings,
            "status": wf.status, "tags": wf.tags, "is_template": wf.is_template,
            "visibility": wf.visibility, "current_version": wf.current_version,
        }, versions)

    async def export_json(self, workflow_id: uuid.UUID, *, history: bool = True) -> bytes:
        """:meth:`export` serialized (orjson, keys sorted)."""
        return dump_document(await self.export(workflow_id, history=history))

    async def import_(self, document: bytes | str | Mapping[str, Any], *,
                      team_id: uuid.UUID | None = None) -> Workflow:
        """Create a workflow (new id, owned by the context user) from an export document,
        with its version history and numbering when the document has one.

        The document is checked in full first (``ValidationError`` naming the field: not
        JSON, another format, a newer format version, a bad node…); then everything is
        written under a savepoint, so an error leaves nothing behind even if the caller
        goes on with the session. ``team_id`` is needed for ``visibility: "team"`` (team
        ids do not travel between organizations). 1 + (versions - 1) round trips."""
        doc = parse_document(document)
        if doc.visibility == "team" and team_id is None:
            raise ValidationError("workflow.visibility: 'team' needs team_id= (a team of the "
                                  "importing organization)")
        first = doc.history[0]
        async with self._db.savepoint():
            wf = await self._db.fetch_one(
                CREATE, name=doc.name, description=doc.description, nodes=first.nodes,
                edges=first.edges, settings=first.settings, status=doc.status, owner_id=None,
                team_id=team_id, tags=doc.tags, is_template=doc.is_template,
                visibility=doc.visibility, current_version=first.version)
            assert wf is not None
            for i, step in enumerate(doc.history[1:], start=1):
                wf = await self._db.fetch_one(
                    UPDATE, id=wf.id, name=None, description=None, nodes=step.nodes,
                    edges=step.edges, settings=step.settings, status=None, tags=None,
                    is_template=None, visibility=None, expected_version=step.version - 1)
                if wf is None or wf.current_version != step.version:
                    raise ValidationError(
                        f"versions[{i}]: same content as version {step.version - 1} once "
                        "stored (PostgreSQL compares numbers by value, e.g. 1e2 and 100)")
        return wf
