from __future__ import annotations

import secrets

from keel.platform.ports.clock import Clock


class InMemoryCache:
    """Process-local cache for the embedded default (one process: nothing to share)."""

    def __init__(self, clock: Clock, max_entries: int = 100_000) -> None:
        self._clock = clock
        self._values: dict[str, tuple[bytes, float]] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._max = max_entries

    def _now(self) -> float:
        return self._clock.now().timestamp()

    async def get(self, key: str) -> bytes | None:
        item = self._values.get(key)
        if item is None:
            return None
        value, expires = item
        if expires <= self._now():
            del self._values[key]
            return None
        return value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if len(self._values) >= self._max and key not in self._values:
            self._evict()
        self._values[key] = (value, self._now() + ttl)

    def _evict(self) -> None:
        now = self._now()
        for k in [k for k, (_, exp) in self._values.items() if exp <= now]:
            del self._values[k]
        while len(self._values) >= self._max:
            # Dicts keep insertion order: drop the oldest entry.
            del self._values[next(iter(self._values))]

    async def delete(self, *keys: str) -> None:
        for key in keys:
            self._values.pop(key, None)
            self._leases.pop(key, None)

    async def lease(self, key: str, ttl: float) -> str | None:
        if await self.get(key) is not None:
            return None
        held = self._leases.get(key)
        if held is not None and held[1] > self._now():
            return None
        token = secrets.token_hex(8)
        self._leases[key] = (token, self._now() + ttl)
        return token

    async def fill(self, key: str, value: bytes, ttl: float, token: str) -> bool:
        held = self._leases.get(key)
        if held is None or held[0] != token or held[1] <= self._now():
            return False
        del self._leases[key]
        await self.set(key, value, ttl)
        return True

    async def release(self, key: str, token: str) -> None:
        held = self._leases.get(key)
        if held is not None and held[0] == token:
            del self._leases[key]
