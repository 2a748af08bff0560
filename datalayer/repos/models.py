"""DigiTwin profile, subscription usage and personal AI models (``queries/models.sql``,
``schema/0022_digitwin.sql``).

Every method runs in the model owner's tenant session: models are private to their user
within the organization (RLS). A model's artifact lives in object storage; the row keeps its
URI, never the blob. Exactly one model per user and kind is active (a partial unique index);
:meth:`Models.activate` switches in one call, safe under concurrent activations. Creating a
model past the subscription tier's limit raises :class:`~datalayer.core.errors.LimitExceeded`
(the database enforces it for every caller).
"""

from __future__ import annotations

import builtins
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from datalayer.core.errors import NotFound, ValidationError
from datalayer.core.rows import RowQuery
from datalayer.repos._base import Repository, check_choice, check_limit

__all__ = ["KINDS", "STATUSES", "Model", "Models", "Profile", "Usage"]

KINDS = ("voice", "face")
STATUSES = ("uploading", "training", "ready", "failed")
_URI = re.compile(r"[a-z][a-z0-9+.-]*://\S+")


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """What the twin knows of its user (``users`` columns)."""

    id: uuid.UUID
    display_name: str
    subscription_tier: str
    personality_traits: list[str]
    preferences: Any
    conversation_preferences: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Usage:
    """The tier's limits (None: unlimited) and what the user has used of them."""

    tier: str | None
    max_models: int | None
    max_documents: int | None
    max_monthly_turns: int | None
    models: int | None
    documents: int | None
    month_turns: int | None
    total_turns: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Model:
    org_id: uuid.UUID
    id: uuid.UUID
    user_id: uuid.UUID
    kind: str
    name: str
    provider: str
    storage_uri: str
    status: str
    quality_metrics: Any
    training_params: Any
    error: str | None
    is_active: bool
    training_started_at: datetime | None
    ready_at: datetime | None
    activated_at: datetime | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None


GET_PROFILE = RowQuery("models.get_profile", Profile)
SET_PROFILE = RowQuery("models.set_profile", Profile)
USAGE = RowQuery("models.usage", Usage)
CREATE = RowQuery("models.create", Model)
GET = RowQuery("models.get", Model)
LIST = RowQuery("models.list", Model)
ACTIVE = RowQuery("models.active", Model)
SET_STATUS = RowQuery("models.set_status", Model)
ACTIVATE = RowQuery("models.activate", Model)
DEACTIVATE = RowQuery("models.deactivate", Model)
SOFT_DELETE = RowQuery("models.soft_delete", Model)
RESTORE = RowQuery("models.restore", Model)


class Models(Repository):
    """``db.models``: the context user's twin profile and models."""

    __slots__ = ()

    # -- profile and usage ----------------------------------------------------------------
    async def profile(self) -> Profile | None:
        """The context user's twin profile (None without a user in the context)."""
        return await self._db.fetch_one(GET_PROFILE)

    async def set_profile(self, *, personality_traits: builtins.list[str] | None = None,
                          conversation_preferences: dict[str, Any] | None = None) -> Profile:
        """Replace the traits and/or the conversation preferences (None keeps a field)."""
        if personality_traits is not None and (
                len(personality_traits) > 50
                or not all(isinstance(t, str) and 0 < len(t) <= 100 for t in personality_traits)):
            raise ValidationError("personality_traits must be at most 50 strings of 1-100 "
                                  "characters")
        if conversation_preferences is not None and not isinstance(conversation_preferences,
                                                                   dict):
            raise ValidationError("conversation_preferences must be an object")
        row = await self._db.fetch_one(SET_PROFILE, personality_traits=personality_traits,
                                       conversation_preferences=conversation_preferences)
        if row is None:
            raise NotFound("no user in this context", query=SET_PROFILE.name)
        return row

    async def usage(self) -> Usage | None:
        """The tier's limits and the context user's usage in this organization."""
        return await self._db.fetch_one(USAGE)

    # -- models ---------------------------------------------------------------------------
    async def create(self, kind: str, *, provider: str, storage_uri: str, name: str = "",
                     status: str = "uploading", quality_metrics: dict[str, Any] | None = None,
                     training_params: dict[str, Any] | None = None) -> Model:
        """A new model of the context user. ``storage_uri`` points at the artifact
        (``s3://…``); raises ``LimitExceeded`` past the tier's model limit."""
        if not isinstance(storage_uri, str) or not _URI.fullmatch(storage_uri) \
                or len(storage_uri) > 2000:
            raise ValidationError("storage_uri must be a URI (scheme://…), not the model data")
        row = await self._db.fetch_one(
            CREATE, kind=check_choice(kind, KINDS, "model kind"), name=name, provider=provider,
            storage_uri=storage_uri, status=check_choice(status, STATUSES, "model status"),
            quality_metrics=quality_metrics, training_params=training_params)
        if row is None:  # an INSERT … VALUES returns its row or raises
            raise NotFound("model not created", query=CREATE.name)
        return row

    async def get(self, model_id: uuid.UUID) -> Model | None:
        return await self._db.fetch_one(GET, id=model_id)

    async def list(self, *, kind: str | None = None, limit: int = 100) -> builtins.list[Model]:
        """The context user's live models, newest first."""
        if kind is not None:
            check_choice(kind, KINDS, "model kind")
        return await self._db.fetch_many(LIST, kind=kind, limit=check_limit(limit))

    async def active(self, kind: str) -> Model | None:
        """The active model of ``kind``, if any."""
        return await self._db.fetch_one(ACTIVE, kind=check_choice(kind, KINDS, "model kind"))

    async def set_status(self, model_id: uuid.UUID, status: str, *,
                         quality_metrics: dict[str, Any] | None = None,
                         error: str | None = None) -> Model:
        """Move along uploading → training → ready | failed (ready/failed → training to
        retrain); an illegal move raises ``ValidationError``."""
        row = await self._db.fetch_one(
            SET_STATUS, id=model_id, status=check_choice(status, STATUSES, "model status"),
            quality_metrics=quality_metrics, error=error)
        if row is None:
            raise NotFound("model not found", query=SET_STATUS.name)
        return row

    async def activate(self, model_id: uuid.UUID) -> Model:
        """Make a ready model the active one of its kind; the previous one is deactivated in
        the same call. ``NotFound`` when it is not yours, not ready or deleted."""
        row = await self._db.fetch_one(ACTIVATE, id=model_id)
        if row is None:
            raise NotFound("model not found, not ready or deleted", query=ACTIVATE.name)
        return row

    async def deactivate(self, model_id: uuid.UUID) -> Model | None:
        """Leave no active model of its kind; None when it was not active."""
        return await self._db.fetch_one(DEACTIVATE, id=model_id)

    async def delete(self, model_id: uuid.UUID) -> Model:
        """Soft delete (it stops being active); :meth:`restore` undoes it."""
        row = await self._db.fetch_one(SOFT_DELETE, id=model_id)
        if row is None:
            raise NotFound("model not found or already deleted", query=SOFT_DELETE.name)
        return row

    async def restore(self, model_id: uuid.UUID) -> Model:
        """Undelete; counts against the model limit again (``LimitExceeded``)."""
        row = await self._db.fetch_one(RESTORE, id=model_id)
        if row is None:
            raise NotFound("model not found or not deleted", query=RESTORE.name)
        return row

    async def hard_delete(self, model_id: uuid.UUID) -> bool:
        """Remove the row for good; True when there was one."""
        return await self._db.execrows("models.hard_delete", id=model_id) == 1
