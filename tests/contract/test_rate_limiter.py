"""One contract for every RateLimiter adapter: the in-process default and Redis (shared by API processes)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from keel.platform.adapters.limits_rate_limiter import LimitsRateLimiter
from keel.platform.adapters.redis.rate_limiter import RedisRateLimiter
from keel.platform.ports.rate_limit import RateLimiter


def on_redis(url: str) -> RedisRateLimiter:
    # As the container builds it: the shared client, with its short timeouts.
    return RedisRateLimiter(Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5))


@pytest.fixture(params=["memory", "redis"])
def limiter(request: pytest.FixtureRequest) -> RateLimiter:
    if request.param == "memory":
        return LimitsRateLimiter.in_memory()
    return on_redis(str(request.getfixturevalue("redis_url")))


def fresh_key() -> str:
    return f"k:{uuid.uuid4().hex}"


async def test_admits_exactly_the_limit_then_denies(limiter: RateLimiter) -> None:
    key = fresh_key()
    decisions = [await limiter.hit(key, 5, 60) for _ in range(8)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert all(d.limit == 5 and d.window == 60 for d in decisions)


async def test_remaining_counts_down_to_zero(limiter: RateLimiter) -> None:
    key = fresh_key()
    remaining = [(await limiter.hit(key, 4, 60)).remaining for _ in range(6)]
    assert remaining == [3, 2, 1, 0, 0, 0]


async def test_reset_after_is_within_the_window(limiter: RateLimiter) -> None:
    key = fresh_key()
    first = await limiter.hit(key, 2, 30)
    assert first.allowed
    assert 0 <= first.reset_after <= 30
    await limiter.hit(key, 2, 30)
    denied = await limiter.hit(key, 2, 30)
    assert not denied.allowed
    # The oldest hit in the window leaves it in (almost) a full window from now.
    assert 0 < denied.reset_after <= 30
    assert denied.reset_after >= 28


async def test_keys_are_independent(limiter: RateLimiter) -> None:
    a, b = fresh_key(), fresh_key()
    for _ in range(3):
        assert (await limiter.hit(a, 3, 60)).allowed
    assert not (await limiter.hit(a, 3, 60)).allowed
    other = await limiter.hit(b, 3, 60)
    assert other.allowed
    assert other.remaining == 2


async def test_different_windows_for_one_key_do_not_share_a_count(limiter: RateLimiter) -> None:
    key = fresh_key()
    assert (await limiter.hit(key, 1, 60)).allowed
    assert not (await limiter.hit(key, 1, 60)).allowed
    assert (await limiter.hit(key, 1, 3600)).allowed


async def test_a_short_window_frees_up_again(limiter: RateLimiter) -> None:
    key = fresh_key()
    assert (await limiter.hit(key, 2, 1)).allowed
    assert (await limiter.hit(key, 2, 1)).allowed
    denied = await limiter.hit(key, 2, 1)
    assert not denied.allowed
    assert denied.reset_after == 1
    await asyncio.sleep(1.1)
    again = await limiter.hit(key, 2, 1)
    assert again.allowed


async def test_concurrent_hits_admit_exactly_the_limit(limiter: RateLimiter) -> None:
    key = fresh_key()
    decisions = await asyncio.gather(*(limiter.hit(key, 20, 60) for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 20
    assert all(d.remaining >= 0 for d in decisions)


async def test_two_redis_limiters_share_one_count(redis_url: str) -> None:
    """Two API processes, each with its own connection pool, still admit exactly the quota together."""
    one, two = on_redis(redis_url), on_redis(redis_url)
    key = fresh_key()
    decisions = await asyncio.gather(*(lim.hit(key, 15, 60) for _ in range(20) for lim in (one, two)))
    assert sum(d.allowed for d in decisions) == 15


async def test_redis_unreachable_raises_quickly() -> None:
    """The middleware fails open on an exception; the adapter must raise one rather than hang."""
    from tests.support.servers import free_port

    limiter = on_redis(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(Exception):  # noqa: B017, PT011 - any error: the middleware catches them all
        await asyncio.wait_for(limiter.hit(fresh_key(), 5, 60), timeout=5)
