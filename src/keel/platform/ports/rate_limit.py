from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    allowed: bool
    limit: int
    window: int  # seconds
    remaining: int
    reset_after: int  # seconds until a request would be admitted again (when denied) / the window frees up


class RateLimiter(Protocol):
    """Counts one request against ``limit`` per ``window`` seconds for ``key``, atomically across processes."""

    async def hit(self, key: str, limit: int, window: int) -> RateLimitDecision: ...
