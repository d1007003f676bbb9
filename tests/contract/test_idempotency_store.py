"""One contract for every IdempotencyStore adapter, on an explicit clock (``now``): memory and Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis

from keel.platform.adapters.memory.idempotency import InMemoryIdempotencyStore
from keel.platform.adapters.redis.idempotency import RedisIdempotencyStore
from keel.platform.ports.idempotency import IdempotencyStore, StoredResponse

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
HOLD = timedelta(minutes=2)
DAY = timedelta(hours=24)
FP, OTHER_FP = "a" * 64, "b" * 64

RESPONSE = StoredResponse(
    status=201,
    headers=[
        ("content-type", "application/json"),
        ("location", "/v1/users/0191f0c2-0000-7000-8000-000000000001"),
        ("x-dup", "one"),
        ("x-dup", "two"),
        ("x-latin", "caf\xe9"),
    ],
    body=b'{"id":"0191f0c2","name":"Ad\xc3\xa0"}\x00\xff\n',
)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> IdempotencyStore:
    if request.param == "memory":
        return InMemoryIdempotencyStore()
    return RedisIdempotencyStore(request.getfixturevalue("redis_client"))


def fresh_key() -> str:
    return f"t:{uuid.uuid4()}:{uuid.uuid4().hex}"


async def test_claim_on_a_fresh_key_takes_it(store: IdempotencyStore) -> None:
    assert await store.claim(fresh_key(), FP, T0, T0 + HOLD) is None


async def test_second_claim_sees_the_in_flight_record(store: IdempotencyStore) -> None:
    key = fresh_key()
    assert await store.claim(key, FP, T0, T0 + HOLD) is None
    for fingerprint in (FP, OTHER_FP):
        record = await store.claim(key, fingerprint, T0 + timedelta(seconds=1), T0 + HOLD + timedelta(seconds=1))
        assert record is not None
        assert record.fingerprint == FP
        assert record.response is None
        assert record.expires_at == T0 + HOLD  # untouched by the failed claims


async def test_completed_response_round_trips_exactly(store: IdempotencyStore) -> None:
    key = fresh_key()
    await store.claim(key, FP, T0, T0 + HOLD)
    await store.complete(key, FP, RESPONSE, T0 + DAY)
    record = await store.claim(key, FP, T0 + timedelta(minutes=5), T0 + timedelta(minutes=7))
    assert record is not None
    assert record.fingerprint == FP
    assert record.expires_at == T0 + DAY
    assert record.response == RESPONSE
    assert record.response.status == 201
    assert record.response.headers == RESPONSE.headers  # order and duplicates kept
    assert record.response.body == RESPONSE.body


async def test_empty_body_round_trips(store: IdempotencyStore) -> None:
    key = fresh_key()
    await store.claim(key, FP, T0, T0 + HOLD)
    empty = StoredResponse(status=204, headers=[], body=b"")
    await store.complete(key, FP, empty, T0 + DAY)
    record = await store.claim(key, FP, T0, T0 + HOLD)
    assert record is not None
    assert record.response == empty


async def test_release_frees_an_in_flight_claim(store: IdempotencyStore) -> None:
    key = fresh_key()
    await store.claim(key, FP, T0, T0 + HOLD)
    await store.release(key, FP)
    assert await store.claim(key, OTHER_FP, T0, T0 + HOLD) is None
    record = await store.claim(key, FP, T0, T0 + HOLD)
    assert record is not None
    assert record.fingerprint == OTHER_FP


async def test_release_with_another_fingerprint_is_a_no_op(store: IdempotencyStore) -> None:
    key = fresh_key()
    await store.claim(key, FP, T0, T0 + HOLD)
    await store.release(key, OTHER_FP)
    record = await store.claim(key, FP, T0, T0 + HOLD)
    assert record is not None
    assert record.fingerprint == FP


async def test_release_does_not_forget_a_completed_response(store: IdempotencyStore) -> None:
    key = fresh_key()
    await store.claim(key, FP, T0, T0 + HOLD)
    await store.complete(key, FP, RESPONSE, T0 + DAY)
    await store.release(key, FP)
    record = await store.claim(key, FP, T0, T0 + HOLD)
    assert record is not None
    assert record.response == RESPONSE


async def test_release_of_an_unknown_key_is_a_no_op(store: IdempotencyStore) -> None:
    await store.release(fresh_key(), FP)


async def test_an_expired_in_flight_claim_behaves_as_absent(store: IdempotencyStore) -> None:
    key = fresh_key()
    await store.claim(key, FP, T0, T0 + HOLD)
    still = await store.claim(key, OTHER_FP, T0 + HOLD - timedelta(seconds=1), T0 + 2 * HOLD)
    assert still is not None
    assert still.fingerprint == FP
    later = T0 + HOLD  # live only while expires_at > now
    assert await store.claim(key, OTHER_FP, later, later + HOLD) is None
    record = await store.claim(key, FP, later, later + HOLD)
    assert record is not None
    assert record.fingerprint == OTHER_FP
    assert record.expires_at == later + HOLD


async def test_a_completed_record_lives_until_expires_at(store: IdempotencyStore) -> None:
    key = fresh_key()
    await store.claim(key, FP, T0, T0 + HOLD)
    await store.complete(key, FP, RESPONSE, T0 + DAY)
    almost = T0 + DAY - timedelta(seconds=1)
    record = await store.claim(key, OTHER_FP, almost, almost + HOLD)
    assert record is not None
    assert record.response == RESPONSE
    assert await store.claim(key, OTHER_FP, T0 + DAY, T0 + DAY + HOLD) is None
    fresh = await store.claim(key, FP, T0 + DAY, T0 + DAY + HOLD)
    assert fresh is not None
    assert fresh.fingerprint == OTHER_FP
    assert fresh.response is None


async def test_a_stale_owner_cannot_overwrite_the_new_claim(store: IdempotencyStore) -> None:
    key = fresh_key()
    await store.claim(key, FP, T0, T0 + HOLD)
    later = T0 + HOLD + timedelta(seconds=1)
    assert await store.claim(key, OTHER_FP, later, later + HOLD) is None  # the first claim lapsed
    await store.complete(key, FP, RESPONSE, T0 + DAY)  # the stale owner finishes late
    await store.release(key, FP)
    record = await store.claim(key, FP, later, later + HOLD)
    assert record is not None
    assert record.fingerprint == OTHER_FP
    assert record.response is None
    mine = StoredResponse(status=200, headers=[("content-type", "text/plain")], body=b"second")
    await store.complete(key, OTHER_FP, mine, later + DAY)
    record = await store.claim(key, OTHER_FP, later, later + HOLD)
    assert record is not None
    assert record.response == mine


async def test_complete_without_a_claim_stores_nothing(store: IdempotencyStore) -> None:
    key = fresh_key()
    await store.complete(key, FP, RESPONSE, T0 + DAY)
    assert await store.claim(key, FP, T0, T0 + HOLD) is None


async def test_a_completed_response_is_not_overwritten(store: IdempotencyStore) -> None:
    key = fresh_key()
    await store.claim(key, FP, T0, T0 + HOLD)
    await store.complete(key, FP, RESPONSE, T0 + DAY)
    await store.complete(key, FP, StoredResponse(status=500, headers=[], body=b"late"), T0 + 2 * DAY)
    record = await store.claim(key, FP, T0, T0 + HOLD)
    assert record is not None
    assert record.response == RESPONSE
    assert record.expires_at == T0 + DAY


async def test_keys_are_independent(store: IdempotencyStore) -> None:
    a, b = fresh_key(), fresh_key()
    await store.claim(a, FP, T0, T0 + HOLD)
    await store.complete(a, FP, RESPONSE, T0 + DAY)
    assert await store.claim(b, FP, T0, T0 + HOLD) is None
    record = await store.claim(b, OTHER_FP, T0, T0 + HOLD)
    assert record is not None
    assert record.response is None


async def test_concurrent_claims_have_exactly_one_winner(store: IdempotencyStore) -> None:
    key = fresh_key()
    results = await asyncio.gather(*(store.claim(key, FP, T0, T0 + HOLD) for _ in range(25)))
    assert sum(r is None for r in results) == 1
    assert all(r.fingerprint == FP and r.response is None for r in results if r is not None)


async def test_sub_second_times_compare_correctly(store: IdempotencyStore) -> None:
    key = fresh_key()
    now = T0 + timedelta(microseconds=250_000)
    await store.claim(key, FP, now, now + timedelta(milliseconds=500))
    assert await store.claim(key, OTHER_FP, now + timedelta(milliseconds=499), now + HOLD) is not None
    assert await store.claim(key, OTHER_FP, now + timedelta(milliseconds=500), now + HOLD) is None


async def test_redis_records_carry_a_ttl_that_reclaims_memory(redis_client: Redis) -> None:
    store = RedisIdempotencyStore(redis_client)
    now = datetime.now(UTC)
    await store.claim("t:x:k1", FP, now, now + HOLD)
    in_flight_ttl = await redis_client.pttl("keel:idem:t:x:k1")
    assert HOLD.total_seconds() * 1000 < in_flight_ttl <= HOLD.total_seconds() * 1000 + 61_000
    await store.complete("t:x:k1", FP, RESPONSE, now + DAY)
    done_ttl = await redis_client.pttl("keel:idem:t:x:k1")
    assert DAY.total_seconds() * 1000 - 5_000 < done_ttl <= DAY.total_seconds() * 1000 + 61_000
