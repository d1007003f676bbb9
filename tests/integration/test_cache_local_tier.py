"""The in-process tier of the Redis cache (``TrackedRedisCache``) against a real Redis.

Each "process" is a tier with its own Redis client and tracking connection. The promise under test is
that the tier is never stale: a change made anywhere is seen by the very next read everywhere, with no
sleep in between, while repeated reads are served from process memory.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import uvloop
from redis.asyncio import Redis

from keel.platform.adapters.redis.cache import NAMESPACE, RedisCache
from keel.platform.adapters.redis.tracked_cache import TrackedRedisCache
from tests.support.waiting import eventually

TTL = 60.0


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async def probe() -> bool:
        return condition()

    await eventually(probe, within=within, interval=0.002)


def k(name: str = "k") -> str:
    return f"test:{name}:{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def tiers(url: str, n: int = 2, **options: Any) -> AsyncIterator[list[TrackedRedisCache]]:
    async with AsyncExitStack() as stack:
        made = []
        for _ in range(n):
            client = Redis.from_url(url)
            stack.push_async_callback(client.aclose)
            tier = TrackedRedisCache(client, url, **options)
            tier.start()
            stack.push_async_callback(tier.stop)
            async with asyncio.timeout(5):
                await tier.tracking.wait_ready()
            made.append(tier)
        yield made


async def cached_locally(tier: TrackedRedisCache, key: str) -> bytes | None:
    """Read until the value is served from process memory; returns it."""
    for _ in range(10):  # a read racing an invalidation (of its own write, say) is not kept
        before = tier.local_hits
        value = await tier.get(key)
        if tier.local_hits > before:
            return value
    raise AssertionError("the in-process tier never served the key")


async def test_repeated_reads_are_served_from_process_memory(redis_url: str) -> None:
    async with tiers(redis_url, 1) as (tier,):
        key = k()
        await tier.set(key, b"v1", TTL)
        assert await tier.get(key) == b"v1"
        hits = tier.local_hits
        for _ in range(10):
            assert await tier.get(key) == b"v1"
        assert tier.local_hits == hits + 10


async def test_a_change_anywhere_is_seen_by_the_very_next_read_everywhere(redis_url: str) -> None:
    async with tiers(redis_url, 2) as (one, two), Redis.from_url(redis_url) as plain_client:
        plain = RedisCache(plain_client)  # a process without the tier (a worker) writes too
        key = k()
        for i in range(100):
            writer = (one, plain)[i % 2]
            await writer.set(key, b"old%d" % i, TTL)
            assert await cached_locally(two, key) == b"old%d" % i
            if i % 3 == 0:
                await writer.delete(key)
                assert await two.get(key) is None
            else:
                await writer.set(key, b"new%d" % i, TTL)
                assert await two.get(key) == b"new%d" % i


async def test_a_process_reads_its_own_writes_at_once(redis_url: str) -> None:
    async with tiers(redis_url, 1) as (tier,):
        key = k()
        for i in range(50):
            await tier.set(key, b"%d" % i, TTL)
            assert await cached_locally(tier, key) == b"%d" % i
        await tier.delete(key)
        assert await tier.get(key) is None
        token = await tier.lease(key, 5)
        assert token is not None
        assert await tier.fill(key, b"filled", TTL, token)
        assert await tier.get(key) == b"filled"


async def test_a_read_overtaken_by_an_invalidation_is_not_kept(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis runs the read, then a write from elsewhere; the write's invalidation reaches this process
    before the read's reply. The old value it then receives must be returned but not kept."""
    async with tiers(redis_url, 1) as (tier,), Redis.from_url(redis_url) as other:
        key = k()
        await tier.set(key, b"old", TTL)
        real_pipeline: Callable[..., Any] = tier._r.pipeline

        def overtaken(*args: Any, **kwargs: Any) -> Any:
            pipe = real_pipeline(*args, **kwargs)
            execute = pipe.execute

            async def execute_then_change() -> Any:
                result = await execute()
                heard = tier._seq
                await other.set(NAMESPACE + key, b"new")
                await until(lambda: tier._seq > heard)
                return result

            pipe.execute = execute_then_change
            return pipe

        monkeypatch.setattr(tier._r, "pipeline", overtaken)
        assert await tier.get(key) == b"old"  # what Redis answered at the time
        monkeypatch.undo()
        hits = tier.local_hits
        assert await tier.get(key) == b"new"
        assert tier.local_hits == hits  # the old value was never kept


