"""Idempotency keys in Redis hashes. The scripts are hand-written: no library implements the
draft's semantics, and each step must be atomic across API processes."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from redis.asyncio import Redis

from keel.platform.ports.idempotency import IdempotencyRecord, StoredResponse

# Expiry is decided against the caller's clock (ARGV), not Redis's, so retention is testable;
# the Redis TTL only reclaims memory a little after that.
_CLAIM = """
local exp = redis.call('HGET', KEYS[1], 'exp')
if exp and tonumber(exp) > tonumber(ARGV[2]) then
  return redis.call('HMGET', KEYS[1], 'fp', 'exp', 'resp')
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'exp', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return false
"""
_COMPLETE = """
if redis.call('HGET', KEYS[1], 'fp') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'resp') == 0 then
  redis.call('HSET', KEYS[1], 'resp', ARGV[2], 'exp', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('HGET', KEYS[1], 'fp') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'resp') == 0 then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_SLACK_MS = 60_000


def _ms_until(when: datetime, now: datetime) -> int:
    return max(1, int((when - now).total_seconds() * 1000)) + _SLACK_MS


class RedisIdempotencyStore:
    def __init__(self, client: Redis, prefix: str = "keel:idem:") -> None:
        self._r = client
        self._prefix = prefix
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    async def claim(self, key: str, fingerprint: str, now: datetime, hold_until: datetime) -> IdempotencyRecord | None:
        found = await self._claim(
            keys=[self._prefix + key],
            args=[fingerprint, now.timestamp(), hold_until.timestamp(), _ms_until(hold_until, now)],
        )
        if not found:
            return None
        fp, exp, resp = found
        response = msgspec.msgpack.decode(resp, type=StoredResponse) if resp else None
        return IdempotencyRecord(
            fingerprint=fp.decode() if isinstance(fp, bytes) else str(fp),
            expires_at=datetime.fromtimestamp(float(exp), UTC),
            response=response,
        )

    async def complete(self, key: str, fingerprint: str, response: StoredResponse, expires_at: datetime) -> None:
        now = datetime.now(UTC)
        await self._complete(
            keys=[self._prefix + key],
            args=[fingerprint, msgspec.msgpack.encode(response), expires_at.timestamp(), _ms_until(expires_at, now)],
        )

    async def release(self, key: str, fingerprint: str) -> None:
        await self._release(keys=[self._prefix + key], args=[fingerprint])
