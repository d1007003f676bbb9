"""ReadThroughCache: one loader per stampede, invalidations that beat in-flight loads, no cached absences,
TTL jitter, and fail-open reads behind a short circuit breaker when the cache is down."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from keel.platform import cache as cache_module
from keel.platform.adapters.memory.cache import InMemoryCache
from keel.platform.adapters.redis.cache import RedisCache
from keel.platform.cache import ReadThroughCache
from keel.platform.ports.cache import Cache
from tests.fakes.clock import ManualClock

TTL = 300.0


class Item(msgspec.Struct, frozen=True):
    name: str
    version: int


class Source:
    """The "database": a value that can change, a loader that counts its calls and can be held open."""

    def __init__(self, value: Item | None) -> None:
        self.value = value
        self.calls = 0
        self.started = asyncio.Event()
        self.gate: asyncio.Event | None = None  # when set, loads wait for it *after* reading the value

    def hold(self) -> asyncio.Event:
        self.gate = asyncio.Event()
        return self.gate

    async def load(self) -> Item | None:
        self.calls += 1
        read = self.value  # read first, as a query would: a change after this is not seen
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return read


class SpyCache:
    """Delegates to a real cache; records calls and can be switched "down" (every call raises)."""

    def __init__(self, inner: Cache) -> None:
        self.inner = inner
        self.down = False
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._called = asyncio.Event()

    async def _do(self, op: str, call: Callable[[], Awaitable[Any]], *args: Any) -> Any:
        self.calls.append((op, args))
        self._called.set()
        if self.down:
            raise ConnectionError(f"cache down during {op}")
        return await call()

    async def get(self, key: str) -> bytes | None:
        return await self._do("get", lambda: self.inner.get(key), key)  # type: ignore[no-any-return]

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._do("set", lambda: self.inner.set(key, value, ttl), key, ttl)

    async def delete(self, *keys: str) -> None:
        await self._do("delete", lambda: self.inner.delete(*keys), *keys)

    async def lease(self, key: str, ttl: float) -> str | None:
        return await self._do("lease", lambda: self.inner.lease(key, ttl), key)  # type: ignore[no-any-return]

    async def fill(self, key: str, value: bytes, ttl: float, token: str) -> bool:
        return await self._do("fill", lambda: self.inner.fill(key, value, ttl, token), key, ttl)  # type: ignore[no-any-return]

    async def release(self, key: str, token: str) -> None:
        await self._do("release", lambda: self.inner.release(key, token), key)

    def ops(self, op: str) -> list[tuple[Any, ...]]:
        return [args for name, args in self.calls if name == op]

    async def until_called(self, op: str, times: int) -> None:
        while len(self.ops(op)) < times:
            self._called.clear()
            await self._called.wait()


class FakeTime:
    """Stands in for the ``time`` module inside keel.platform.cache: real monotonic time plus a manual offset."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(cache_module, "time", fake)
    return fake


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "memory" else str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def store(backend: str | None) -> AsyncIterator[Cache]:
    """A real cache adapter: in-memory or Redis."""
    if backend is None:
        yield InMemoryCache(ManualClock())
        return
    client = Redis.from_url(backend)
    try:
        yield RedisCache(client)
    finally:
        await client.aclose()


def key() -> str:
    return f"test:rtc:{uuid.uuid4().hex[:8]}"


# -- stampede protection -----------------------------------------------------------------------------


async def test_a_hundred_concurrent_misses_make_one_load(store: Cache) -> None:
    rtc = ReadThroughCache(store)
    source = Source(Item("a", 1))
    gate = source.hold()
    k = key()

    readers = asyncio.gather(*(rtc.get_or_load(k, Item, source.load, TTL) for _ in range(100)))
    await asyncio.wait_for(source.started.wait(), 5)
    await asyncio.sleep(0.05)  # every reader has missed and is now waiting on the loader's lease
    gate.set()
    results = await asyncio.wait_for(readers, 5)

    assert source.calls == 1
    assert results == [Item("a", 1)] * 100
    assert rtc.stats.loads == 1
    assert rtc.stats.misses == 100
    assert rtc.stats.hits == 99
    assert rtc.stats.errors == 0
    # The value is now cached: later readers do not load.
    assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("a", 1)
    assert source.calls == 1
    assert rtc.stats.hits == 100


