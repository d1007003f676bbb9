"""One contract for the payments storage ports, run against the fake, SQLite and Postgres."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from keel.contexts.payments.adapters.sql.repositories import SqlPaymentsUnitOfWork
from keel.contexts.payments.domain.model import (
    DailyTotal,
    Failure,
    FailureReason,
    Payment,
    PaymentStatus,
    Refund,
    RefundReason,
    RefundStatus,
)
from keel.contexts.payments.ports.repositories import PaymentFilter, PaymentsUnitOfWork
from keel.platform.domain.ids import new_id
from keel.platform.domain.paging import Page, PageRequest
from tests.fakes.payments import InMemoryPaymentsUnitOfWork, PaymentsState
from tests.support.storage import BACKENDS, backend_of, uow_factory

NOW = datetime(2026, 3, 1, 9, 30, 15, 123456, tzinfo=UTC)

UowFactory = Callable[[], PaymentsUnitOfWork]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return backend_of(request)


@pytest.fixture
async def uow(backend: str) -> AsyncIterator[UowFactory]:
    state = PaymentsState()
    async with uow_factory(backend, lambda: InMemoryPaymentsUnitOfWork(state), SqlPaymentsUnitOfWork) as factory:
        yield factory


def payment(
    tenant_id: uuid.UUID,
    *,
    amount: int = 2500,
    created: datetime = NOW,
    updated: datetime | None = None,
    metadata: dict[str, str] | None = None,
) -> Payment:
    return Payment(
        id=new_id(),
        tenant_id=tenant_id,
        amount=amount,
        currency="EUR",
        payment_method="pm_card_visa",
        description="Order #1042 \u2014 Zo\u00eb's \U0001f980 boots",
        customer_email="zoe@example.test",
        metadata={"order_id": "1042", "note": "caf\u00e9 \U0001f980"} if metadata is None else metadata,
        status=PaymentStatus.PENDING,
        provider="sandbox",
        created_at=created,
        updated_at=updated or created,
    )


def succeeded(p: Payment, at: datetime | None = None) -> Payment:
    return p.succeed(f"ch_sandbox_{p.id.hex[:12]}", at or p.updated_at + timedelta(seconds=2))


def refund(
    p: Payment,
    amount: int = 500,
    *,
    created: datetime = NOW,
    updated: datetime | None = None,
    reason: RefundReason | None = RefundReason.REQUESTED_BY_CUSTOMER,
) -> Refund:
    return Refund(
        id=new_id(),
        tenant_id=p.tenant_id,
        payment_id=p.id,
        amount=amount,
        currency=p.currency,
        reason=reason,
        status=RefundStatus.PENDING,
        created_at=created,
        updated_at=updated or created,
    )


async def store(uow: UowFactory, *items: Payment | Refund) -> None:
    async with uow() as u:
        for item in items:
            if isinstance(item, Payment):
                await u.payments.add(item)
            else:
                await u.refunds.add(item)
        await u.commit()


async def get_payment(uow: UowFactory, tenant_id: uuid.UUID, payment_id: uuid.UUID) -> Payment | None:
    async with uow() as u:
        return await u.payments.get(tenant_id, payment_id)


async def all_pages(
    uow: UowFactory, tenant_id: uuid.UUID, where: PaymentFilter, limit: int
) -> tuple[list[Payment], int]:
    seen: list[Payment] = []
    after = None
    pages = 0
    while True:
        async with uow() as u:
            page: Page[Payment] = await u.payments.list(tenant_id, where, PageRequest(limit=limit, after=after))
        seen.extend(page.items)
        pages += 1
        if page.next_after is None:
            return seen, pages
        after = page.next_after


# -- payments ---------------------------------------------------------------------------------------


async def test_payment_round_trip_keeps_every_field(uow: UowFactory) -> None:
    tenant = new_id()
    p = payment(tenant)
    bare = replace(payment(tenant, metadata={}), customer_email=None, description="")
    await store(uow, p, bare)
    got = await get_payment(uow, tenant, p.id)
    assert got == p
    assert got is not None
    assert got.status is PaymentStatus.PENDING
    assert dict(got.metadata) == {"order_id": "1042", "note": "caf\u00e9 \U0001f980"}
    assert got.created_at.tzinfo is not None
    assert got.created_at.utcoffset() == timedelta(0)
    assert (got.provider_reference, got.failure_reason, got.failure_message) == (None, None, None)
    assert await get_payment(uow, tenant, bare.id) == bare

    # Every field a change can touch comes back as written, enums as enums.
    failed = p.fail(
        Failure(reason=FailureReason.INSUFFICIENT_FUNDS, message="Your card has insufficient funds."),
        NOW + timedelta(minutes=1),
    )
    async with uow() as u:
        assert await u.payments.save(failed) is True
        await u.commit()
    got = await get_payment(uow, tenant, p.id)
    assert got == failed
    assert got is not None
    assert got.failure_reason is FailureReason.INSUFFICIENT_FUNDS
    assert got.version == 2

    step1 = succeeded(bare)
    step2, _ = step1.reserve_refund(700, NOW + timedelta(minutes=2))
    step3 = step2.settle_refund(700, NOW + timedelta(minutes=3))
    refunded, _ = step3.reserve_refund(300, NOW + timedelta(minutes=4))
    async with uow() as u:
        # Saved in steps, each derived from the one before.
        for step in (step1, step2, step3, refunded):
            assert await u.payments.save(step) is True
        await u.commit()
    got = await get_payment(uow, tenant, bare.id)
    assert got == refunded
    assert got is not None
    assert (got.status, got.amount_refunded, got.amount_refunding) == (PaymentStatus.PARTIALLY_REFUNDED, 700, 300)
    assert got.provider_reference == f"ch_sandbox_{bare.id.hex[:12]}"


async def test_datetimes_in_any_offset_come_back_as_the_same_instant(uow: UowFactory) -> None:
    tenant = new_id()
    local = NOW.astimezone(timezone(timedelta(hours=-5)))
    p = payment(tenant, created=local, updated=local + timedelta(seconds=1))
    await store(uow, p)
    got = await get_payment(uow, tenant, p.id)
    assert got is not None
    assert got.created_at == NOW
    assert got.updated_at == NOW + timedelta(seconds=1)
    assert got.created_at.tzinfo is not None


async def test_leaving_without_commit_discards_everything(uow: UowFactory) -> None:
    tenant = new_id()
    kept = payment(tenant)
    await store(uow, kept)
    p = payment(tenant)
    async with uow() as u:
        await u.payments.add(p)
        await u.refunds.add(refund(p))
        assert await u.payments.save(succeeded(kept)) is True
        # Visible inside its own transaction ...
        assert await u.payments.get(tenant, p.id) == p
    # ... and nowhere once it is left without commit.
    async with uow() as u:
        assert await u.payments.get(tenant, p.id) is None
        assert await u.payments.get(tenant, kept.id) == kept
        assert [x.id for x in (await u.payments.list(tenant, PaymentFilter(), PageRequest())).items] == [kept.id]
        assert (await u.refunds.list(tenant, p.id, PageRequest())).items == []
        assert await u.refunds.stale_pending(NOW + timedelta(days=1), 10) == []


async def test_payments_are_scoped_to_their_tenant(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    pa, pb = payment(a), payment(b)
    await store(uow, pa, pb)
    async with uow() as u:
        assert await u.payments.get(b, pa.id) is None
        assert await u.payments.get(a, new_id()) is None
        assert [p.id for p in (await u.payments.list(b, PaymentFilter(), PageRequest())).items] == [pb.id]
        # A change naming another tenant writes nothing.
        assert await u.payments.save(replace(succeeded(pa), tenant_id=b)) is False
        await u.commit()
    assert await get_payment(uow, a, pa.id) == pa


async def test_save_is_fenced_by_version(uow: UowFactory) -> None:
    tenant = new_id()
    p = payment(tenant)
    await store(uow, p)
    won = succeeded(p)
    lost = p.fail(Failure(reason=FailureReason.CARD_DECLINED, message="declined"), NOW + timedelta(seconds=3))
    assert won.version == lost.version == 2
    async with uow() as u:
        assert await u.payments.save(won) is True
        await u.commit()
    async with uow() as u:
        # Derived from version 1, which is gone: refused, and nothing is written.
        assert await u.payments.save(lost) is False
        # Saving the winner again is not a no-op success either: it too was derived from version 1.
        assert await u.payments.save(won) is False
        await u.commit()
    assert await get_payment(uow, tenant, p.id) == won
    # The next change, derived from what is stored now, goes through.
    reserved, _ = won.reserve_refund(None, NOW + timedelta(seconds=4))
    async with uow() as u:
        assert await u.payments.save(reserved) is True
        await u.commit()
    assert await get_payment(uow, tenant, p.id) == reserved
    # A payment that was never stored cannot be saved into existence.
    async with uow() as u:
        assert await u.payments.save(succeeded(payment(tenant))) is False


# The in-memory fake gives each unit of work a private snapshot and its commit replaces the state
# wholesale, so it cannot model two open transactions; the databases must.
@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_two_open_transactions_changing_the_same_version_only_one_wins(uow: UowFactory) -> None:
    tenant = new_id()
    p = payment(tenant)
    await store(uow, p)
    async with uow() as first, uow() as second:
        one = await first.payments.get(tenant, p.id)
        two = await second.payments.get(tenant, p.id)
        assert one == two == p
        assert one is not None
        assert two is not None
        assert await first.payments.save(succeeded(one)) is True
        await first.commit()
        failed = two.fail(Failure(reason=FailureReason.CARD_DECLINED, message="declined"), NOW)
        assert await second.payments.save(failed) is False
        await second.commit()
    got = await get_payment(uow, tenant, p.id)
    assert got is not None
    assert got.status is PaymentStatus.SUCCEEDED


async def test_payment_pages_are_newest_first_without_gaps_or_repeats(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    created = [payment(a, created=NOW + timedelta(minutes=i)) for i in range(7)]
    await store(uow, *created, payment(b))
    seen, pages = await all_pages(uow, a, PaymentFilter(), 3)
    assert [p.id for p in seen] == [p.id for p in reversed(created)]
    assert pages == 3
    async with uow() as u:
        exact = await u.payments.list(a, PaymentFilter(), PageRequest(limit=7))
    assert [p.id for p in exact.items] == [p.id for p in reversed(created)]
    assert exact.next_after is None


async def test_payment_lists_filter_by_status_and_creation_window(uow: UowFactory) -> None:
    tenant = new_id()
    created = [payment(tenant, created=NOW + timedelta(minutes=i)) for i in range(8)]
    await store(uow, *created)
    wins = [created[i] for i in (1, 2, 4, 5, 7)]
    async with uow() as u:
        for p in wins:
            assert await u.payments.save(succeeded(p)) is True
        declined = Failure(reason=FailureReason.CARD_DECLINED, message="Your card was declined.")
        assert await u.payments.save(created[3].fail(declined, NOW + timedelta(minutes=9))) is True
        await u.commit()

    def ids(items: list[Payment]) -> list[uuid.UUID]:
        return [p.id for p in items]

    only_succeeded, _ = await all_pages(uow, tenant, PaymentFilter(status=PaymentStatus.SUCCEEDED), 2)
    assert ids(only_succeeded) == ids(list(reversed(wins)))
    assert all(p.status is PaymentStatus.SUCCEEDED for p in only_succeeded)
    pending, _ = await all_pages(uow, tenant, PaymentFilter(status=PaymentStatus.PENDING), 50)
    assert ids(pending) == [created[6].id, created[0].id]
    refunded, _ = await all_pages(uow, tenant, PaymentFilter(status=PaymentStatus.REFUNDED), 50)
    assert refunded == []

    # created_from is inclusive, created_to exclusive.
    window = PaymentFilter(created_from=NOW + timedelta(minutes=2), created_to=NOW + timedelta(minutes=5))
    in_window, _ = await all_pages(uow, tenant, window, 2)
    assert ids(in_window) == [created[4].id, created[3].id, created[2].id]
    # The bounds compare instants, whatever offset they are given in.
    shifted = PaymentFilter(
        created_from=(NOW + timedelta(minutes=2)).astimezone(timezone(timedelta(hours=9))),
        created_to=(NOW + timedelta(minutes=5)).astimezone(timezone(timedelta(hours=-3))),
    )
    assert ids((await all_pages(uow, tenant, shifted, 50))[0]) == ids(in_window)
    since, _ = await all_pages(uow, tenant, PaymentFilter(created_from=NOW + timedelta(minutes=6)), 50)
    assert ids(since) == [created[7].id, created[6].id]
    before, _ = await all_pages(uow, tenant, PaymentFilter(created_to=NOW + timedelta(minutes=1)), 50)
    assert ids(before) == [created[0].id]
    # Filters combine.
    both = PaymentFilter(
        status=PaymentStatus.SUCCEEDED, created_from=NOW + timedelta(minutes=2), created_to=NOW + timedelta(minutes=5)
    )
    combined, pages = await all_pages(uow, tenant, both, 1)
    assert ids(combined) == [created[4].id, created[2].id]
    assert pages == 2


async def test_stale_pending_payments_across_tenants_oldest_first(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    cutoff = NOW
    oldest = payment(b, created=NOW - timedelta(hours=3))
    old = payment(a, created=NOW - timedelta(hours=2))
    recent_enough = payment(a, created=NOW - timedelta(minutes=1))
    at_cutoff = payment(b, created=cutoff)
    fresh = payment(a, created=NOW + timedelta(minutes=1))
    done = payment(a, created=NOW - timedelta(hours=4))
    await store(uow, old, fresh, at_cutoff, oldest, recent_enough, done)
    async with uow() as u:
        assert await u.payments.save(succeeded(done, NOW - timedelta(hours=4)))
        await u.commit()
    async with uow() as u:
        found = await u.payments.stale_pending(cutoff, 100)
        assert [p.id for p in found] == [oldest.id, old.id, recent_enough.id]
        assert found[0] == oldest
        assert [p.id for p in await u.payments.stale_pending(cutoff, 2)] == [oldest.id, old.id]
        assert await u.payments.stale_pending(NOW - timedelta(hours=5), 100) == []


# -- refunds ----------------------------------------------------------------------------------------


async def test_refund_round_trip_and_update(uow: UowFactory) -> None:
    tenant = new_id()
    p = payment(tenant)
    r = refund(p, 700)
    bare = refund(p, 300, reason=None)
    await store(uow, p, r, bare)
    async with uow() as u:
        assert await u.refunds.get(tenant, r.id) == r
        got = await u.refunds.get(tenant, bare.id)
        assert got == bare
        assert got is not None
        assert got.reason is None
        assert got.status is RefundStatus.PENDING
        assert got.created_at.tzinfo is not None
        assert await u.refunds.get(tenant, new_id()) is None
    settled = r.settled("re_sandbox_1", NOW + timedelta(minutes=1))
    failed = bare.failed(
        Failure(reason=FailureReason.REFUND_REJECTED, message="The refund exceeds what is left of the charge."),
        NOW + timedelta(minutes=2),
    )
    async with uow() as u:
        await u.refunds.update(settled)
        await u.refunds.update(failed)
        await u.commit()
    async with uow() as u:
        got_settled = await u.refunds.get(tenant, r.id)
        got_failed = await u.refunds.get(tenant, bare.id)
    assert got_settled == settled
    assert got_failed == failed
    assert got_failed is not None
    assert got_failed.failure_reason is FailureReason.REFUND_REJECTED
    assert got_failed.status is RefundStatus.FAILED


async def test_refunds_are_scoped_to_their_tenant(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    pa = payment(a)
    ra = refund(pa)
    await store(uow, pa, ra, refund(payment(b)))
    async with uow() as u:
        assert await u.refunds.get(b, ra.id) is None
        assert (await u.refunds.list(b, pa.id, PageRequest())).items == []
        # An update naming another tenant changes nothing.
        await u.refunds.update(replace(ra.settled("re_evil", NOW), tenant_id=b))
        await u.commit()
    async with uow() as u:
        assert await u.refunds.get(a, ra.id) == ra


async def test_refund_pages_are_newest_first_per_payment(uow: UowFactory) -> None:
    tenant = new_id()
    p, sibling = payment(tenant), payment(tenant)
    created = [refund(p, 100 + i, created=NOW + timedelta(seconds=i)) for i in range(5)]
    await store(uow, p, sibling, *created, refund(sibling))
    seen: list[Refund] = []
    after = None
    pages = 0
    while True:
        async with uow() as u:
            page = await u.refunds.list(tenant, p.id, PageRequest(limit=2, after=after))
        seen.extend(page.items)
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert [r.id for r in seen] == [r.id for r in reversed(created)]
    assert seen[0] == created[-1]
    assert pages == 3
    async with uow() as u:
        assert len((await u.refunds.list(tenant, sibling.id, PageRequest())).items) == 1
        assert (await u.refunds.list(tenant, new_id(), PageRequest())).items == []


async def test_stale_pending_refunds_across_tenants_oldest_first(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    pa, pb = payment(a), payment(b)
    cutoff = NOW
    oldest = refund(pb, created=NOW - timedelta(hours=3))
    old = refund(pa, created=NOW - timedelta(hours=2))
    recent_enough = refund(pa, created=NOW - timedelta(seconds=1))
    at_cutoff = refund(pb, created=cutoff)
    fresh = refund(pa, created=NOW + timedelta(minutes=1))
    done = refund(pa, created=NOW - timedelta(hours=4))
    gone = refund(pb, created=NOW - timedelta(hours=5))
    await store(uow, pa, pb, recent_enough, at_cutoff, oldest, fresh, done, old, gone)
    async with uow() as u:
        await u.refunds.update(done.settled("re_1", NOW - timedelta(hours=4)))
        await u.refunds.update(
            gone.failed(Failure(reason=FailureReason.REFUND_REJECTED, message="no"), gone.updated_at)
        )
        await u.commit()
    async with uow() as u:
        found = await u.refunds.stale_pending(cutoff, 100)
        assert [r.id for r in found] == [oldest.id, old.id, recent_enough.id]
        assert found[0] == oldest
        assert [r.id for r in await u.refunds.stale_pending(cutoff, 1)] == [oldest.id]
        assert await u.refunds.stale_pending(NOW - timedelta(hours=6), 100) == []


# -- daily totals (analytics) -----------------------------------------------------------------------

# The last instant of a UTC day and the first of the next: the grouping must split them.
LAST_OF_DAY = datetime(2026, 2, 27, 23, 59, 59, 999999, tzinfo=UTC)
FIRST_OF_NEXT = datetime(2026, 2, 28, 0, 0, tzinfo=UTC)
DAY1, DAY2 = LAST_OF_DAY.date(), FIRST_OF_NEXT.date()
NEW_YORK = timezone(timedelta(hours=-5))
TOKYO = timezone(timedelta(hours=9))


def totals(rows: list[DailyTotal]) -> set[DailyTotal]:
    assert len(rows) == len(set(rows)), f"a group appears twice: {rows}"
    assert all(type(t.count) is int and type(t.amount) is int and type(t.status) is str for t in rows)
    return set(rows)


def total(day: date, currency: str, status: str, count: int, amount: int) -> DailyTotal:
    return DailyTotal(day=day, currency=currency, status=status, count=count, amount=amount)


async def daily(uow: UowFactory, tenant_id: uuid.UUID, start: datetime, end: datetime) -> tuple[set[DailyTotal], ...]:
    async with uow() as u:
        return (
            totals(await u.payments.daily_totals(tenant_id, start, end)),
            totals(await u.refunds.daily_totals(tenant_id, start, end)),
        )


async def test_daily_totals_group_payments_by_utc_day_currency_and_status(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    late = payment(a, amount=100, created=LAST_OF_DAY)
    early = payment(a, amount=200, created=FIRST_OF_NEXT)
    late_usd = replace(payment(a, amount=300, created=LAST_OF_DAY - timedelta(hours=1)), currency="USD")
    late_won = payment(a, amount=400, created=LAST_OF_DAY - timedelta(hours=2))
    late_lost = payment(a, amount=500, created=LAST_OF_DAY - timedelta(hours=3))
    # 20:00 in New York on the 27th is 01:00 UTC on the 28th; 08:00 in Tokyo on the 28th is 23:00 UTC on the 27th.
    ny = payment(a, amount=600, created=datetime(2026, 2, 27, 20, 0, tzinfo=NEW_YORK))
    tokyo = payment(a, amount=700, created=datetime(2026, 2, 28, 8, 0, tzinfo=TOKYO))
    foreign = payment(b, amount=10_000, created=LAST_OF_DAY)
    await store(uow, late, early, late_usd, late_won, late_lost, ny, tokyo, foreign)
    async with uow() as u:
        assert await u.payments.save(succeeded(late_won))
        declined = Failure(reason=FailureReason.CARD_DECLINED, message="declined")
        assert await u.payments.save(late_lost.fail(declined, NOW))
        await u.commit()

    start, end = datetime(2026, 2, 27, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)
    pays, refunds = await daily(uow, a, start, end)
    assert pays == {
        total(DAY1, "EUR", "pending", 2, 100 + 700),
        total(DAY1, "USD", "pending", 1, 300),
        total(DAY1, "EUR", "succeeded", 1, 400),
        total(DAY1, "EUR", "failed", 1, 500),
        total(DAY2, "EUR", "pending", 2, 200 + 600),
    }
    assert refunds == set()
    assert (await daily(uow, b, start, end))[0] == {total(DAY1, "EUR", "pending", 1, 10_000)}
    assert await daily(uow, new_id(), start, end) == (set(), set())


async def test_daily_totals_take_a_half_open_range_in_any_offset(uow: UowFactory) -> None:
    tenant = new_id()
    await store(uow, payment(tenant, amount=1, created=LAST_OF_DAY), payment(tenant, amount=2, created=FIRST_OF_NEXT))
    day2_only = {total(DAY2, "EUR", "pending", 1, 2)}
    day1_only = {total(DAY1, "EUR", "pending", 1, 1)}
    # [start, end): the start is in, the end is out.
    assert (await daily(uow, tenant, FIRST_OF_NEXT, FIRST_OF_NEXT + timedelta(days=1)))[0] == day2_only
    assert (await daily(uow, tenant, FIRST_OF_NEXT - timedelta(days=1), FIRST_OF_NEXT))[0] == day1_only
    assert (await daily(uow, tenant, LAST_OF_DAY, FIRST_OF_NEXT))[0] == day1_only
    assert (await daily(uow, tenant, LAST_OF_DAY + timedelta(microseconds=1), FIRST_OF_NEXT))[0] == set()
    # Bounds compare instants: midnight UTC given as 19:00 the day before in New York.
    shifted = (FIRST_OF_NEXT.astimezone(NEW_YORK), (FIRST_OF_NEXT + timedelta(days=1)).astimezone(TOKYO))
    assert (await daily(uow, tenant, *shifted))[0] == day2_only
    assert (await daily(uow, tenant, FIRST_OF_NEXT, FIRST_OF_NEXT))[0] == set()


async def test_daily_totals_sum_large_amounts(uow: UowFactory) -> None:
    tenant = new_id()
    big = [replace(payment(tenant, amount=2_000_000_000, created=NOW), currency="JPY") for _ in range(3)]
    await store(uow, *big)
    pays, _ = await daily(uow, tenant, NOW - timedelta(hours=1), NOW + timedelta(hours=1))
    assert pays == {total(NOW.date(), "JPY", "pending", 3, 6_000_000_000)}


async def test_daily_totals_group_refunds_by_their_own_creation_day_and_status(uow: UowFactory) -> None:
    a, b = new_id(), new_id()
    # A payment of the 27th refunded on the 28th: the refund counts on the 28th.
    p = succeeded(payment(a, amount=5000, created=LAST_OF_DAY - timedelta(days=1)))
    usd = replace(succeeded(payment(a, amount=5000, created=LAST_OF_DAY - timedelta(days=1))), currency="USD")
    r_late = refund(p, 100, created=LAST_OF_DAY)
    r_early = refund(p, 200, created=FIRST_OF_NEXT)
    r_ok = refund(p, 300, created=FIRST_OF_NEXT + timedelta(hours=1))
    r_bad = refund(p, 400, created=FIRST_OF_NEXT + timedelta(hours=2))
    r_usd = refund(usd, 500, created=datetime(2026, 2, 28, 8, 0, tzinfo=TOKYO))  # 23:00 UTC on the 27th
    foreign = refund(payment(b), 600, created=FIRST_OF_NEXT)
    await store(uow, p, usd, r_late, r_early, r_ok, r_bad, r_usd, foreign)
    async with uow() as u:
        await u.refunds.update(r_ok.settled("re_1", NOW))
        await u.refunds.update(r_bad.failed(Failure(reason=FailureReason.REFUND_REJECTED, message="no"), NOW))
        await u.commit()
    start, end = datetime(2026, 2, 27, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)
    pays, refunds = await daily(uow, a, start, end)
    assert refunds == {
        total(DAY1, "EUR", "pending", 1, 100),
        total(DAY1, "USD", "pending", 1, 500),
        total(DAY2, "EUR", "pending", 1, 200),
        total(DAY2, "EUR", "succeeded", 1, 300),
        total(DAY2, "EUR", "failed", 1, 400),
    }
    # The payments themselves were created the day before.
    assert pays == set()
    assert (await daily(uow, b, start, end))[1] == {total(DAY2, "EUR", "pending", 1, 600)}
    # Half-open here too.
    assert (await daily(uow, a, FIRST_OF_NEXT, FIRST_OF_NEXT + timedelta(hours=1)))[1] == {
        total(DAY2, "EUR", "pending", 1, 200)
    }