async def test_losing_tracking_turns_the_tier_off_and_it_comes_back_empty(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tiers(redis_url, 1) as (tier,), Redis.from_url(redis_url) as admin:
        key = k()
        await tier.set(key, b"before", TTL)
        await cached_locally(tier, key)

        async def refused() -> Any:
            raise ConnectionError("redis unreachable")

        monkeypatch.setattr(tier.tracking, "_connect", refused)  # keep it down until the test says
        await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        await until(lambda: not tier.tracking.ready)
        # Nothing is heard while tracking is down: a change now must not be hidden by the tier.
        await admin.set(NAMESPACE + key, b"while-down")
        hits = tier.local_hits
        for _ in range(3):
            assert await tier.get(key) == b"while-down"
        assert tier.local_hits == hits

        monkeypatch.undo()
        async with asyncio.timeout(10):
            await tier.tracking.wait_ready()
        assert await cached_locally(tier, key) == b"while-down"
        await admin.set(NAMESPACE + key, b"after")
        assert await tier.get(key) == b"after"


async def test_a_flush_of_redis_empties_the_tier(redis_url: str) -> None:
    async with tiers(redis_url, 1) as (tier,), Redis.from_url(redis_url) as admin:
        key = k()
        await tier.set(key, b"v", TTL)
        await cached_locally(tier, key)
        await admin.flushdb()
        assert await tier.get(key) is None


async def test_entries_lapse_with_the_keys_ttl_in_redis(redis_url: str) -> None:
    async with tiers(redis_url, 1) as (tier,):
        key = k()
        await tier.set(key, b"v", 0.2)
        await cached_locally(tier, key)
        await asyncio.sleep(0.3)  # past the TTL
        assert await tier.get(key) is None


async def test_memory_is_bounded(redis_url: str) -> None:
    async with tiers(redis_url, 1, max_bytes=1000, max_entry_bytes=400) as (tier,):
        big, keys = k("big"), [k(f"e{i}") for i in range(5)]
        await tier.set(big, b"x" * 401, TTL)
        for _ in range(3):
            assert await tier.get(big) == b"x" * 401
        assert big not in tier._entries  # too large to keep: always read from Redis

        for key in keys:
            await tier.set(key, b"y" * 300, TTL)
            await cached_locally(tier, key)
        assert tier._bytes <= 1000
        assert set(tier._entries) == set(keys[-3:])  # the oldest went first
        for key in keys:
            assert await tier.get(key) == b"y" * 300  # evicted ones are still in Redis


async def test_keys_outside_the_cache_namespace_are_not_reported(redis_url: str) -> None:
    async with tiers(redis_url, 1) as (tier,), Redis.from_url(redis_url) as admin:
        seq = tier._seq
        for i in range(20):
            await admin.set(f"keel:ratelimit:{i}", b"1")
        await admin.set(NAMESPACE + "marker", b"1")
        await until(lambda: tier._seq > seq)
        assert tier._seq == seq + 1  # only the cached key's change was heard


async def test_a_tier_never_started_reads_through_to_redis(redis_url: str) -> None:
    async with Redis.from_url(redis_url) as client:
        tier = TrackedRedisCache(client, redis_url)  # a worker's: start() is never called
        key = k()
        await tier.set(key, b"v", TTL)
        for _ in range(3):
            assert await tier.get(key) == b"v"
        assert tier.local_hits == 0


def test_the_tier_works_on_uvloop(redis_url: str) -> None:
    """granian runs the app on uvloop whenever it is installed, and uvloop's transports are not
    asyncio.Transport subclasses: the tracking connection must not depend on that."""

    async def scenario() -> None:
        async with tiers(redis_url, 2) as (one, two):
            key = k()
            await one.set(key, b"v1", TTL)
            assert await cached_locally(two, key) == b"v1"
            await one.set(key, b"v2", TTL)
            assert await two.get(key) == b"v2"  # the very next read, on the other "process"

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