async def test_hits_decode_to_the_requested_type(store: Cache) -> None:
    rtc = ReadThroughCache(store)
    k = key()
    source = Source(Item("a", 1))
    first = await rtc.get_or_load(k, Item, source.load, TTL)
    second = await rtc.get_or_load(k, Item, source.load, TTL)
    assert first == second == Item("a", 1)
    assert isinstance(second, Item)
    assert source.calls == 1


# -- invalidation wins -------------------------------------------------------------------------------


async def test_an_invalidation_during_a_load_wins_over_the_stale_fill(store: Cache) -> None:
    rtc = ReadThroughCache(store)
    source = Source(Item("old", 1))
    gate = source.hold()
    k = key()

    reader = asyncio.create_task(rtc.get_or_load(k, Item, source.load, TTL))
    await asyncio.wait_for(source.started.wait(), 5)
    # The loader has read "old"; now the data changes and the change is invalidated.
    source.value = Item("new", 2)
    await rtc.invalidate(k)
    gate.set()
    assert await reader == Item("old", 1)  # what it read, but it must not be stored
    assert await store.get(k) is None

    source.gate = None
    assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("new", 2)
    assert source.calls == 2
    assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("new", 2)
    assert source.calls == 2


async def test_a_waiter_takes_over_after_an_invalidation_and_its_fresh_value_stays(store: Cache) -> None:
    """A slow stale loader and a fresh one overlap; whichever finishes last, the fresh value is what stays."""
    rtc = ReadThroughCache(store)
    k = key()
    stale_gate, stale_started = asyncio.Event(), asyncio.Event()
    loads: list[str] = []
    value = Item("old", 1)

    async def load() -> Item:
        read = value
        loads.append(read.name)
        stale_started.set()
        if read.name == "old":
            await stale_gate.wait()
        return read

    first = asyncio.create_task(rtc.get_or_load(k, Item, load, TTL))
    await asyncio.wait_for(stale_started.wait(), 5)
    second = asyncio.create_task(rtc.get_or_load(k, Item, load, TTL))  # waits on the first one's lease
    await asyncio.sleep(0.02)
    value = Item("new", 2)
    await rtc.invalidate(k)  # frees the lease: the waiter recomputes
    assert await asyncio.wait_for(second, 5) == Item("new", 2)
    stale_gate.set()
    assert await first == Item("old", 1)

    assert loads == ["old", "new"]
    assert msgspec.msgpack.decode(await store.get(k) or b"", type=Item) == Item("new", 2)
    assert await rtc.get_or_load(k, Item, load, TTL) == Item("new", 2)
    assert loads == ["old", "new"]


async def test_invalidate_removes_cached_values(store: Cache) -> None:
    rtc = ReadThroughCache(store)
    k1, k2 = key(), key()
    source = Source(Item("a", 1))
    await rtc.get_or_load(k1, Item, source.load, TTL)
    await rtc.get_or_load(k2, Item, source.load, TTL)
    source.value = Item("b", 2)
    await rtc.invalidate(k1, k2)
    assert await rtc.get_or_load(k1, Item, source.load, TTL) == Item("b", 2)
    assert await rtc.get_or_load(k2, Item, source.load, TTL) == Item("b", 2)
    assert source.calls == 4


# -- absences and loader failures ------------------------------------------------------------------


async def test_none_is_not_cached_and_the_lease_is_handed_back(store: Cache) -> None:
    rtc = ReadThroughCache(store)
    source = Source(None)
    k = key()
    for _ in range(3):
        started = time.monotonic()
        assert await rtc.get_or_load(k, Item, source.load, TTL) is None
        # Had the lease been kept, the next call would wait for it (up to a second).
        assert time.monotonic() - started < 0.5
    assert source.calls == 3
    assert await store.get(k) is None
    assert await store.lease(k, 5) is not None
    await store.delete(k)

    # Once the thing exists, it is loaded and cached.
    source.value = Item("late", 1)
    assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("late", 1)
    assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("late", 1)
    assert source.calls == 4


