"""The ``Cache`` port's contract, run against every adapter: the in-memory one (on a ManualClock) and Redis.

Both must agree on values, expiry, bulk deletes and, above all, leases: one holder at a time, a fill
accepted only from the current holder, and an invalidation that cancels a fill started before it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from keel.platform.adapters.memory.cache import InMemoryCache
from keel.platform.adapters.redis.cache import RedisCache
from keel.platform.adapters.redis.tracked_cache import TrackedRedisCache
from keel.platform.ports.cache import Cache
from tests.fakes.clock import ManualClock

SHORT = 0.1  # seconds: the TTL used for expiry checks (real time on Redis, so keep it small)
LONG = 60.0


@dataclass
class Subject:
    cache: Cache
    clock: ManualClock | None  # None: real time (Redis)

    async def pass_time(self, seconds: float) -> None:
        """Let ``seconds`` go by as the adapter sees time."""
        if self.clock is not None:
            self.clock.advance(seconds=seconds)
        else:
            await asyncio.sleep(seconds)


@pytest.fixture(params=["memory", "redis", "redis+local"])
def backend(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """The adapter's name and, for Redis ones, the URL of a freshly emptied Redis."""
    return request.param, None if request.param == "memory" else str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def subject(backend: tuple[str, str | None]) -> AsyncIterator[Subject]:
    name, url = backend
    if url is None:
        clock = ManualClock()
        yield Subject(InMemoryCache(clock), clock)
        return
    client = Redis.from_url(url)
    tracked: TrackedRedisCache | None = None
    try:
        if name == "redis+local":
            # With the in-process tier on and tracking up, every read below may be served locally.
            tracked = TrackedRedisCache(client, url)
            tracked.start()
            async with asyncio.timeout(5):
                await tracked.tracking.wait_ready()
            yield Subject(tracked, None)
        else:
            yield Subject(RedisCache(client), None)
    finally:
        if tracked is not None:
            await tracked.stop()
        await client.aclose()


def k(name: str = "k") -> str:
    return f"test:{name}:{uuid.uuid4().hex[:8]}"


# -- values ----------------------------------------------------------------------------------------


async def test_get_of_a_missing_key_is_none(subject: Subject) -> None:
    assert await subject.cache.get(k()) is None


async def test_set_then_get_round_trips_bytes_exactly(subject: Subject) -> None:
    key = k()
    value = bytes(range(256)) + b"\x00tail"
    await subject.cache.set(key, value, LONG)
    got = await subject.cache.get(key)
    assert got == value
    assert isinstance(got, bytes)


async def test_set_overwrites(subject: Subject) -> None:
    key = k()
    await subject.cache.set(key, b"one", LONG)
    await subject.cache.set(key, b"two", LONG)
    assert await subject.cache.get(key) == b"two"


async def test_delete_removes_the_value(subject: Subject) -> None:
    key = k()
    await subject.cache.set(key, b"v", LONG)
    await subject.cache.delete(key)
    assert await subject.cache.get(key) is None


async def test_delete_of_many_keys_at_once(subject: Subject) -> None:
    keys = [k(str(i)) for i in range(5)]
    kept = k("kept")
    for key in [*keys, kept]:
        await subject.cache.set(key, key.encode(), LONG)
    await subject.cache.delete(*keys[:3], k("never-set"))
    assert [await subject.cache.get(key) for key in keys] == [None, None, None, keys[3].encode(), keys[4].encode()]
    assert await subject.cache.get(kept) == kept.encode()


async def test_delete_of_nothing_and_of_missing_keys_is_harmless(subject: Subject) -> None:
    await subject.cache.delete()
    await subject.cache.delete(k(), k())


async def test_values_expire_after_their_ttl(subject: Subject) -> None:
    key, lasting = k(), k("lasting")
    await subject.cache.set(key, b"v", SHORT)
    await subject.cache.set(lasting, b"v", LONG)
    assert await subject.cache.get(key) == b"v"
    await subject.pass_time(SHORT + 0.05)
    assert await subject.cache.get(key) is None
    assert await subject.cache.get(lasting) == b"v"


