"""One contract for every RateLimiter adapter: the in-process default and Redis (shared by API processes)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from keel.platform.adapters.limits_rate_limiter import LimitsRateLimiter
from keel.platform.adapters.redis.rate_limiter import LEASE_SECONDS, RedisRateLimiter, batch_size
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


async def test_a_large_quota_is_exact_for_one_process_too(limiter: RateLimiter) -> None:
    """Quotas large enough for Redis to hand out hits in batches still count down one by one."""
    key = fresh_key()
    decisions = [await limiter.hit(key, 256, 60) for _ in range(260)]
    assert [d.allowed for d in decisions] == [True] * 256 + [False] * 4
    assert [d.remaining for d in decisions[:256]] == list(range(255, -1, -1))


# -- Redis: hits taken ahead in batches --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def logged(url: str, key: str, limit: int, window: int) -> int:
    with SyncRedis.from_url(url) as r:
        return int(r.zcard(f"keel:ratelimit:{key}:{limit}/{window}"))


async def test_a_large_quota_costs_one_round_trip_per_batch(redis_url: str) -> None:
    limiter, key = on_redis(redis_url), fresh_key()
    assert batch_size(6400) == 64
    assert (await limiter.hit(key, 6400, 60)).allowed
    assert logged(redis_url, key, 6400, 60) == 64  # one call logged a whole batch ...
    for _ in range(63):
        assert (await limiter.hit(key, 6400, 60)).allowed
    assert logged(redis_url, key, 6400, 60) == 64  # ... spent here without asking again
    await limiter.hit(key, 6400, 60)
    assert logged(redis_url, key, 6400, 60) == 128


async def test_small_quotas_are_never_batched(redis_url: str) -> None:
    limiter, key = on_redis(redis_url), fresh_key()
    assert batch_size(127) == 1
    await limiter.hit(key, 127, 60)
    assert logged(redis_url, key, 127, 60) == 1


async def test_an_unspent_batch_is_handed_back(redis_url: str) -> None:
    clock = Clock()
    limiter = RedisRateLimiter(Redis.from_url(redis_url), now=clock)
    key = fresh_key()
    await limiter.hit(key, 6400, 60)
    assert logged(redis_url, key, 6400, 60) == 64
    clock.t += LEASE_SECONDS + 0.1  # the batch lapses: 63 hits were never spent
    decision = await limiter.hit(key, 6400, 60)
    assert logged(redis_url, key, 6400, 60) == 1 + 64  # they left the log with the next call
    assert decision.remaining == 6400 - 2


async def test_near_the_limit_processes_share_the_quota_exactly(redis_url: str) -> None:
    """Batches stop once a key is half used: the last half is decided by Redis hit by hit, so many
    processes hitting one key never get more than the quota between them."""
    processes = [on_redis(redis_url) for _ in range(3)]
    key = fresh_key()

    async def client(process: RedisRateLimiter) -> int:
        return sum([(await process.hit(key, 512, 60)).allowed for _ in range(250)])

    admitted = sum(await asyncio.gather(*(client(p) for p in processes)))
    assert admitted <= 512
    # Batches still unspent in a process are the only shortfall: at most one per process.
    assert admitted >= 512 - 3 * batch_size(512)
    assert logged(redis_url, key, 512, 60) == 512
