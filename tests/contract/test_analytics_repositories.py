"""One contract for the analytics storage port (``RollupRepository``), run against the fake, SQLite and
Postgres: what a rollup replaces and keeps, which days count as rolled up, and request batches that
add their counts once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta

import pytest

from keel.contexts.analytics.adapters.sql.repositories import SqlAnalyticsUnitOfWork
from keel.contexts.analytics.domain.model import Figure, Metric
from keel.contexts.analytics.ports.repositories import AnalyticsUnitOfWork, RequestCounts
from keel.platform.domain.ids import new_id
from tests.fakes.analytics import AnalyticsState, InMemoryAnalyticsUnitOfWork
from tests.support.storage import BACKENDS, backend_of, uow_factory

NOW = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)
DAY = date(2026, 2, 27)

UowFactory = Callable[[], AnalyticsUnitOfWork]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return backend_of(request)


@pytest.fixture
async def uow(backend: str) -> AsyncIterator[UowFactory]:
    state = AnalyticsState()
    async with uow_factory(backend, lambda: InMemoryAnalyticsUnitOfWork(state), SqlAnalyticsUnitOfWork) as factory:
        yield factory


def money(metric: Metric, currency: str, status: str, count: int, amount: int, day: date = DAY) -> Figure:
    return Figure(day=day, metric=metric, currency=currency, status=status, count=count, amount=amount)


def users(count: int, day: date = DAY) -> Figure:
    return Figure(day=day, metric=Metric.NEW_USERS, count=count)


def requests(count: int, day: date = DAY) -> Figure:
    return Figure(day=day, metric=Metric.API_REQUESTS, count=count)


def as_set(figures: list[Figure]) -> set[Figure]:
    assert len(figures) == len(set(figures)), f"duplicates: {figures}"
    return set(figures)


async def replace(uow: UowFactory, tenant_id: uuid.UUID, day: date, figures: list[Figure], at: datetime = NOW) -> None:
    async with uow() as u:
        await u.rollups.replace_day(tenant_id, day, figures, at)
        await u.commit()


async def stored(uow: UowFactory, tenant_id: uuid.UUID, start: date = DAY, end: date = DAY) -> set[Figure]:
    async with uow() as u:
        return as_set(await u.rollups.figures(tenant_id, start, end))


async def rolled(uow: UowFactory, tenant_id: uuid.UUID, start: date, end: date) -> set[date]:
    async with uow() as u:
        return await u.rollups.rolled_up(tenant_id, start, end)


async def add(uow: UowFactory, batch_id: str, counts: RequestCounts, at: datetime = NOW) -> bool:
    async with uow() as u:
        added = await u.rollups.add_requests(batch_id, counts, at)
        await u.commit()
    return added


# -- replace_day ------------------------------------------------------------------------------------


async def test_replace_day_stores_the_figures_and_reads_them_back_exactly(uow: UowFactory) -> None:
    tenant = new_id()
    figures = [
        money(Metric.PAYMENTS, "EUR", "succeeded", 3, 7_500),
        money(Metric.PAYMENTS, "EUR", "failed", 1, 2_000),
        money(Metric.PAYMENTS, "JPY", "succeeded", 2, 9_000_000_000),  # past 32 bits: BIGINT columns
        money(Metric.REFUNDS, "EUR", "pending", 1, 500),
        money(Metric.REFUNDS, "EUR", "succeeded", 2, 1_200),
        users(4),
    ]
    await replace(uow, tenant, DAY, figures)
    got = await stored(uow, tenant)
    assert got == set(figures)
    assert all(isinstance(f.metric, Metric) for f in got)
    assert await rolled(uow, tenant, DAY, DAY) == {DAY}


async def test_replacing_a_day_drops_the_figures_it_no_longer_has(uow: UowFactory) -> None:
    tenant = new_id()
    await replace(
        uow,
        tenant,
        DAY,
        [money(Metric.PAYMENTS, "EUR", "pending", 2, 300), money(Metric.REFUNDS, "EUR", "pending", 1, 100), users(2)],
    )
    # The pending payments settled and the refund went through; one user was deleted.
    second = [money(Metric.PAYMENTS, "EUR", "succeeded", 2, 300), money(Metric.REFUNDS, "EUR", "succeeded", 1, 100)]
    await replace(uow, tenant, DAY, [*second, users(1)], NOW + timedelta(hours=1))
    assert await stored(uow, tenant) == {*second, users(1)}
    # Replacing with the same figures again is a no-op (rollups are retried).
    await replace(uow, tenant, DAY, [*second, users(1)], NOW + timedelta(hours=2))
    assert await stored(uow, tenant) == {*second, users(1)}
    # A day whose activity is all gone keeps no figures, and stays rolled up.
    await replace(uow, tenant, DAY, [], NOW + timedelta(hours=3))
    assert await stored(uow, tenant) == set()
    assert await rolled(uow, tenant, DAY, DAY) == {DAY}


async def test_replace_day_skips_empty_figures_and_never_writes_api_requests(uow: UowFactory) -> None:
    tenant = new_id()
    await add(uow, "b-1", {(tenant, DAY): 40})
    await replace(
        uow,
        tenant,
        DAY,
        [
            money(Metric.PAYMENTS, "EUR", "succeeded", 0, 0),
            money(Metric.PAYMENTS, "USD", "succeeded", 1, 999),
            users(0),
            requests(7),  # counted, never recomputed: a rollup must not overwrite the count
        ],
    )
    assert await stored(uow, tenant) == {money(Metric.PAYMENTS, "USD", "succeeded", 1, 999), requests(40)}


async def test_replace_day_keeps_the_api_request_count(uow: UowFactory) -> None:
    tenant = new_id()
    await add(uow, "b-1", {(tenant, DAY): 12})
    await replace(uow, tenant, DAY, [users(3)])
    await replace(uow, tenant, DAY, [users(2)])
    await add(uow, "b-2", {(tenant, DAY): 5})
    await replace(uow, tenant, DAY, [])
    assert await stored(uow, tenant) == {requests(17)}


async def test_replace_day_touches_only_its_tenant_and_day(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    before, after = DAY - timedelta(days=1), DAY + timedelta(days=1)
    for tenant in (a, b):
        for day in (before, DAY, after):
            await replace(uow, tenant, day, [users(1, day), money(Metric.PAYMENTS, "EUR", "succeeded", 1, 100, day)])
    await replace(uow, a, DAY, [users(9)])
    assert await stored(uow, a, before, after) == {
        users(1, before),
        money(Metric.PAYMENTS, "EUR", "succeeded", 1, 100, before),
        users(9),
        users(1, after),
        money(Metric.PAYMENTS, "EUR", "succeeded", 1, 100, after),
    }
    assert await stored(uow, b, DAY, DAY) == {users(1), money(Metric.PAYMENTS, "EUR", "succeeded", 1, 100)}


async def test_figures_are_stored_under_the_day_replaced(uow: UowFactory) -> None:
    """The day argument is the row's day: figures are keyed by the day the rollup names."""
    tenant = new_id()
    await replace(uow, tenant, DAY, [users(2, DAY - timedelta(days=5))])
    assert await stored(uow, tenant) == {users(2)}


