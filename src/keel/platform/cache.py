"""Read-through caching on top of the ``Cache`` port: stampede protection, invalidation that wins,
TTL jitter, and fail-open reads when the cache is down."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from keel.platform.ports.cache import Cache

T = TypeVar("T")

_LEASE_TTL = 5.0  # a crashed loader's lease lapses after this
_MAX_WAIT = 1.0  # waiters give up and read the source themselves after this
_OPEN_FOR = 1.0  # after a cache error, skip the cache this long instead of paying a timeout per request


class CacheStats:
    """Counters an operator can read (and tests assert on)."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.errors = 0


class ReadThroughCache:
    def __init__(
        self,
        cache: Cache,
        *,
        jitter: float = 0.1,
        on_error: Callable[[str, Exception], None] | None = None,
        enabled: bool = True,
    ):
        self._cache = cache
        self._enabled = enabled
        self._jitter = jitter
        self._open_until = 0.0
        self._on_error = on_error
        self._encoder = msgspec.msgpack.Encoder()
        self.stats = CacheStats()

    def _ttl(self, ttl: float) -> float:
        # Jitter spreads expiries of keys filled together, so they do not all miss at once.
        return ttl * random.uniform(1 - self._jitter, 1 + self._jitter)

    def _failed(self, op: str, exc: Exception) -> None:
        self.stats.errors += 1
        self._open_until = time.monotonic() + _OPEN_FOR
        if self._on_error is not None:
            self._on_error(op, exc)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._open_until

    async def _guard(self, op: str, call: Awaitable[Any], default: Any) -> Any:
        try:
            return await call
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: any failure means "go to the source"
            self._failed(op, exc)
            return default

    async def _read(self, key: str, type_: type[T]) -> T | None:
        raw = await self._guard("get", self._cache.get(key), None)
        if raw is None:
            return None
        try:
            value = msgspec.msgpack.decode(raw, type=type_)
        except msgspec.DecodeError as exc:
            # An entry of another shape (a deploy that forgot to bump a key's schema): drop it.
            self._failed("decode", exc)
            await self._guard("delete", self._cache.delete(key), None)
            return None
        self.stats.hits += 1
        return value

    async def get_or_load(
        self, key: str, type_: type[T], loader: Callable[[], Awaitable[T | None]], ttl: float
    ) -> T | None:
        """The cached value of ``key``, else ``loader()`` (cached unless None).

        Many concurrent misses on one key make one loader call: the caller holding the lease loads,
        the others wait for its fill.
        """
        if not self._enabled or not self.available:
            return await loader()
        hit = await self._read(key, type_)
        if hit is not None:
            return hit
        self.stats.misses += 1
        if not self.available:
            return await loader()
        # A lease is only granted while the key holds no value, so a caller whose miss crossed
        # another caller's fill waits and reads that fill instead of loading again.
        token = await self._guard("lease", self._cache.lease(key, _LEASE_TTL), None)
        if token is None and self.available:
            # Someone else is loading: wait for their fill, or for their lease to go (they found
            # nothing, or died), in which case this caller takes over.
            deadline = time.monotonic() + _MAX_WAIT
            delay = 0.002
            while token is None and self.available and time.monotonic() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.025)
                hit = await self._read(key, type_)
                if hit is not None:
                    return hit
                token = await self._guard("lease", self._cache.lease(key, _LEASE_TTL), None)
        self.stats.loads += 1
        try:
            value = await loader()
        except BaseException:
            if token is not None:
                await self._guard("release", self._cache.release(key, token), None)
            raise
        if token is not None:
            if value is not None:
                await self._guard(
                    "fill", self._cache.fill(key, self._encoder.encode(value), self._ttl(ttl), token), False
                )
            else:
                # Nothing to cache (absent values are not cached): hand the lease back at once.
                await self._guard("release", self._cache.release(key, token), None)
        return value

    async def invalidate(self, *keys: str) -> None:
        """Delete ``keys`` (and their leases). Raises if the cache is unreachable, so the caller
        (the outbox relay) retries later instead of forgetting the invalidation."""
        if keys:
            await self._cache.delete(*keys)
