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


NAMESPACE = "keel:cache:"


class RedisCache:
    """Shared by every API process: an invalidation in one is seen by all.

    Every key lives under one namespace, so the in-process tier can ask Redis to report changes to
    cached keys only, not to rate-limit counters or idempotency records.
    """

    def __init__(self, client: Redis, namespace: str = NAMESPACE) -> None:
        self._r = client
        self._ns = namespace
        self._fill = client.register_script(_FILL)
        self._release = client.register_script(_RELEASE)
        self._lease = client.register_script(_LEASE)

    async def get(self, key: str) -> bytes | None:
        value = await self._r.get(self._ns + key)
        if value is None:
            return None
        return value if isinstance(value, bytes) else value.encode()

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._r.set(self._ns + key, value, px=_ms(ttl))

    async def delete(self, *keys: str) -> None:
        if keys:
            names = [self._ns + k for k in keys]
            await self._r.delete(*names, *(_lease_key(n) for n in names))

    async def lease(self, key: str, ttl: float) -> str | None:
        token = secrets.token_hex(8)
        name = self._ns + key
        ok = await self._lease(keys=[name, _lease_key(name)], args=[token, _ms(ttl)])
        return token if ok else None

    async def fill(self, key: str, value: bytes, ttl: float, token: str) -> bool:
        name = self._ns + key
        result = await self._fill(keys=[name, _lease_key(name)], args=[token, value, _ms(ttl)])
        return bool(result)

    async def release(self, key: str, token: str) -> None:
        await self._release(keys=[_lease_key(self._ns + key)], args=[token])


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