async def test_leaving_without_commit_discards_a_replacement(uow: UowFactory) -> None:
    tenant = new_id()
    await replace(uow, tenant, DAY, [users(1)])
    async with uow() as u:
        await u.rollups.replace_day(tenant, DAY, [users(5)], NOW)
        await u.rollups.replace_day(tenant, DAY + timedelta(days=1), [users(5, DAY + timedelta(days=1))], NOW)
        await u.rollups.add_requests("b-lost", {(tenant, DAY): 3}, NOW)
    assert await stored(uow, tenant, DAY, DAY + timedelta(days=1)) == {users(1)}
    assert await rolled(uow, tenant, DAY, DAY + timedelta(days=1)) == {DAY}
    # The batch was not recorded either: adding it again counts.
    assert await add(uow, "b-lost", {(tenant, DAY): 3}) is True


# -- figures and rolled_up: ranges --------------------------------------------------------------------


async def test_ranges_are_inclusive_and_tenant_scoped(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    days = [DAY + timedelta(days=i) for i in range(5)]
    for d in days[1:4]:
        await replace(uow, a, d, [users(1, d)])
    await replace(uow, b, days[0], [users(1, days[0])])
    await replace(uow, b, days[4], [users(1, days[4])])
    # API requests of a day no rollup covered are stored too, and returned.
    await add(uow, "b-1", {(a, days[0]): 2, (b, days[2]): 3})

    assert await rolled(uow, a, days[0], days[4]) == set(days[1:4])
    assert await rolled(uow, a, days[2], days[2]) == {days[2]}
    assert await rolled(uow, a, days[3], days[4]) == {days[3]}
    assert await rolled(uow, b, days[1], days[3]) == set()
    assert await rolled(uow, new_id(), days[0], days[4]) == set()

    assert await stored(uow, a, days[0], days[4]) == {requests(2, days[0]), *(users(1, d) for d in days[1:4])}
    assert await stored(uow, a, days[1], days[1]) == {users(1, days[1])}
    assert await stored(uow, a, days[4], days[4] + timedelta(days=30)) == set()
    assert await stored(uow, b, days[1], days[3]) == {requests(3, days[2])}


async def test_a_second_rollup_of_a_day_keeps_it_rolled_up_once(uow: UowFactory) -> None:
    tenant = new_id()
    await replace(uow, tenant, DAY, [users(1)], NOW)
    await replace(uow, tenant, DAY, [users(1)], NOW + timedelta(minutes=5))
    async with uow() as u:
        days = await u.rollups.rolled_up(tenant, DAY - timedelta(days=1), DAY + timedelta(days=1))
    assert days == {DAY}


# -- request batches ------------------------------------------------------------------------------


async def test_request_batches_add_up_per_tenant_and_day(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    other = DAY + timedelta(days=1)
    assert await add(uow, "b-1", {(a, DAY): 10, (b, DAY): 1, (a, other): 4}) is True
    assert await add(uow, "b-2", {(a, DAY): 5}) is True
    assert await stored(uow, a, DAY, other) == {requests(15), requests(4, other)}
    assert await stored(uow, b, DAY, other) == {requests(1)}
    # A count is not a rollup.
    assert await rolled(uow, a, DAY, other) == set()


async def test_a_batch_is_added_once(uow: UowFactory) -> None:
    tenant = new_id()
    assert await add(uow, "b-1", {(tenant, DAY): 10}) is True
    # The flush job died after its commit and before telling the tally: the retry brings the same batch.
    assert await add(uow, "b-1", {(tenant, DAY): 10}) is False
    assert await add(uow, "b-1", {(tenant, DAY): 999, (new_id(), DAY): 1}, NOW + timedelta(minutes=1)) is False
    assert await stored(uow, tenant) == {requests(10)}


async def test_an_empty_batch_is_recorded_too(uow: UowFactory) -> None:
    assert await add(uow, "b-empty", {}) is True
    assert await add(uow, "b-empty", {}) is False


async def test_a_batch_naming_many_tenants_is_added_whole(uow: UowFactory) -> None:
    tenants = [new_id() for _ in range(120)]
    counts = {(t, DAY - timedelta(days=i % 3)): i + 1 for i, t in enumerate(tenants)}
    assert await add(uow, "b-many", counts) is True
    for i, t in enumerate(tenants):
        day = DAY - timedelta(days=i % 3)
        assert await stored(uow, t, day, day) == {requests(i + 1, day)}


async def test_forget_batches_drops_the_ledger_entries_older_than_the_cutoff(uow: UowFactory) -> None:
    tenant = new_id()
    assert await add(uow, "old", {(tenant, DAY): 1}, NOW - timedelta(days=8)) is True
    assert await add(uow, "edge", {(tenant, DAY): 1}, NOW - timedelta(days=7)) is True
    assert await add(uow, "new", {(tenant, DAY): 1}, NOW) is True
    async with uow() as u:
        assert await u.rollups.forget_batches(NOW - timedelta(days=7)) == 1
        await u.commit()
    # Forgotten: the id may come again (and counts again); kept ones are still refused.
    assert await add(uow, "old", {(tenant, DAY): 1}) is True
    assert await add(uow, "edge", {(tenant, DAY): 1}) is False
    assert await add(uow, "new", {(tenant, DAY): 1}) is False
    async with uow() as u:
        assert await u.rollups.forget_batches(NOW - timedelta(days=30)) == 0
    assert await stored(uow, tenant) == {requests(4)}


async def test_forgetting_without_commit_keeps_the_ledger(uow: UowFactory) -> None:
    tenant = new_id()
    assert await add(uow, "b-1", {(tenant, DAY): 1}, NOW - timedelta(days=30)) is True
    async with uow() as u:
        assert await u.rollups.forget_batches(NOW) == 1
    assert await add(uow, "b-1", {(tenant, DAY): 1}) is False