async def test_set_again_renews_the_ttl(subject: Subject) -> None:
    key = k()
    await subject.cache.set(key, b"short", SHORT)
    await subject.cache.set(key, b"long", LONG)
    await subject.pass_time(SHORT + 0.05)
    assert await subject.cache.get(key) == b"long"


# -- leases ----------------------------------------------------------------------------------------


async def test_a_lease_is_exclusive_while_held(subject: Subject) -> None:
    key = k()
    token = await subject.cache.lease(key, LONG)
    assert token
    assert await subject.cache.lease(key, LONG) is None
    assert await subject.cache.lease(key, LONG) is None
    # Leases are per key.
    assert await subject.cache.lease(k("other"), LONG)


async def test_leasing_never_touches_the_value(subject: Subject) -> None:
    # Whether a lease on a key that has a value is granted is left open; either way the value stays.
    key = k()
    await subject.cache.set(key, b"v", LONG)
    await subject.cache.lease(key, LONG)
    assert await subject.cache.get(key) == b"v"


async def test_concurrent_lease_requests_have_exactly_one_winner(subject: Subject) -> None:
    key = k()
    tokens = await asyncio.gather(*(subject.cache.lease(key, LONG) for _ in range(50)))
    assert len([t for t in tokens if t is not None]) == 1


async def test_fill_with_the_current_token_stores_and_releases(subject: Subject) -> None:
    key = k()
    token = await subject.cache.lease(key, LONG)
    assert token is not None
    assert await subject.cache.fill(key, b"filled", SHORT, token) is True
    assert await subject.cache.get(key) == b"filled"
    # The token is spent: a second fill with it is refused ...
    assert await subject.cache.fill(key, b"stale", SHORT, token) is False
    assert await subject.cache.get(key) == b"filled"
    # ... and the lease was released, not left to run out: once the value is gone, the key can be leased.
    await subject.pass_time(SHORT + 0.05)
    again = await subject.cache.lease(key, LONG)
    assert again is not None
    assert again != token


async def test_fill_uses_its_ttl(subject: Subject) -> None:
    key = k()
    token = await subject.cache.lease(key, LONG)
    assert token is not None
    assert await subject.cache.fill(key, b"v", SHORT, token)
    await subject.pass_time(SHORT + 0.05)
    assert await subject.cache.get(key) is None


async def test_fill_with_a_wrong_token_is_refused_and_keeps_the_lease(subject: Subject) -> None:
    key = k()
    token = await subject.cache.lease(key, LONG)
    assert token is not None
    assert await subject.cache.fill(key, b"intruder", LONG, "not-the-token") is False
    assert await subject.cache.get(key) is None
    assert await subject.cache.lease(key, LONG) is None  # still held by the real holder
    assert await subject.cache.fill(key, b"holder", LONG, token) is True
    assert await subject.cache.get(key) == b"holder"


async def test_fill_without_any_lease_is_refused(subject: Subject) -> None:
    key = k()
    assert await subject.cache.fill(key, b"v", LONG, "made-up") is False
    assert await subject.cache.get(key) is None


async def test_invalidation_removes_value_and_lease_so_an_older_fill_is_refused(subject: Subject) -> None:
    key = k()
    await subject.cache.set(key, b"old", LONG)
    await subject.cache.delete(key)
    # A reader misses and starts recomputing ...
    token = await subject.cache.lease(key, LONG)
    assert token is not None
    # ... the data changes and is invalidated before the reader's fill lands.
    await subject.cache.delete(key)
    assert await subject.cache.get(key) is None
    assert await subject.cache.fill(key, b"stale", LONG, token) is False
    assert await subject.cache.get(key) is None
    # The lease went with the invalidation: the next reader can recompute at once.
    fresh = await subject.cache.lease(key, LONG)
    assert fresh is not None
    assert await subject.cache.fill(key, b"fresh", LONG, fresh) is True
    assert await subject.cache.get(key) == b"fresh"


