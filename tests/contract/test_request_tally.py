"""The ``RequestTally`` port's contract, run against both adapters: in memory (the embedded default)
and Redis (shared by every API process and the flush job).

A claim (``take``) survives its job's death: until ``done`` names it, every ``take`` returns the same
batch, and counts added meanwhile wait for the next one. That is what lets the flush store each
count exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import date, timedelta

import pytest
from redis.asyncio import Redis

from keel.contexts.analytics.adapters.memory.tally import InMemoryRequestTally
from keel.contexts.analytics.adapters.redis.tally import RedisRequestTally
from keel.contexts.analytics.ports.tally import RequestTally, TallyBatch
from keel.platform.domain.ids import new_id

DAY = date(2026, 3, 1)
A, B = new_id(), new_id()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "memory" else str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def redis_client(backend: str | None) -> AsyncIterator[Redis | None]:
    if backend is None:
        yield None
        return
    client = Redis.from_url(backend)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test:tally:{uuid.uuid4().hex[:8]}"


@pytest.fixture
def tally(redis_client: Redis | None, prefix: str) -> RequestTally:
    if redis_client is None:
        return InMemoryRequestTally()
    return RedisRequestTally(redis_client, prefix)


async def take(tally: RequestTally) -> TallyBatch:
    batch = await tally.take()
    assert batch is not None
    return batch


async def test_nothing_counted_takes_nothing(tally: RequestTally) -> None:
    assert await tally.take() is None
    await tally.add({})
    assert await tally.take() is None


async def test_add_accumulates_per_tenant_and_day(tally: RequestTally) -> None:
    later = DAY + timedelta(days=1)
    await tally.add({(A, DAY): 3, (B, DAY): 1})
    await tally.add({(A, DAY): 2, (A, later): 7})
    await tally.add({(B, DAY): 4})
    batch = await take(tally)
    assert dict(batch.counts) == {(A, DAY): 5, (A, later): 7, (B, DAY): 5}
    # Keys come back typed as they went in.
    assert all(isinstance(t, uuid.UUID) and type(d) is date for t, d in batch.counts)
    assert all(type(n) is int for n in batch.counts.values())


async def test_concurrent_adds_lose_nothing(tally: RequestTally) -> None:
    await asyncio.gather(*(tally.add({(A, DAY): 1, (B, DAY): 2}) for _ in range(50)))
    assert dict((await take(tally)).counts) == {(A, DAY): 50, (B, DAY): 100}


async def test_take_claims_everything_and_later_counts_go_to_the_next_batch(tally: RequestTally) -> None:
    await tally.add({(A, DAY): 3})
    first = await take(tally)
    assert dict(first.counts) == {(A, DAY): 3}
    await tally.add({(A, DAY): 1, (B, DAY): 2})
    await tally.done(first.id)
    second = await take(tally)
    assert second.id != first.id
    assert dict(second.counts) == {(A, DAY): 1, (B, DAY): 2}
    await tally.done(second.id)
    assert await tally.take() is None


async def test_an_unfinished_claim_is_returned_again_with_the_same_id(tally: RequestTally) -> None:
    await tally.add({(A, DAY): 3})
    first = await take(tally)
    # The flush job died before ``done``; counts keep arriving meanwhile.
    await tally.add({(A, DAY): 10})
    again = await take(tally)
    assert again.id == first.id
    assert dict(again.counts) == dict(first.counts) == {(A, DAY): 3}
    await tally.done(again.id)
    after = await take(tally)
    assert after.id != first.id
    assert dict(after.counts) == {(A, DAY): 10}


async def test_done_with_another_id_keeps_the_claim(tally: RequestTally) -> None:
    await tally.add({(A, DAY): 3})
    first = await take(tally)
    await tally.done("not-this-batch")
    await tally.done(uuid.uuid4().hex)
    again = await take(tally)
    assert (again.id, dict(again.counts)) == (first.id, {(A, DAY): 3})
    # A stale ``done`` (of a batch finished before) does not drop the current claim either.
    await tally.done(first.id)
    await tally.add({(B, DAY): 1})
    second = await take(tally)
    await tally.done(first.id)
    assert (await take(tally)).id == second.id


async def test_done_without_a_claim_is_harmless(tally: RequestTally) -> None:
    await tally.done("nothing-claimed")
    await tally.add({(A, DAY): 1})
    await tally.done("nothing-claimed")
    assert dict((await take(tally)).counts) == {(A, DAY): 1}


async def test_redis_tallies_with_different_prefixes_are_separate(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        one = RedisRequestTally(client, f"test:tally:{uuid.uuid4().hex[:8]}")
        two = RedisRequestTally(client, f"test:tally:{uuid.uuid4().hex[:8]}")
        await one.add({(A, DAY): 1})
        assert await two.take() is None
        assert dict((await take(one)).counts) == {(A, DAY): 1}
    finally:
        await client.aclose()


async def test_redis_tally_is_shared_by_every_process_holding_the_prefix(redis_url: str, prefix: str) -> None:
    """Two clients stand for an API process and the flush job."""
    api, job, next_job = Redis.from_url(redis_url), Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        await RedisRequestTally(api, prefix).add({(A, DAY): 2})
        flusher = RedisRequestTally(job, prefix)
        batch = await take(flusher)
        assert dict(batch.counts) == {(A, DAY): 2}
        # A new flush job (a new client) finds the claim the dead one left.
        assert (await take(RedisRequestTally(next_job, prefix))).id == batch.id
        await flusher.done(batch.id)
        assert await RedisRequestTally(api, prefix).take() is None
    finally:
        for client in (api, job, next_job):
            await client.aclose()