async def test_a_late_none_does_not_wipe_a_fresher_value(store: Cache) -> None:
    """A loader that found nothing, whose lease was taken away by an invalidation, hands back only its own
    lease: it must not delete the value a newer loader stored in the meantime."""
    rtc = ReadThroughCache(store)
    k = key()
    absent = Source(None)
    gate = absent.hold()
    first = asyncio.create_task(rtc.get_or_load(k, Item, absent.load, TTL))
    await asyncio.wait_for(absent.started.wait(), 5)
    await rtc.invalidate(k)  # the thing is created; its creation invalidates the key
    created = Source(Item("created", 1))
    assert await rtc.get_or_load(k, Item, created.load, TTL) == Item("created", 1)
    gate.set()
    assert await first is None
    assert await rtc.get_or_load(k, Item, created.load, TTL) == Item("created", 1)
    assert created.calls == 1  # still cached


async def test_a_failing_loader_propagates_and_releases_the_lease() -> None:
    store = InMemoryCache(ManualClock())
    rtc = ReadThroughCache(store)
    k = key()

    async def broken() -> Item:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError, match="database down"):
        await rtc.get_or_load(k, Item, broken, TTL)
    assert await store.lease(k, 5) is not None  # free again
    await store.delete(k)
    source = Source(Item("a", 1))
    assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("a", 1)
    assert await store.get(k) is not None


async def test_a_waiter_whose_loader_died_loads_by_itself_without_storing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "_MAX_WAIT", 0.1)
    store = InMemoryCache(ManualClock())
    rtc = ReadThroughCache(store)
    k = key()
    assert await store.lease(k, 60) is not None  # another process leased the key, then vanished
    source = Source(Item("a", 1))
    assert await asyncio.wait_for(rtc.get_or_load(k, Item, source.load, TTL), 2) == Item("a", 1)
    assert source.calls == 1
    assert await store.get(k) is None  # it held no lease, so it could not fill


async def test_a_waiter_that_gave_up_and_then_fails_to_load_just_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "_MAX_WAIT", 0.05)
    store = InMemoryCache(ManualClock())
    rtc = ReadThroughCache(store)
    k = key()
    other = await store.lease(k, 60)
    assert other is not None

    async def broken() -> Item:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError, match="database down"):
        await rtc.get_or_load(k, Item, broken, TTL)
    assert await store.lease(k, 60) is None  # it held no lease, so it released none: the other holder keeps it
    assert await store.fill(k, b"x", TTL, other) is True


# -- TTL jitter ------------------------------------------------------------------------------------


async def test_ttl_jitter_stays_within_ten_percent() -> None:
    spy = SpyCache(InMemoryCache(ManualClock()))
    rtc = ReadThroughCache(spy)
    source = Source(Item("a", 1))
    for _ in range(300):
        await rtc.get_or_load(key(), Item, source.load, 100.0)
    ttls = [args[1] for args in spy.ops("fill")]
    assert len(ttls) == 300
    assert all(90.0 <= t <= 110.0 for t in ttls), (min(ttls), max(ttls))
    assert len(set(ttls)) > 1  # really jittered
    assert min(ttls) < 97  # and spread over the band
    assert max(ttls) > 103


async def test_zero_jitter_keeps_the_exact_ttl() -> None:
    spy = SpyCache(InMemoryCache(ManualClock()))
    rtc = ReadThroughCache(spy, jitter=0.0)
    source = Source(Item("a", 1))
    for _ in range(5):
        await rtc.get_or_load(key(), Item, source.load, 42.0)
    assert [args[1] for args in spy.ops("fill")] == [42.0] * 5


