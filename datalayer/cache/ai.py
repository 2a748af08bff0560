"""Typed namespaces for the AI caches of the DigiTwin platform: each keyed by a hash of its input.

* ``ai.embeddings`` (1 h): a text's embedding under a model. Global: the same model and text
  give the same vector in every tenant. Stored as packed float32 (what embedding models
  return), about a fifth of the JSON size.
* ``ai.vector_search`` (30 min): the hits of a search in one organization's index. Keyed by
  organization, index, query, k and filters; tagged ``kb:<org>:<index>`` so that a change
  to the index drops its cached searches (:meth:`AICache.invalidate_index`). Encrypted.
* ``ai.llm_responses`` (1 h): a model's answer to a prompt (with its parameters), scoped to
  an organization (``org_id=None`` only for prompts that hold no tenant data), with a hit
  count per cached answer. Encrypted.

Input hashes are sha256 over the canonical JSON of the inputs (sorted keys), hex.
"""

from __future__ import annotations

import array
import base64
import hashlib
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from datalayer.cache._codec import dumps
from datalayer.cache._typed import row_converter
from datalayer.cache.core import Namespace

if TYPE_CHECKING:
    from datalayer.cache.core import Cache

__all__ = ["EMBEDDINGS", "LLM_RESPONSES", "VECTOR_SEARCH", "AICache", "CachedLLMResponse",
           "LLMResponse", "SearchHit", "input_hash"]

EMBEDDINGS = Namespace("ai.embeddings", ttl=3600, compress_threshold=None)
VECTOR_SEARCH = Namespace("ai.vector_search", ttl=1800, sensitive=True)
LLM_RESPONSES = Namespace("ai.llm_responses", ttl=3600, sensitive=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchHit:
    id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class LLMResponse:
    text: str
    model: str
    created_at: datetime
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class CachedLLMResponse:
    """A response and how many times it has been served from the cache (0: just made)."""

    response: LLMResponse
    hits: int


def input_hash(*parts: object) -> str:
    """sha256 (hex) of the canonical JSON of ``parts``."""
    return hashlib.sha256(orjson.dumps(orjson.loads(dumps(parts)),
                                       option=orjson.OPT_SORT_KEYS)).hexdigest()


def _pack(vector: Sequence[float]) -> str:
    a = array.array("f", vector)
    if sys.byteorder != "little":
        a.byteswap()
    return base64.b64encode(a.tobytes()).decode("ascii")


def _unpack(text: str) -> list[float]:
    a = array.array("f")
    a.frombytes(base64.b64decode(text))
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


_hit = row_converter(SearchHit)


class AICache:
    """``dl.cache.ai``: the three AI namespaces over the DataLayer's cache backend."""

    def __init__(self, cache: Cache) -> None:
        self._emb = cache.namespace(EMBEDDINGS)
        self._search = cache.namespace(VECTOR_SEARCH)
        self._llm = cache.namespace(LLM_RESPONSES, row=LLMResponse)

    # -- embeddings -----------------------------------------------------------------------
    @staticmethod
    def _emb_key(model: str, text: str) -> str:
        return input_hash("embedding", model, text)

    async def get_embedding(self, model: str, text: str) -> list[float] | None:
        packed = await self._emb.get(self._emb_key(model, text))
        return None if packed is None else _unpack(packed)

    async def set_embedding(self, model: str, text: str, vector: Sequence[float]) -> None:
        await self._emb.set(self._emb_key(model, text), _pack(vector))

    async def embedding(self, model: str, text: str,
                        compute: Callable[[], Awaitable[Sequence[float]]]) -> list[float]:
        """The cached embedding, or ``compute()`` once (concurrent callers share it)."""
        async def load() -> str:
            return _pack(await compute())

        packed = await self._emb.get_or_set(self._emb_key(model, text), load)
        assert packed is not None
        return _unpack(packed)

    # -- vector search --------------------------------------------------------------------
    @staticmethod
    def _search_key(org_id: uuid.UUID, index: str, query: str | Sequence[float], k: int,
                    filters: Mapping[str, Any] | None) -> str:
        q = query if isinstance(query, str) else _pack(query)
        return f"{org_id}:{input_hash('search', index, q, k, filters or {})}"

    @staticmethod
    def index_tag(org_id: uuid.UUID, index: str) -> str:
        return f"kb:{org_id}:{index}"

    async def get_search(self, org_id: uuid.UUID, index: str, query: str | Sequence[float], *,
                         k: int, filters: Mapping[str, Any] | None = None,
                         ) -> list[SearchHit] | None:
        raw = await self._search.get(self._search_key(org_id, index, query, k, filters))
        return None if raw is None else [_hit(h) for h in raw]

    async def set_search(self, org_id: uuid.UUID, index: str, query: str | Sequence[float],
                         hits: Sequence[SearchHit], *, k: int,
                         filters: Mapping[str, Any] | None = None) -> None:
        await self._search.set(self._search_key(org_id, index, query, k, filters), list(hits),
                               tags=(self.index_tag(org_id, index),))

    async def search(self, org_id: uuid.UUID, index: str, query: str | Sequence[float], *,
                     k: int, compute: Callable[[], Awaitable[Sequence[SearchHit]]],
                     filters: Mapping[str, Any] | None = None) -> list[SearchHit]:
        async def load() -> list[SearchHit]:
            return list(await compute())

        out = await self._search.get_or_set(self._search_key(org_id, index, query, k, filters),
                                            load, tags=(self.index_tag(org_id, index),))
        return [h if isinstance(h, SearchHit) else _hit(h) for h in out or ()]

    async def invalidate_index(self, org_id: uuid.UUID, index: str) -> None:
        """Drop every cached search of this index (call it after the index changes)."""
        await self._search.cache.invalidate_tags(self.index_tag(org_id, index))

    # -- LLM responses ----------------------------------------------------------------------
    @staticmethod
    def _llm_key(org_id: uuid.UUID | None, model: str, prompt: str,
                 params: Mapping[str, Any] | None) -> str:
        return f"{org_id or 'shared'}:{input_hash('llm', model, prompt, params or {})}"

    async def get_llm(self, org_id: uuid.UUID | None, model: str, prompt: str, *,
                      params: Mapping[str, Any] | None = None) -> CachedLLMResponse | None:
        """The cached response, counting this hit."""
        key = self._llm_key(org_id, model, prompt, params)
        response = await self._llm.get(key)
        if response is None:
            return None
        hits = await self._llm.incr(key + ":hits")
        return CachedLLMResponse(response, hits or 0)

    async def set_llm(self, org_id: uuid.UUID | None, model: str, prompt: str,
                      response: LLMResponse, *, params: Mapping[str, Any] | None = None) -> None:
        await self._llm.set(self._llm_key(org_id, model, prompt, params), response)

    async def llm(self, org_id: uuid.UUID | None, model: str, prompt: str,
                  compute: Callable[[], Awaitable[LLMResponse]], *,
                  params: Mapping[str, Any] | None = None) -> CachedLLMResponse:
        """The cached response (hit counted), or ``compute()`` once for concurrent callers."""
        cached = await self.get_llm(org_id, model, prompt, params=params)
        if cached is not None:
            return cached
        response = await self._llm.get_or_set(self._llm_key(org_id, model, prompt, params),
                                              compute)
        assert response is not None
        return CachedLLMResponse(response, 0)
