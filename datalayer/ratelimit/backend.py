"""What a rate-limit backend is: one atomic check per call, on the backend's own clock."""

from __future__ import annotations

from typing import Protocol

from datalayer.ratelimit.limits import Limit, Outcome

__all__ = ["Backend"]


class Backend(Protocol):
    """Memory, Redis or PostgreSQL. ``check`` is atomic per key: concurrent calls for one
    key are serialized by the backend (event loop, Lua script, row lock), never by the
    caller. Raises ``Unavailable`` or ``Timeout`` when the backend cannot answer within its
    timeout (the limiter then applies the limit's fail mode); anything else is a bug."""

    name: str

    async def check(self, key: str, limit: Limit, cost: int) -> Outcome:
        """Spend ``cost`` (1 .. ``limit.capacity``) from ``key``'s bucket if it holds that
        much; one round trip for remote backends."""
        ...

    async def close(self) -> None:
        """Release connections the backend opened itself."""
        ...
