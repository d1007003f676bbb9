"""The moving-window (sliding-log) rate limit in Redis, decided and reported in one round trip.

Hand-written rather than ``limits``' Redis strategy, whose semantics it keeps: ``limits`` needs two
round trips per request (``hit``, then ``get_window_stats`` for the RateLimit headers), and its stats
script binary-searches a list with ~20 LINDEX calls. On a cached read that was 37 % of the request's
time (measured with the load benchmark). One script over a sorted set of hit times does the same exact
log: expired hits are trimmed, the hit is admitted only while fewer than ``limit`` remain, and the
oldest remaining hit says when the window frees up. Atomic, so N API processes admit exactly the quota;
the time is Redis's own, so API hosts' clocks do not matter.
"""

from __future__ import annotations

import math
import os

from redis.asyncio import Redis

from keel.platform.ports.rate_limit import RateLimitDecision

_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
local allowed = 0
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  count = count + 1
  allowed = 1
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local reset = 0
if oldest[2] then
  reset = tonumber(oldest[2]) + window - now
end
return {allowed, limit - count, reset}
"""


class RedisRateLimiter:
    def __init__(self, client: Redis, prefix: str = "keel:ratelimit:") -> None:
        self._prefix = prefix
        self._hit = client.register_script(_HIT)

    async def hit(self, key: str, limit: int, window: int) -> RateLimitDecision:
        # The policy is part of the key, as in ``limits``: a changed quota (a tenant's own) starts a new count.
        member = os.urandom(8).hex()  # hits in the same millisecond must stay distinct entries
        allowed, remaining, reset_ms = await self._hit(
            keys=[f"{self._prefix}{key}:{limit}/{window}"], args=[limit, window * 1000, member]
        )
        return RateLimitDecision(
            allowed=bool(allowed),
            limit=limit,
            window=window,
            remaining=max(0, int(remaining)),
            reset_after=max(0, math.ceil(int(reset_ms) / 1000)),
        )
