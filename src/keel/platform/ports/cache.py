from __future__ import annotations

from typing import Protocol


class Cache(Protocol):
    """A shared key-value cache with leases, so a recompute cannot overwrite a newer invalidation.

    A lease is taken by the one caller that will recompute a missing key; ``delete`` (invalidation)
    removes the value *and* any lease, so a fill that started before the invalidation is refused.
    """

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl: float) -> None: ...

    async def delete(self, *keys: str) -> None: ...

    async def lease(self, key: str, ttl: float) -> str | None:
        """A token when this caller now holds the key's lease; None when someone else does, or when
        the key already holds a value (it was filled since the caller's miss)."""
        ...

    async def fill(self, key: str, value: bytes, ttl: float, token: str) -> bool:
        """Store ``value`` only if ``token`` still holds the lease; release it either way."""
        ...

    async def release(self, key: str, token: str) -> None:
        """Give the lease back without storing anything (only if ``token`` still holds it)."""
        ...
