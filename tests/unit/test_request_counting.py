"""Counting API requests: the in-process counter (hits collect in a dictionary, a background task adds
them to the shared tally) and the ASGI middleware that counts authenticated requests."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from keel.contexts.analytics.adapters.http import request_counting
from keel.contexts.analytics.adapters.http.request_counting import RequestCounter, RequestCountingMiddleware
from keel.contexts.analytics.adapters.memory.tally import InMemoryRequestTally
from keel.contexts.analytics.ports.repositories import RequestCounts
from keel.platform.domain.ids import new_id
from keel.platform.domain.tenancy import Principal
from tests.fakes.clock import ManualClock
from tests.support.waiting import eventually

NOW = datetime(2026, 3, 10, 23, 59, 59, tzinfo=UTC)
TODAY = NOW.date()
A, B = new_id(), new_id()


class RecordingTally(InMemoryRequestTally):
    """The in-memory tally, recording every ``add`` and failing the next ``failures`` of them."""

    def __init__(self) -> None:
        super().__init__()
        self.adds: list[dict[tuple[uuid.UUID, date], int]] = []
        self.failures = 0

    async def add(self, counts: RequestCounts) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("redis is down")
        self.adds.append(dict(counts))
        await super().add(counts)

    async def totals(self) -> dict[tuple[uuid.UUID, date], int]:
        """What reached the tally since the last call (taken as the flush job takes it)."""
        batch = await self.take()
        if batch is None:
            return {}
        await self.done(batch.id)
        return dict(batch.counts)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def tally() -> RecordingTally:
    return RecordingTally()


@pytest.fixture
def counter(tally: RecordingTally, clock: ManualClock) -> RequestCounter:
    return RequestCounter(tally, clock)


# -- the counter ----------------------------------------------------------------------------------


async def test_hits_are_counted_per_tenant_and_utc_day_and_flushed_in_one_add(
    counter: RequestCounter, tally: RecordingTally, clock: ManualClock
) -> None:
    for _ in range(3):
        counter.hit(A)
    counter.hit(B)
    clock.advance(seconds=1)  # past midnight: tomorrow's count
    counter.hit(A)
    await counter.flush()
    assert tally.adds == [{(A, TODAY): 3, (B, TODAY): 1, (A, TODAY + timedelta(days=1)): 1}]
    # Flushed counts are not sent again; nothing new, nothing sent.
    await counter.flush()
    assert len(tally.adds) == 1
    counter.hit(B)
    await counter.flush()
    assert tally.adds[-1] == {(B, TODAY + timedelta(days=1)): 1}
    assert await tally.totals() == {
        (A, TODAY): 3,
        (B, TODAY): 1,
        (A, TODAY + timedelta(days=1)): 1,
        (B, TODAY + timedelta(days=1)): 1,
    }


async def test_a_failing_tally_keeps_the_counts_for_the_next_flush(
    counter: RequestCounter, tally: RecordingTally
) -> None:
    counter.hit(A)
    counter.hit(A)
    tally.failures = 2
    await counter.flush()  # must not raise: analytics never breaks a request
    counter.hit(A)
    counter.hit(B)
    await counter.flush()
    assert tally.adds == []
    await counter.flush()
    assert tally.adds == [{(A, TODAY): 3, (B, TODAY): 1}]
    assert await tally.totals() == {(A, TODAY): 3, (B, TODAY): 1}


async def test_stop_flushes_what_is_left(counter: RequestCounter, tally: RecordingTally) -> None:
    counter.start()
    counter.hit(A)
    await counter.stop()
    assert await tally.totals() == {(A, TODAY): 1}
    # Stopping a counter that never started flushes too, and stopping twice is harmless.
    counter.hit(B)
    await counter.stop()
    await counter.stop()
    assert await tally.totals() == {(B, TODAY): 1}


async def test_a_started_counter_flushes_by_itself(
    counter: RequestCounter, tally: RecordingTally, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request_counting, "FLUSH_EVERY", 0.01)
    counter.start()
    counter.start()  # one background task, however often started
    try:
        counter.hit(A)

        async def flushed() -> bool:
            return bool(tally.adds)

        await eventually(flushed)
        assert tally.adds == [{(A, TODAY): 1}]
        # A failure does not stop the loop.
        tally.failures = 1
        counter.hit(B)

        async def flushed_again() -> bool:
            return len(tally.adds) == 2

        await eventually(flushed_again)
        assert tally.adds[1] == {(B, TODAY): 1}
    finally:
        await counter.stop()


# -- the middleware ---------------------------------------------------------------------------------


class Downstream:
    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)


async def _receive() -> dict[str, Any]:
    return {"type": "http.request"}


async def _send(message: Any) -> None:
    return None


@pytest.mark.parametrize(
    ("scope_type", "user", "counted"),
    [
        ("http", Principal(tenant_id=A, api_key_id=new_id()), True),
        ("http", None, False),  # a public path: nobody authenticated
        ("http", "not a principal", False),
        ("http", {"tenant_id": str(A)}, False),
        ("websocket", Principal(tenant_id=A, api_key_id=new_id()), False),
        ("lifespan", None, False),
    ],
)
async def test_the_middleware_counts_only_authenticated_http_requests(
    counter: RequestCounter, tally: RecordingTally, scope_type: str, user: object, counted: bool
) -> None:
    downstream = Downstream()
    middleware = RequestCountingMiddleware(downstream, counter)
    scope: dict[str, Any] = {"type": scope_type}
    if user is not None:
        scope["user"] = user
    await middleware(scope, _receive, _send)  # type: ignore[arg-type]
    assert downstream.scopes == [scope]  # the request goes on either way
    await counter.flush()
    assert await tally.totals() == ({(A, TODAY): 1} if counted else {})


async def test_the_middleware_counts_each_request_of_each_tenant(
    counter: RequestCounter, tally: RecordingTally
) -> None:
    downstream = Downstream()
    middleware = RequestCountingMiddleware(downstream, counter)
    a, b = Principal(tenant_id=A, api_key_id=new_id()), Principal(tenant_id=B, api_key_id=new_id())
    for who in (a, a, b, a):
        await middleware({"type": "http", "user": who}, _receive, _send)  # type: ignore[arg-type]
    await counter.flush()
    assert Counter(await tally.totals()) == Counter({(A, TODAY): 3, (B, TODAY): 1})
