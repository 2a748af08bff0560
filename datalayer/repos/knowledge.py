"""Knowledge documents, their processing queue and full-text search over their chunks
(``queries/knowledge.sql``, ``schema/0022_digitwin.sql``).

Documents are private to their user within the organization (RLS). The same content is
stored once per user: :meth:`Knowledge.create` returns the existing document for a repeated
checksum (``Ingested.created`` is False). Past the tier's document limit creation raises
``LimitExceeded``.

Processing: workers (``dl.system()`` across tenants, or the user's own session)
:meth:`~Knowledge.claim` pending documents with ``FOR UPDATE SKIP LOCKED`` and a lease,
split them, and :meth:`~Knowledge.store_chunks` (one bulk statement that also marks the
document ready) or :meth:`~Knowledge.mark_failed`. A crashed worker's documents come back
when their lease expires (claimed again directly, or reset by :func:`reap_documents`).

Search (:meth:`~Knowledge.search`) ranks the user's chunks by weighted full-text match and
returns highlighted snippets with their documents; it runs through a definer function that
filters on the context user explicitly, so the GIN index serves it under RLS.
"""

from __future__ import annotations

import builtins
import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from datalayer.core.errors import NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import LAST, Page, Repository, check_limit, page_of
from datalayer.repos.executions import check_lease, check_worker_id

if TYPE_CHECKING:
    from datalayer.core.database import DataLayer

__all__ = [
    "SOURCES",
    "Chunk",
    "ChunkIn",
    "ClaimedDocument",
    "Document",
    "Ingested",
    "Knowledge",
    "SearchHit",
    "checksum_of",
    "reap_documents",
]

SOURCES = ("upload", "url", "note")
MAX_ATTEMPTS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class Document:
    org_id: uuid.UUID
    id: uuid.UUID
    user_id: uuid.UUID
    title: str
    source: str
    source_uri: str | None
    mime_type: str
    size_bytes: int
    checksum: bytes
    status: str
    error: str | None
    attempts: int
    chunk_count: int
    token_count: int
    processed_at: datetime | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class _CreatedRow(Document):
    created: bool | None


@dataclass(frozen=True, slots=True)
class Ingested:
    """The stored document; ``created`` is False when the same content was there already."""

    document: Document
    created: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedDocument:
    """A document a worker holds under a lease, with what it needs to process it."""

    org_id: uuid.UUID
    id: uuid.UUID
    user_id: uuid.UUID
    title: str
    source: str
    source_uri: str | None
    mime_type: str
    size_bytes: int
    content: str | None
    attempts: int
    worker_id: str | None
    lease_expires_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Chunk:
    org_id: uuid.UUID
    id: int
    document_id: uuid.UUID
    user_id: uuid.UUID
    seq: int
    heading: str
    content: str
    token_count: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChunkIn:
    """A chunk to store; ``heading`` defaults to the document title."""

    content: str
    token_count: int
    heading: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchHit:
    """A matching chunk (``snippet`` marks the matches with [brackets]) and its document."""

    chunk_id: int | None
    document_id: uuid.UUID | None
    seq: int | None
    heading: str | None
    content: str | None
    token_count: int | None
    rank: float | None
    snippet: str | None
    title: str | None
    source: str | None
    mime_type: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Reaped:
    org_id: uuid.UUID
    id: uuid.UUID
    status: str


CREATE = RowQuery("knowledge.create", _CreatedRow)
GET = RowQuery("knowledge.get", Document)
LIST = RowQuery("knowledge.list", Document)
CHUNKS = RowQuery("knowledge.chunks", Chunk)
SOFT_DELETE = RowQuery("knowledge.soft_delete", Document)
RESTORE = RowQuery("knowledge.restore", Document)
REPROCESS = RowQuery("knowledge.reprocess", Document)
CLAIM = RowQuery("knowledge.claim", ClaimedDocument)
MARK_FAILED = RowQuery("knowledge.mark_failed", Document)
REAP = RowQuery("knowledge.reap", _Reaped)
SEARCH = RowQuery("knowledge.search", SearchHit)



def checksum_of(content: str | bytes) -> bytes:
    """The stored checksum of a document's content: sha256 of its bytes (UTF-8 for text)."""
    data = content.encode() if isinstance(content, str) else content
    return hashlib.sha256(data).digest()