# -- fail open ---------------------------------------------------------------------------------------


async def test_a_down_cache_falls_back_to_the_loader_and_opens_the_circuit(fake_time: FakeTime) -> None:
    spy = SpyCache(InMemoryCache(ManualClock()))
    spy.down = True
    errors: list[tuple[str, Exception]] = []
    rtc = ReadThroughCache(spy, on_error=lambda op, exc: errors.append((op, exc)))
    source = Source(Item("a", 1))
    k = key()

    assert rtc.available
    assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("a", 1)
    assert source.calls == 1
    assert rtc.stats.errors >= 1
    assert not rtc.available
    assert errors
    assert errors[0][0] == "get"
    assert isinstance(errors[0][1], ConnectionError)

    # While open, the cache is not even asked: no timeout paid per request.
    asked = len(spy.calls)
    errors_before = rtc.stats.errors
    for _ in range(5):
        assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("a", 1)
    assert len(spy.calls) == asked
    assert rtc.stats.errors == errors_before
    assert source.calls == 6

    # The circuit closes by itself after about a second; a healthy cache is used again.
    fake_time.offset += 0.9
    assert not rtc.available
    fake_time.offset += 0.2
    assert rtc.available
    spy.down = False
    assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("a", 1)
    assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("a", 1)
    assert source.calls == 7
    assert rtc.stats.hits == 1
    assert rtc.stats.errors == errors_before


async def test_a_cache_still_down_after_the_circuit_reopens_it(fake_time: FakeTime) -> None:
    spy = SpyCache(InMemoryCache(ManualClock()))
    spy.down = True
    rtc = ReadThroughCache(spy)
    source = Source(Item("a", 1))
    await rtc.get_or_load(key(), Item, source.load, TTL)
    first_errors = rtc.stats.errors
    fake_time.offset += 1.1
    assert rtc.available
    assert await rtc.get_or_load(key(), Item, source.load, TTL) == Item("a", 1)
    assert rtc.stats.errors > first_errors
    assert not rtc.available


async def test_a_failing_fill_still_returns_the_loaded_value(fake_time: FakeTime) -> None:
    class FillFails(SpyCache):
        async def fill(self, key: str, value: bytes, ttl: float, token: str) -> bool:
            raise ConnectionError("lost the connection")

    rtc = ReadThroughCache(FillFails(InMemoryCache(ManualClock())))
    source = Source(Item("a", 1))
    assert await rtc.get_or_load(key(), Item, source.load, TTL) == Item("a", 1)
    assert rtc.stats.errors == 1
    assert not rtc.available


async def test_the_circuit_closes_after_real_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "_OPEN_FOR", 0.2)
    spy = SpyCache(InMemoryCache(ManualClock()))
    spy.down = True
    rtc = ReadThroughCache(spy)
    source = Source(Item("a", 1))
    await rtc.get_or_load(key(), Item, source.load, TTL)
    assert not rtc.available
    await asyncio.sleep(0.25)
    assert rtc.available


async def test_invalidate_raises_when_the_cache_is_down_so_the_outbox_retries(fake_time: FakeTime) -> None:
    spy = SpyCache(InMemoryCache(ManualClock()))
    rtc = ReadThroughCache(spy)
    spy.down = True
    with pytest.raises(ConnectionError):
        await rtc.invalidate(key())
    # Even with the read circuit open, an invalidation is attempted, and fails loudly.
    await rtc.get_or_load(key(), Item, Source(Item("a", 1)).load, TTL)
    assert not rtc.available
    with pytest.raises(ConnectionError):
        await rtc.invalidate(key(), key())
    spy.down = False
    await rtc.invalidate(key())  # and succeeds once the cache is back


async def test_invalidate_of_no_keys_does_not_touch_the_cache() -> None:
    spy = SpyCache(InMemoryCache(ManualClock()))
    spy.down = True
    await ReadThroughCache(spy).invalidate()
    assert spy.calls == []


