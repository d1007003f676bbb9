"""Rate limiting on the ``limits`` library's moving (sliding-log) window, for the embedded default (one
process, in memory). With Redis, ``redis.rate_limiter.RedisRateLimiter`` keeps the same semantics in
one round trip."""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from keel.platform.ports.rate_limit import RateLimitDecision


class LimitsRateLimiter:
    def __init__(self, storage: Storage) -> None:
        self._limiter = MovingWindowRateLimiter(storage)

    @classmethod
    def in_memory(cls) -> LimitsRateLimiter:
        return cls(MemoryStorage())

    async def hit(self, key: str, limit: int, window: int) -> RateLimitDecision:
        item = RateLimitItemPerSecond(limit, window)
        allowed = await self._limiter.hit(item, key)
        stats = await self._limiter.get_window_stats(item, key)
        reset_after = max(0, math.ceil(stats.reset_time - time.time()))
        return RateLimitDecision(
            allowed=allowed, limit=limit, window=window, remaining=stats.remaining, reset_after=reset_after
        )
