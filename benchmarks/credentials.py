"""Credential scenario: ``credentials.decrypt``.

The candidate is ``db.credentials.decrypt`` in a writable tenant session: RLS, one statement
that reads the blob and appends the ``credential_access`` record, COMMIT, then AES-256-GCM
decryption and JSON parsing in-process. The baseline is raw asyncpg fetching the same row
(no context, no audit record, no decryption), so the ratio is the full price of an audited,
decrypted read. ``TENANTS`` organizations with ``PER_TENANT`` credentials each; operations
cycle through tenants.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from datalayer import Context

from .core import owned_org
from .harness import BenchContext, Scenario

__all__ = ["SCENARIOS"]

TENANTS = 31  # prime: cycling never lines up with the pool's 16 connections
PER_TENANT = 8

_RAW = ("SELECT org_id, id, type, secret, expires_at, is_valid FROM credentials "
        "WHERE org_id = $1 AND id = $2 AND deleted_at IS NULL")


@dataclass(frozen=True, slots=True)
class CredState:
    ctxs: tuple[Context, ...]
    creds: tuple[tuple[uuid.UUID, uuid.UUID], ...]  # (org, credential) per operation slot


async def _setup(bctx: BenchContext) -> CredState:
    cached: CredState | None = bctx.cache.get("credentials")
    if cached is not None:
        return cached
    dl = bctx.dl
    ctxs, creds = [], []
    for t in range(TENANTS):
        made = await owned_org(bctx, "credentials")
        org, ctx = made.org_id, made.ctx
        async with dl.session(ctx) as db:
            ids = [(await db.credentials.create(
                f"cred {i}", "oauth2",
                {"access_token": uuid.uuid4().hex * 4, "refresh_token": uuid.uuid4().hex,
                 "scopes": ["read", "write"]})).id for i in range(PER_TENANT)]
        ctxs.append(ctx)
        creds.append((org, ids[t % PER_TENANT]))
    async with dl.system() as db:
        await db.connection.execute("ANALYZE credentials; ANALYZE credential_access")
    state = CredState(tuple(ctxs), tuple(creds))
    bctx.cache["credentials"] = state
    return state


async def _decrypt(b: BenchContext, s: CredState, i: int) -> None:
    k = i % TENANTS
    async with b.dl.session(s.ctxs[k]) as db:
        out = await db.credentials.decrypt(s.creds[k][1])
    if "access_token" not in out.payload:
        raise RuntimeError("credentials.decrypt returned a wrong payload")


async def _decrypt_raw(b: BenchContext, s: CredState, i: int) -> None:
    org, cid = s.creds[i % TENANTS]
    async with b.pool.acquire() as conn:
        if await conn.fetchrow(_RAW, org, cid) is None:
            raise RuntimeError("raw fetch found nothing")


SCENARIOS: list[Scenario] = [
    Scenario("credentials.decrypt", _setup, _decrypt, _decrypt_raw,
             description="writable tenant session: blob + access record in one statement, "
                         "commit, AES-GCM decrypt; baseline: raw fetch of the row"),
]
