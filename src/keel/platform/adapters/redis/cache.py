from __future__ import annotations

import secrets

from redis.asyncio import Redis

# Memcache-style leases as three tiny atomic scripts: hand-written because no Redis client or
# caching library offers them. Fill: "set if I still hold the lease, then release it".
_FILL = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""


_LEASE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _lease_key(key: str) -> str:
    return key + ":lease"


class RedisCache:
    """Shared by every API process: an invalidation in one is seen by all."""

    def __init__(self, client: Redis) -> None:
        self._r = client
        self._fill = client.register_script(_FILL)
        self._release = client.register_script(_RELEASE)
        self._lease = client.register_script(_LEASE)

    async def get(self, key: str) -> bytes | None:
        value = await self._r.get(key)
        if value is None:
            return None
        return value if isinstance(value, bytes) else value.encode()

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._r.set(key, value, px=max(1, int(ttl * 1000)))

    async def delete(self, *keys: str) -> None:
        if keys:
            await self._r.delete(*keys, *(_lease_key(k) for k in keys))

    async def lease(self, key: str, ttl: float) -> str | None:
        token = secrets.token_hex(8)
        ok = await self._lease(keys=[key, _lease_key(key)], args=[token, max(1, int(ttl * 1000))])
        return token if ok else None

    async def fill(self, key: str, value: bytes, ttl: float, token: str) -> bool:
        result = await self._fill(keys=[key, _lease_key(key)], args=[token, value, max(1, int(ttl * 1000))])
        return bool(result)

    async def release(self, key: str, token: str) -> None:
        await self._release(keys=[_lease_key(key)], args=[token])