class Knowledge(Repository):
    """``db.knowledge``: the context user's documents, the processing queue, search."""

    __slots__ = ()

    async def create(self, title: str, *, source: str = "note", content: str | None = None,
                     checksum: bytes | None = None, source_uri: str | None = None,
                     mime_type: str = "text/plain", size_bytes: int | None = None) -> Ingested:
        """Store a document (pending processing) once per content. ``content`` is the
        text to process; without it (a URL or an upload in object storage) pass
        ``checksum`` (sha256 of the bytes) and ``source_uri``."""
        if source not in SOURCES:
            raise ValidationError(f"source must be one of {', '.join(SOURCES)}")
        if content is not None:
            checksum = checksum_of(content)
            if size_bytes is None:
                size_bytes = len(content.encode())
        if checksum is None or len(checksum) != 32:
            raise ValidationError("a document needs its content or a 32-byte sha256 checksum")
        rec = await self._db.one(
            CREATE.name, title=title, source=source, source_uri=source_uri,
            mime_type=mime_type, size_bytes=size_bytes or 0, checksum=checksum,
            content=content)
        if rec is None:
            raise NotFound("document not created", query=CREATE.name)
        return Ingested(GET.build(rec), bool(rec["created"]))

    async def get(self, document_id: uuid.UUID) -> Document | None:
        return await self._db.fetch_one(GET, id=document_id)

    async def list(self, *, limit: int = 50,
                   before: tuple[Any, ...] | None = None) -> Page[Document]:
        """Live documents, newest first; pass ``page.next`` as ``before``."""
        created, did = before or LAST
        items = await self._db.fetch_many(LIST, before_created_at=created, before_id=did,
                                          limit=check_limit(limit))
        return page_of(items, limit, lambda d: (d.created_at, d.id))

    async def chunks(self, document_id: uuid.UUID, *, limit: int = 1000) -> builtins.list[Chunk]:
        """A document's chunks in order."""
        return await self._db.fetch_many(CHUNKS, document_id=document_id,
                                         limit=check_limit(limit))

    async def delete(self, document_id: uuid.UUID) -> Document:
        """Soft delete: hidden from lists and search; :meth:`restore` undoes it."""
        row = await self._db.fetch_one(SOFT_DELETE, id=document_id)
        if row is None:
            raise NotFound("document not found or already deleted", query=SOFT_DELETE.name)
        return row

    async def restore(self, document_id: uuid.UUID) -> Document:
        """Undelete; counts against the document limit again (``LimitExceeded``)."""
        row = await self._db.fetch_one(RESTORE, id=document_id)
        if row is None:
            raise NotFound("document not found or not deleted", query=RESTORE.name)
        return row

    async def hard_delete(self, document_id: uuid.UUID) -> bool:
        """Remove the document and its chunks for good; True when there was one."""
        return await self._db.execrows("knowledge.hard_delete", id=document_id) == 1

    async def reprocess(self, document_id: uuid.UUID) -> Document:
        """Queue a ready or failed document again."""
        row = await self._db.fetch_one(REPROCESS, id=document_id)
        if row is None:
            raise NotFound("document not found, deleted, or being processed",
                           query=REPROCESS.name)
        return row

    # -- the processing queue ---------------------------------------------------------------
    async def claim(self, worker_id: str, *, limit: int = 10, lease_s: float = 300.0,
                    org_id: uuid.UUID | None = None) -> builtins.list[ClaimedDocument]:
        """Up to ``limit`` pending documents (or ones whose lease expired), oldest first,
        leased to ``worker_id``; concurrent workers never get the same one."""
        return await self._db.fetch_many(CLAIM, worker_id=check_worker_id(worker_id),
                                         limit=check_limit(limit), lease_s=check_lease(lease_s),
                                         org_id=org_id)

    async def store_chunks(self, document_id: uuid.UUID, worker_id: str,
                           chunks: Sequence[ChunkIn | str], *,
                           org_id: uuid.UUID | None = None) -> int:
        """Store a claimed document's chunks (replacing earlier ones) and mark it ready, in
        one statement; a plain string counts its words as tokens. ``NotFound`` when
        ``worker_id`` no longer holds the lease (nothing is stored then)."""
        items = [ChunkIn(c, len(c.split())) if isinstance(c, str) else c for c in chunks]
        if any(not c.content for c in items):
            raise ValidationError("a chunk needs text")
        n = await self._db.scalar(
            "knowledge.store_chunks", document_id=document_id,
            worker_id=check_worker_id(worker_id), org_id=org_id,
            contents=[c.content for c in items], token_counts=[c.token_count for c in items],
            headings=[c.heading for c in items])
        if n is None:
            raise NotFound("document not held by this worker (lease expired or taken over)",
                           query="knowledge.store_chunks")
        return int(n)

    async def mark_failed(self, document_id: uuid.UUID, worker_id: str, error: str, *,
                          org_id: uuid.UUID | None = None) -> Document:
        """Processing failed for good; ``error`` is shown to the user."""
        row = await self._db.fetch_one(MARK_FAILED, document_id=document_id,
                                       worker_id=check_worker_id(worker_id),
                                       error=error[:2000], org_id=org_id)
        if row is None:
            raise NotFound("document not held by this worker", query=MARK_FAILED.name)
        return row

    async def reap(self, *, max_attempts: int = MAX_ATTEMPTS) -> dict[str, int]:
        """Expired leases: back to pending, or failed after ``max_attempts``."""
        rows = await self._db.fetch_many(REAP, max_attempts=max_attempts)
        return {"pending": sum(r.status == "pending" for r in rows),
                "failed": sum(r.status == "failed" for r in rows)}

    # -- search -------------------------------------------------------------------------------
    async def search(self, query: str, *, limit: int = 10) -> builtins.list[SearchHit]:
        """The context user's best-matching chunks of live documents (web-search syntax:
        words, "phrases", -exclusions, or), best first, with snippets."""
        return await self._db.fetch_many(SEARCH, query=query, limit=check_limit(limit, 100))


async def reap_documents(dl: DataLayer) -> dict[str, int]:
    """Maintenance job: return crashed workers' documents to the queue (or fail them)."""
    async with dl.system() as db:
        return await db.knowledge.reap()