class SlowReplies(SpyCache):
    """A cache reached over a network: a ``get`` reads the value, then its reply may be held up in transit."""

    def __init__(self, inner: Cache) -> None:
        super().__init__(inner)
        self.hold_replies: asyncio.Event | None = None
        self.reply_held = asyncio.Event()

    async def get(self, key: str) -> bytes | None:
        value = await super().get(key)
        if self.hold_replies is not None:
            self.reply_held.set()
            await self.hold_replies.wait()
        return value


async def test_a_waiter_whose_miss_crosses_the_fill_does_not_load_again() -> None:
    """Stampede protection must not depend on timing: a waiter that read "missing" just before the holder
    filled (its reply still in flight) and then finds the lease free must not run the loader a second time.
    (When leases were granted on filled keys, 100 concurrent misses over real Redis made 2+ loads in
    most runs: see test_a_hundred_concurrent_misses_make_one_load[redis].)
    """
    cache = SlowReplies(InMemoryCache(ManualClock()))
    rtc = ReadThroughCache(cache)
    source = Source(Item("a", 1))
    gate = source.hold()
    k = key()

    holder = asyncio.create_task(rtc.get_or_load(k, Item, source.load, TTL))
    await asyncio.wait_for(source.started.wait(), 5)
    waiter = asyncio.create_task(rtc.get_or_load(k, Item, source.load, TTL))
    await asyncio.wait_for(cache.until_called("lease", 2), 5)  # the waiter found the lease taken: it polls
    cache.hold_replies = asyncio.Event()
    await asyncio.wait_for(cache.reply_held.wait(), 5)  # the waiter's next get read "missing", reply in flight

    gate.set()
    assert await holder == Item("a", 1)  # the holder filled and released its lease
    cache.hold_replies.set()
    assert await asyncio.wait_for(waiter, 5) == Item("a", 1)

    assert source.calls == 1, "the waiter ran the loader again although the value had just been filled"


# -- switched off (KEEL_CACHE_ENABLED=false) -----------------------------------------------------------


async def test_a_disabled_cache_always_loads_but_still_invalidates() -> None:
    spy = SpyCache(InMemoryCache(ManualClock()))
    rtc = ReadThroughCache(spy, enabled=False)
    source = Source(Item("a", 1))
    k = key()
    for _ in range(3):
        assert await rtc.get_or_load(k, Item, source.load, TTL) == Item("a", 1)
    assert source.calls == 3
    assert spy.calls == []  # reads never touch the cache
    assert (rtc.stats.hits, rtc.stats.errors) == (0, 0)

    # Invalidations still run, so instances with the cache on (sharing it) stay correct.
    await spy.inner.set(k, b"cached elsewhere", TTL)
    await rtc.invalidate(k)
    assert spy.ops("delete") == [(k,)]
    assert await spy.inner.get(k) is None


async def test_a_late_reader_whose_first_miss_crosses_the_fill_does_not_load_again() -> None:
    """The same race on a caller's *first* look: its ``get`` reads "missing" just before the holder fills
    (reply still in flight), and by the time it asks for the lease the holder has filled and released it.
    Leases are refused on keys that hold a value, so this caller reads the fill instead of loading again.
    """
    cache = SlowReplies(InMemoryCache(ManualClock()))
    rtc = ReadThroughCache(cache)
    source = Source(Item("a", 1))
    gate = source.hold()
    k = key()

    holder = asyncio.create_task(rtc.get_or_load(k, Item, source.load, TTL))
    await asyncio.wait_for(source.started.wait(), 5)
    cache.hold_replies = asyncio.Event()
    late = asyncio.create_task(rtc.get_or_load(k, Item, source.load, TTL))
    await asyncio.wait_for(cache.reply_held.wait(), 5)  # its first get read "missing", reply in flight

    gate.set()
    assert await holder == Item("a", 1)  # filled, lease released
    cache.hold_replies.set()
    assert await asyncio.wait_for(late, 5) == Item("a", 1)

    assert source.calls == 1, "a reader that arrived while the value was being filled ran the loader again"
