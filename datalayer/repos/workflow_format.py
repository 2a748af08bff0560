"""Workflow content checks and the export document (``datalayer.workflow``, version 1).

Pure Python, no database: :mod:`datalayer.repos.workflows` calls these before it writes, so a
bad value is refused with a message naming the field (``nodes[2].position.x: must be a
finite number``) instead of a constraint name. The database checks the cheap part again
(``workflows_graph_valid``, ``workflows_tags_valid``).

Graph shape (React Flow): ``nodes`` is a list of objects, each with a unique non-empty
string ``id`` and a non-empty string ``type``, optionally ``position`` ``{"x": number,
"y": number}`` and ``data`` (an object); ``edges`` is a list of objects whose ``source`` and
``target`` are node ids (``id``, if present, a string). Other keys are kept as they are.
Every value is JSON: objects with string keys, lists, strings without NUL, booleans, null,
integers from -2^63 to 2^64 - 1 and finite floats, at most 64 levels deep.

The export document, serialized with orjson (keys sorted)::

    {
      "format": "datalayer.workflow",       # required, exactly this
      "version": 1,                         # required; a newer one is refused
      "workflow": {
        "id": "<uuid>",                     # the source workflow; import makes a new one
        "name": "…", "description": "…",
        "nodes": [...], "edges": [...], "settings": {...},
        "status": "draft|active|paused|archived",
        "tags": ["…"], "is_template": false,
        "visibility": "private|team|organization|public",
        "current_version": 7
      },
      "versions": [                         # optional: omitted or null = no history
        {"version": 5, "nodes": [...], "edges": [...], "settings": {...}},
        …                                   # ascending and consecutive; the last is
      ]                                     # current_version, with the workflow's content
    }

Owners, teams, shares, authors and timestamps belong to the source organization and are
not exported; an import records the importing user and time, and needs a team of the
importing organization for ``visibility: "team"``. Unknown fields are refused (a typo
must not import as silently missing data). Round trip: export → import → export gives
the same document but for ``workflow.id``.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from datalayer.core.errors import ValidationError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STATUSES",
    "VISIBILITIES",
    "Content",
    "ImportDocument",
    "check_description",
    "check_graph",
    "check_name",
    "check_settings",
    "check_tags",
    "dump_document",
    "make_document",
    "parse_document",
]

FORMAT = "datalayer.workflow"
FORMAT_VERSION = 1
STATUSES = ("draft", "active", "paused", "archived")
VISIBILITIES = ("private", "team", "organization", "public")
MAX_NODES = 5_000
MAX_EDGES = 20_000
MAX_VERSIONS = 10_000
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64
_TAG = re.compile(r"[a-z0-9][a-z0-9._:-]{0,49}")
# orjson writes integers from -2^63 to 2^64 - 1, and reads them back as integers.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

_WORKFLOW_KEYS = frozenset({"id", "name", "description", "nodes", "edges", "settings", "status",
                            "tags", "is_template", "visibility", "current_version"})
_VERSION_KEYS = frozenset({"version", "nodes", "edges", "settings"})
_TOP_KEYS = frozenset({"format", "version", "workflow", "versions"})


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _json(value: object, path: str, depth: int = 0) -> None:
    """Refuse what jsonb or orjson cannot hold exactly."""
    if depth > MAX_DEPTH:
        raise ValidationError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if "\x00" in value:
            raise ValidationError(f"{path}: strings may not contain NUL characters")
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise ValidationError(f"{path}: integers must be between -2^63 and 2^64 - 1")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{path}: numbers must be finite (no NaN or infinity)")
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValidationError(f"{path}: object keys must be strings")
            if "\x00" in k:
                raise ValidationError(f"{path}: keys may not contain NUL characters")
            _json(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _json(v, f"{path}[{i}]", depth + 1)
    else:
        raise ValidationError(f"{path}: {type(value).__name__} is not a JSON value")


def _text(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{path}: must be a non-empty string")
    if "\x00" in value or len(value) > 200:
        raise ValidationError(f"{path}: must be at most 200 characters, without NUL")
    return value


def _number(value: object, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise ValidationError(f"{path}: must be a finite number")


def check_graph(nodes: object, edges: object, where: str = "") -> None:
    """Check ``nodes`` and ``edges`` (either may be None: not given). Edges are checked
    against the node ids only when both are given; the database checks the stored pair."""
    ids: set[str] | None = None
    if nodes is not None:
        if not isinstance(nodes, list):
            raise ValidationError(f"{where}nodes: must be a list of node objects")
        if len(nodes) > MAX_NODES:
            raise ValidationError(f"{where}nodes: at most {MAX_NODES} nodes")
        ids = set()
        for i, node in enumerate(nodes):
            path = f"{where}nodes[{i}]"
            if not isinstance(node, dict):
                raise ValidationError(f"{path}: must be an object")
            node_id = _text(node.get("id"), f"{path}.id")
            if node_id in ids:
                raise ValidationError(f"{path}.id: duplicate node id {_short(node_id)}")
            ids.add(node_id)
            _text(node.get("type"), f"{path}.type")
            if "position" in node:
                pos = node["position"]
                if not isinstance(pos, dict):
                    raise ValidationError(f"{path}.position: must be an object with x and y")
                _number(pos.get("x"), f"{path}.position.x")
                _number(pos.get("y"), f"{path}.position.y")
            if "data" in node and not isinstance(node["data"], dict):
                raise ValidationError(f"{path}.data: must be an object")
            _json(node, path)
    if edges is not None:
        if not isinstance(edges, list):
            raise ValidationError(f"{where}edges: must be a list of edge objects")
        if len(edges) > MAX_EDGES:
            raise ValidationError(f"{where}edges: at most {MAX_EDGES} edges")
        for i, edge in enumerate(edges):
            path = f"{where}edges[{i}]"
            if not isinstance(edge, dict):
                raise ValidationError(f"{path}: must be an object")
            if "id" in edge:
                _text(edge["id"], f"{path}.id")
            for end in ("source", "target"):
                ref = _text(edge.get(end), f"{path}.{end}")
                if ids is not None and ref not in ids:
                    raise ValidationError(f"{path}.{end}: no node has id {_short(ref)}")
            _json(edge, path)


def check_settings(settings: object, where: str = "") -> None:
    if not isinstance(settings, dict):
        raise ValidationError(f"{where}settings: must be an object")
    _json(settings, f"{where}settings")


def check_name(name: object, where: str = "") -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 200 or "\x00" in name:
        raise ValidationError(f"{where}name: must be 1-200 characters, without NUL")
    return name


def check_description(description: object, where: str = "") -> str:
    if not isinstance(description, str) or len(description) > 10_000 or "\x00" in description:
        raise ValidationError(f"{where}description: must be at most 10,000 characters, "
                              "without NUL")
    return description


def check_tags(tags: Iterable[object], where: str = "", *, field: str = "tags") -> list[str]:
    """Tags stripped and lowercased, duplicates dropped (first kept); at most 50, each
    1-50 characters of a-z, 0-9 and . _ : - starting with a letter or digit. Messages name
    ``{where}{field}[i]``."""
    path = f"{where}{field}"
    if isinstance(tags, str | bytes) or not isinstance(tags, Iterable):
        raise ValidationError(f"{path}: must be a list of strings")
    out: list[str] = []
    for i, tag in enumerate(tags):
        if not isinstance(tag, str):
            raise ValidationError(f"{path}[{i}]: must be a string")
        norm = tag.strip().lower()
        if not _TAG.fullmatch(norm):
            raise ValidationError(
                f"{path}[{i}]: {_short(tag)} must be 1-50 characters of a-z, 0-9 and "
                ". _ : - starting with a letter or digit")
        if norm not in out:
            out.append(norm)
    if len(out) > 50:
        raise ValidationError(f"{path}: at most 50 tags")
    return out


def _choice(value: object, allowed: tuple[str, ...], path: str) -> str:
    if value not in allowed:
        raise ValidationError(f"{path}: must be one of {', '.join(allowed)}")
    assert isinstance(value, str)
    return value


# -- the document ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Content:
    """One version's content."""

    version: int
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    settings: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportDocument:
    """A checked document: what an import writes. ``history`` is ascending and ends with
    the workflow's content at ``current_version``; without history it holds just that."""

    source_id: uuid.UUID | None
    name: str
    description: str
    status: str
    tags: list[str]
    is_template: bool
    visibility: str
    current_version: int
    history: list[Content]