async def test_bulk_invalidation_removes_every_lease(subject: Subject) -> None:
    keys = [k(str(i)) for i in range(3)]
    tokens = [await subject.cache.lease(key, LONG) for key in keys]
    await subject.cache.delete(*keys)
    for key, token in zip(keys, tokens, strict=True):
        assert token is not None
        assert await subject.cache.fill(key, b"stale", LONG, token) is False
        assert await subject.cache.lease(key, LONG) is not None


async def test_release_with_the_holders_token_frees_the_lease_and_keeps_the_value(subject: Subject) -> None:
    key = k()
    await subject.cache.set(key, b"v", LONG)
    await subject.cache.delete(key)
    token = await subject.cache.lease(key, LONG)
    assert token is not None
    await subject.cache.release(key, token)
    assert await subject.cache.get(key) is None  # nothing stored
    again = await subject.cache.lease(key, LONG)
    assert again is not None
    assert await subject.cache.fill(key, b"v2", LONG, again) is True
    # Releasing a spent token changes nothing, and never touches the value.
    await subject.cache.release(key, again)
    assert await subject.cache.get(key) == b"v2"


async def test_release_with_another_token_keeps_the_lease(subject: Subject) -> None:
    key = k()
    token = await subject.cache.lease(key, LONG)
    assert token is not None
    await subject.cache.release(key, "not-the-token")
    assert await subject.cache.lease(key, LONG) is None
    assert await subject.cache.fill(key, b"v", LONG, token) is True


async def test_a_stale_release_does_not_free_the_next_holders_lease(subject: Subject) -> None:
    key = k()
    old = await subject.cache.lease(key, LONG)
    assert old is not None
    await subject.cache.delete(key)  # invalidated while the old holder was loading
    new = await subject.cache.lease(key, LONG)
    assert new is not None
    await subject.cache.release(key, old)  # the old holder found nothing and hands back "its" lease
    assert await subject.cache.lease(key, LONG) is None  # the new holder still holds it
    assert await subject.cache.fill(key, b"fresh", LONG, new) is True


async def test_release_without_a_lease_is_harmless(subject: Subject) -> None:
    await subject.cache.release(k(), "made-up")


async def test_an_expired_lease_lets_another_caller_lease(subject: Subject) -> None:
    key = k()
    crashed = await subject.cache.lease(key, SHORT)
    assert crashed is not None
    assert await subject.cache.lease(key, LONG) is None
    await subject.pass_time(SHORT + 0.05)
    taker = await subject.cache.lease(key, LONG)
    assert taker is not None
    assert taker != crashed
    # The crashed holder's late fill must not land over the new holder's.
    assert await subject.cache.fill(key, b"late", LONG, crashed) is False
    assert await subject.cache.fill(key, b"new", LONG, taker) is True
    assert await subject.cache.get(key) == b"new"


async def test_an_expired_lease_alone_cannot_fill(subject: Subject) -> None:
    key = k()
    token = await subject.cache.lease(key, SHORT)
    assert token is not None
    await subject.pass_time(SHORT + 0.05)
    assert await subject.cache.fill(key, b"late", LONG, token) is False
    assert await subject.cache.get(key) is None


# -- adapter specifics -----------------------------------------------------------------------------------


async def test_the_in_memory_cache_is_bounded_dropping_expired_then_oldest_entries() -> None:
    clock = ManualClock()
    cache = InMemoryCache(clock, max_entries=3)
    await cache.set("a", b"a", LONG)
    await cache.set("short", b"s", SHORT)
    await cache.set("b", b"b", LONG)
    await cache.set("b", b"b2", LONG)  # overwriting an existing key never evicts
    assert [await cache.get(x) for x in ("a", "short", "b")] == [b"a", b"s", b"b2"]

    clock.advance(seconds=SHORT + 0.05)
    await cache.set("c", b"c", LONG)  # full: the expired entry goes first
    assert [await cache.get(x) for x in ("a", "b", "c")] == [b"a", b"b2", b"c"]

    await cache.set("d", b"d", LONG)  # full, nothing expired: the oldest goes
    assert [await cache.get(x) for x in ("a", "b", "c", "d")] == [None, b"b2", b"c", b"d"]