def _canonical(c: Content) -> bytes:
    return orjson.dumps([c.nodes, c.edges, c.settings], option=orjson.OPT_SORT_KEYS)


def _keys(obj: Mapping[str, Any], allowed: frozenset[str], path: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ValidationError(f"{path}{unknown[0]}: unknown field (format version "
                              f"{FORMAT_VERSION} has {', '.join(sorted(allowed))})")


def _required(obj: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in obj:
        raise ValidationError(f"{path}{key}: missing")
    return obj[key]


def _int(value: object, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**31 - 1:
        raise ValidationError(f"{path}: must be a positive integer")
    return value


def _content(obj: Mapping[str, Any], path: str, version: int) -> Content:
    nodes, edges = _required(obj, "nodes", path), _required(obj, "edges", path)
    settings = _required(obj, "settings", path)
    check_graph(nodes, edges, path)
    check_settings(settings, path)
    return Content(version=version, nodes=nodes, edges=edges, settings=settings)


def parse_document(document: bytes | str | Mapping[str, Any]) -> ImportDocument:
    """Check a whole export document; raise ``ValidationError`` naming the first problem."""
    if isinstance(document, bytes | str):
        size = len(document.encode() if isinstance(document, str) else document)
        if size > MAX_DOCUMENT_BYTES:
            raise ValidationError(f"document: larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            doc = orjson.loads(document)
        except orjson.JSONDecodeError as exc:
            raise ValidationError(f"document: not valid JSON ({exc})") from None
    else:
        doc = document
    if not isinstance(doc, Mapping):
        raise ValidationError("document: must be a JSON object")
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise ValidationError(f"format: must be {FORMAT!r}, got {_short(fmt)}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValidationError(f"version: must be an integer, got {_short(version)}")
    if version > FORMAT_VERSION:
        raise ValidationError(f"version: format version {version} is newer than this datalayer "
                              f"reads ({FORMAT_VERSION}); upgrade datalayer to import it")
    if version < 1:
        raise ValidationError(f"version: must be 1 to {FORMAT_VERSION}, got {version}")
    _keys(doc, _TOP_KEYS, "")
    wf = _required(doc, "workflow", "")
    if not isinstance(wf, Mapping):
        raise ValidationError("workflow: must be an object")
    _keys(wf, _WORKFLOW_KEYS, "workflow.")
    source: uuid.UUID | None = None
    if wf.get("id") is not None:
        try:
            source = uuid.UUID(str(wf["id"]))
        except ValueError:
            raise ValidationError("workflow.id: must be a UUID") from None
    w = "workflow."
    name = check_name(_required(wf, "name", w), w)
    description = check_description(_required(wf, "description", w), w)
    status = _choice(_required(wf, "status", w), STATUSES, f"{w}status")
    visibility = _choice(_required(wf, "visibility", w), VISIBILITIES, f"{w}visibility")
    is_template = _required(wf, "is_template", w)
    if not isinstance(is_template, bool):
        raise ValidationError(f"{w}is_template: must be true or false")
    if visibility == "public" and not is_template:
        raise ValidationError(f"{w}visibility: only templates can be public")
    raw_tags = _required(wf, "tags", w)
    if not isinstance(raw_tags, list):
        raise ValidationError(f"{w}tags: must be a list of strings")
    tags = check_tags(raw_tags, w)
    current = _int(_required(wf, "current_version", w), f"{w}current_version")
    content = _content(wf, w, current)
    history = [content]
    raw_versions = doc.get("versions")
    if raw_versions is not None:
        history = _history(raw_versions, content)
    return ImportDocument(source_id=source, name=name, description=description, status=status,
                          tags=tags, is_template=is_template, visibility=visibility,
                          current_version=current, history=history)


def _history(raw: object, current: Content) -> list[Content]:
    if not isinstance(raw, list) or not raw:
        raise ValidationError("versions: must be a non-empty list (or null for no history)")
    if len(raw) > MAX_VERSIONS:
        raise ValidationError(f"versions: at most {MAX_VERSIONS} versions")
    out: list[Content] = []
    previous: bytes | None = None
    for i, v in enumerate(raw):
        path = f"versions[{i}]."
        if not isinstance(v, Mapping):
            raise ValidationError(f"versions[{i}]: must be an object")
        _keys(v, _VERSION_KEYS, path)
        number = _int(_required(v, "version", path), f"{path}version")
        if out and number != out[-1].version + 1:
            raise ValidationError(f"{path}version: must be {out[-1].version + 1} "
                                  f"(versions are consecutive and ascending), got {number}")
        c = _content(v, path, number)
        canonical = _canonical(c)
        if canonical == previous:
            raise ValidationError(f"versions[{i}]: same content as version {number - 1}; "
                                  "a version exists only when the content changed")
        previous = canonical
        out.append(c)
    last = out[-1]
    if last.version != current.version:
        raise ValidationError(f"versions[{len(out) - 1}].version: the last version must be "
                              f"workflow.current_version ({current.version}), got {last.version}")
    if _canonical(last) != _canonical(current):
        raise ValidationError(f"versions[{len(out) - 1}]: content differs from the workflow's; "
                              "the last version is the workflow's current content")
    return out


def make_document(workflow: Mapping[str, Any], history: list[Content] | None) -> dict[str, Any]:
    """The export document of a workflow (as :func:`parse_document` reads it)."""
    doc: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "workflow": {k: workflow[k] for k in sorted(_WORKFLOW_KEYS)},
    }
    if history is not None:
        doc["versions"] = [{"version": c.version, "nodes": c.nodes, "edges": c.edges,
                            "settings": c.settings} for c in history]
    return doc


def dump_document(doc: Mapping[str, Any]) -> bytes:
    """The document as JSON bytes (orjson, keys sorted, so equal documents are equal bytes)."""
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2)
