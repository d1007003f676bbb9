"""The analytics use cases, driven through the in-memory fakes: real payments and accounts services
(their ``public`` statistics over in-memory state), the real read-through cache over the in-memory
cache, a manual clock, and a recording job queue.

Jobs are recorded, not run: a test "runs" a rollup by calling ``rollup`` with the job's arguments, and
"relays" committed events by handing the outboxes to ``on_event``, which makes the order of every
change, event and recomputation explicit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from keel.contexts.accounts.domain.commands import CreateUser, Signup
from keel.contexts.accounts.domain.model import Tenant, TenantConfig
from keel.contexts.accounts.domain.services import AccountsService
from keel.contexts.accounts.public import AccountsDirectory
from keel.contexts.analytics.adapters.jobs import job_specs
from keel.contexts.analytics.adapters.memory.tally import InMemoryRequestTally
from keel.contexts.analytics.domain import caching
from keel.contexts.analytics.domain.errors import InvalidRange
from keel.contexts.analytics.domain.model import (
    DEFAULT_SUMMARY_DAYS,
    MAX_ROLLUP_DAYS,
    MAX_SUMMARY_DAYS,
    DayFigures,
    Figures,
    Metric,
    MoneyFigure,
    Summary,
)
from keel.contexts.analytics.domain.services import (
    RECOMPUTE_AFTER,
    ROLLUP_JOB,
    TRIGGERS,
    AnalyticsService,
    rollup_job_id,
)
from keel.contexts.analytics.ports.repositories import RequestCounts
from keel.contexts.payments.domain.commands import CreatePayment, CreateRefund
from keel.contexts.payments.domain.model import Payment
from keel.contexts.payments.domain.services import PaymentsService
from keel.contexts.payments.public import DailyTotal, PaymentsDirectory
from keel.platform.adapters.memory.cache import InMemoryCache
from keel.platform.cache import ReadThroughCache
from keel.platform.domain.errors import InvalidInput
from keel.platform.domain.events import Event
from keel.platform.domain.tenancy import Principal
from tests.fakes.accounts import AccountsState, accounts_service
from tests.fakes.analytics import AnalyticsState, InMemoryAnalyticsUnitOfWork
from tests.fakes.clock import ManualClock
from tests.fakes.payments import DECLINED, SUCCEEDS, FakePaymentProvider, PaymentsState, payments_service
from tests.fakes.webhooks import Enqueued, RecordingJobQueue

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
TODAY = NOW.date()


def ago(days: int) -> date:
    return TODAY - timedelta(days=days)


class CountingPayments:
    """The payments directory, counting the statistics queries (each one is a live computation)."""

    def __init__(self, directory: PaymentsDirectory) -> None:
        self._directory = directory
        self.calls: list[tuple[datetime, datetime]] = []

    async def daily_totals(
        self, tenant_id: uuid.UUID, start: datetime, end: datetime
    ) -> tuple[list[DailyTotal], list[DailyTotal]]:
        self.calls.append((start, end))
        payments, refunds = await self._directory.daily_totals(tenant_id, start, end)
        return list(payments), list(refunds)


class FlakyDoneTally(InMemoryRequestTally):
    """The flush job dies after its commit and before ``done`` reaches the tally, ``lose`` times."""

    def __init__(self) -> None:
        super().__init__()
        self.lose = 0
        self.done_calls: list[str] = []

    async def done(self, batch_id: str) -> None:
        self.done_calls.append(batch_id)
        if self.lose:
            self.lose -= 1
            raise ConnectionError("the flush job died before telling the tally")
        await super().done(batch_id)


@dataclass
class World:
    clock: ManualClock
    payments: PaymentsService
    payments_state: PaymentsState
    accounts: AccountsService
    accounts_state: AccountsState
    analytics_state: AnalyticsState
    statistics: CountingPayments
    tally: FlakyDoneTally
    jobs: RecordingJobQueue
    store: InMemoryCache
    cache: ReadThroughCache
    service: AnalyticsService
    relayed: dict[str, int] = field(default_factory=lambda: {"payments": 0, "accounts": 0})
    ran: int = 0

    def travel(self, to: datetime) -> None:
        self.clock.advance(seconds=(to - self.clock.now()).total_seconds())

    async def signup(self, org: str = "Acme") -> Principal:
        result = await self.accounts.signup(
            Signup(organization=org, owner_email=f"owner@{org.lower()}.test", owner_name="Olivia")
        )
        return Principal(tenant_id=result.tenant.id, api_key_id=result.api_key.key.id)

    async def pay(
        self, who: Principal, amount: int, *, currency: str = "EUR", method: str | None = SUCCEEDS
    ) -> Payment:
        """A payment created now; captured (``method`` decides the outcome) unless ``method`` is None."""
        accepted = await self.payments.create_payment(
            who, CreatePayment(amount=amount, currency=currency, payment_method=method or SUCCEEDS)
        )
        if method is not None:
            await self.payments.capture(who.tenant_id, accepted.value.id)
        return accepted.value

    async def refund(self, who: Principal, payment: Payment, amount: int, *, settle: bool = True) -> uuid.UUID:
        accepted = await self.payments.request_refund(who, payment.id, CreateRefund(amount=amount))
        if settle:
            await self.payments.refund(who.tenant_id, accepted.value.id)
        return accepted.value.id

    async def relay(self) -> list[Event]:
        """Hand the events committed since the last relay to analytics, as the outbox relay does."""
        delivered: list[Event] = []
        for name, outbox in (("payments", self.payments_state.outbox), ("accounts", self.accounts_state.outbox)):
            fresh = outbox[self.relayed[name] :]
            self.relayed[name] = len(outbox)
            for e in fresh:
                if e.type in TRIGGERS:
                    await self.service.on_event(e)
                    delivered.append(e)
        return delivered

    def rollup_jobs(self) -> list[Enqueued]:
        return [j for j in self.jobs.jobs if j.name == ROLLUP_JOB]

    async def run_rollups(self) -> int:
        """Run the rollup jobs enqueued since the last run; returns the days they rolled up."""
        pending, self.ran = self.jobs.jobs[self.ran :], len(self.jobs.jobs)
        days = 0
        for j in pending:
            if j.name == ROLLUP_JOB:
                a = j.args
                days += await self.service.rollup(
                    uuid.UUID(a["tenant_id"]), date.fromisoformat(a["from"]), date.fromisoformat(a["to"])
                )
        return days

    async def generation(self, tenant: Principal, scope: caching.Scope) -> bytes | None:
        return await self.store.get(caching.generation_key(tenant.tenant_id, scope))

    async def stored(self, tenant: Principal, start: date, end: date) -> tuple[set[Any], set[date]]:
        async with InMemoryAnalyticsUnitOfWork(self.analytics_state) as uow:
            return (
                set(await uow.rollups.figures(tenant.tenant_id, start, end)),
                await uow.rollups.rolled_up(tenant.tenant_id, start, end),
            )


@pytest.fixture
def world() -> World:
    clock = ManualClock(NOW)
    payments_state, accounts_state, analytics_state = PaymentsState(), AccountsState(), AnalyticsState()
    payments = payments_service(payments_state, FakePaymentProvider(), RecordingJobQueue(), clock)
    accounts = accounts_service(accounts_state, clock)
    statistics = CountingPayments(PaymentsDirectory(payments))
    tally = FlakyDoneTally()
    jobs = RecordingJobQueue()
    store = InMemoryCache(clock)
    cache = ReadThroughCache(store)
    service = AnalyticsService(
        lambda: InMemoryAnalyticsUnitOfWork(analytics_state),
        statistics,
        AccountsDirectory(accounts),
        tally,
        jobs,
        cache,
        clock,
    )
    return World(
        clock=clock,
        payments=payments,
        payments_state=payments_state,
        accounts=accounts,
        accounts_state=accounts_state,
        analytics_state=analytics_state,
        statistics=statistics,
        tally=tally,
        jobs=jobs,
        store=store,
        cache=cache,
        service=service,
    )


def m(currency: str, status: str, count: int, amount: int) -> MoneyFigure:
    return MoneyFigure(currency=currency, status=status, count=count, amount=amount)


def day_of(summary: Summary, day: date) -> DayFigures:
    return next(d for d in summary.days if d.day == day)


def plain(d: DayFigures) -> tuple[Any, ...]:
    """A day's figures without the ``rolled_up`` flag: rolled-up and live figures must agree."""
    return (d.day, d.payments, d.refunds, d.new_users, d.api_requests)


# -- the summary: ranges --------------------------------------------------------------------------


async def test_the_default_summary_is_the_30_days_ending_today(world: World) -> None:
    acme = await world.signup()
    s = await world.service.summary(acme)
    assert (s.start, s.end, s.currency) == (ago(DEFAULT_SUMMARY_DAYS - 1), TODAY, None)
    assert [d.day for d in s.days] == [ago(29 - i) for i in range(30)]
    assert s.generated_at == NOW
    # The owner signed up today: the one new user.
    assert s.totals == Figures(payments=[], refunds=[], new_users=1, api_requests=0)
    assert day_of(s, TODAY).new_users == 1


async def test_a_missing_end_of_the_range_follows_from_the_other(world: World) -> None:
    acme = await world.signup()
    s = await world.service.summary(acme, start=ago(100))
    assert (s.start, s.end) == (ago(100), ago(71))
    s = await world.service.summary(acme, start=ago(5))
    assert (s.start, s.end) == (ago(5), TODAY)  # never past today
    s = await world.service.summary(acme, end=ago(3))
    assert (s.start, s.end) == (ago(32), ago(3))
    s = await world.service.summary(acme, start=TODAY, end=TODAY)
    assert [d.day for d in s.days] == [TODAY]


@pytest.mark.parametrize(
    ("start", "end", "pointer"),
    [
        (TODAY + timedelta(days=1), None, "#/from"),
        (TODAY + timedelta(days=1), TODAY + timedelta(days=2), "#/from"),
        (ago(2), ago(3), "#/from"),
        (ago(3), TODAY + timedelta(days=1), "#/to"),
        (None, TODAY + timedelta(days=1), "#/to"),
        (ago(MAX_SUMMARY_DAYS), TODAY, "#/from"),  # 367 days
        (None, date.min, "#/from"),  # the default start would be before year 1
        (date.max, None, "#/from"),
        (date.max, date.max, "#/from"),
    ],
)
async def test_summary_ranges_it_cannot_take_name_the_field(
    world: World, start: date | None, end: date | None, pointer: str
) -> None:
    acme = await world.signup()
    with pytest.raises(InvalidRange) as caught:
        await world.service.summary(acme, start, end)
    assert caught.value.pointer == pointer
    assert isinstance(caught.value, InvalidInput)  # reported as a 422
    assert world.statistics.calls == []


async def test_the_longest_summary_is_366_days(world: World) -> None:
    acme = await world.signup()
    s = await world.service.summary(acme, ago(MAX_SUMMARY_DAYS - 1), TODAY)
    assert len(s.days) == MAX_SUMMARY_DAYS
    # Live days are read in one run (one query per run of consecutive days, not one per day).
    assert world.statistics.calls == [(datetime(2025, 3, 10, tzinfo=UTC), datetime(2026, 3, 11, tzinfo=UTC))]


async def test_an_unknown_currency_is_refused_and_a_known_one_normalized(world: World) -> None:
    acme = await world.signup()
    for bad in ("XYZ", "EU", "€", ""):
        with pytest.raises(InvalidInput) as caught:
            await world.service.summary(acme, currency=bad)
        assert caught.value.pointer == "#/currency"
    assert (await world.service.summary(acme, currency="eur")).currency == "EUR"


# -- the summary: live figures ----------------------------------------------------------------------


async def test_today_is_computed_live_from_payments_refunds_and_users(world: World) -> None:
    acme, globex = await world.signup("Acme"), await world.signup("Globex")
    big = await world.pay(acme, 5000)
    await world.pay(acme, 700)
    await world.pay(acme, 300, currency="usd")
    await world.pay(acme, 999, method=DECLINED)
    await world.pay(acme, 111, method=None)
    await world.refund(acme, big, 1200)
    await world.refund(acme, big, 800, settle=False)
    await world.accounts.create_user(acme, CreateUser(email="ann@acme.test", name="Ann"))
    await world.pay(globex, 100_000)  # another tenant's

    s = await world.service.summary(acme, ago(1), TODAY)
    today = day_of(s, TODAY)
    assert today.rolled_up is False
    assert today.payments == [
        m("EUR", "failed", 1, 999),
        # Counted by *current* status: the refunded payment is partially refunded now.
        m("EUR", "partially_refunded", 1, 5000),
        m("EUR", "pending", 1, 111),
        m("EUR", "succeeded", 1, 700),
        m("USD", "succeeded", 1, 300),
    ]
    assert today.refunds == [m("EUR", "pending", 1, 800), m("EUR", "succeeded", 1, 1200)]
    assert (today.new_users, today.api_requests) == (2, 0)
    assert s.totals.payments == today.payments
    assert day_of(s, ago(1)) == DayFigures(
        day=ago(1), rolled_up=False, payments=[], refunds=[], new_users=0, api_requests=0
    )
    usd = await world.service.summary(acme, ago(1), TODAY, "USD")
    assert (usd.totals.payments, usd.totals.refunds, usd.totals.new_users) == ([m("USD", "succeeded", 1, 300)], [], 2)


async def test_a_deleted_user_leaves_the_day_they_were_created(world: World) -> None:
    acme = await world.signup()
    world.travel(NOW - timedelta(days=3))
    ann = await world.accounts.create_user(acme, CreateUser(email="ann@acme.test", name="Ann"))
    await world.accounts.create_user(acme, CreateUser(email="bob@acme.test", name="Bob"))
    world.travel(NOW)
    assert day_of(await world.service.summary(acme, ago(3), ago(3)), ago(3)).new_users == 2
    await world.accounts.delete_user(acme, ann.id)
    await world.relay()
    assert day_of(await world.service.summary(acme, ago(3), ago(3)), ago(3)).new_users == 1


# -- rollups --------------------------------------------------------------------------------------


async def make_history(world: World, acme: Principal) -> Payment:
    """Activity three days ago (a pending payment among it) and today."""
    world.travel(NOW - timedelta(days=3))
    paid = await world.pay(acme, 4000)
    await world.pay(acme, 1500, currency="GBP")
    pending = await world.pay(acme, 250, method=None)
    await world.refund(acme, paid, 1000)
    await world.accounts.create_user(acme, CreateUser(email="ann@acme.test", name="Ann"))
    world.travel(NOW)
    await world.pay(acme, 10)
    return pending


async def test_a_rollup_stores_closed_days_with_the_figures_computed_live(world: World) -> None:
    acme = await world.signup()
    await make_history(world, acme)
    live = await world.service.summary(acme, ago(4), TODAY)
    assert not any(d.rolled_up for d in live.days)

    assert await world.service.rollup(acme.tenant_id, ago(4), ago(1)) == 4
    figures, rolled = await world.stored(acme, ago(4), TODAY)
    assert rolled == {ago(4), ago(3), ago(2), ago(1)}
    assert {f.metric for f in figures} == {Metric.PAYMENTS, Metric.REFUNDS, Metric.NEW_USERS}
    assert {f.day for f in figures} == {ago(3)}  # empty days store no figures, yet count as rolled up

    after = await world.service.summary(acme, ago(4), TODAY)
    assert [d.rolled_up for d in after.days] == [True, True, True, True, False]
    assert [plain(d) for d in after.days] == [plain(d) for d in live.days]
    assert after.totals == live.totals
    three = day_of(after, ago(3))
    assert three.payments == [
        m("EUR", "partially_refunded", 1, 4000),
        m("EUR", "pending", 1, 250),
        m("GBP", "succeeded", 1, 1500),
    ]
    assert (three.refunds, three.new_users) == ([m("EUR", "succeeded", 1, 1000)], 1)
    # Rolled-up days are read from storage: only today is computed live now.
    world.statistics.calls.clear()
    await world.service.summary(acme, ago(4), TODAY, "GBP")
    assert world.statistics.calls == [(datetime(2026, 3, 10, tzinfo=UTC), datetime(2026, 3, 11, tzinfo=UTC))]


async def test_a_rollup_is_idempotent_and_a_recomputation_sees_changed_data(world: World) -> None:
    acme = await world.signup()
    pending = await make_history(world, acme)
    await world.service.rollup(acme.tenant_id, ago(3), ago(3))
    first = await world.stored(acme, ago(3), ago(3))
    assert await world.service.rollup(acme.tenant_id, ago(3), ago(3)) == 1
    assert await world.stored(acme, ago(3), ago(3)) == first

    # The pending payment of three days ago settles today; until the day is rolled up again the
    # stored figures stand.
    await world.payments.capture(acme.tenant_id, pending.id)
    stale = day_of(await world.service.summary(acme, ago(3), ago(3)), ago(3))
    assert m("EUR", "pending", 1, 250) in stale.payments
    await world.service.rollup(acme.tenant_id, ago(3), ago(3))
    fresh = day_of(await world.service.summary(acme, ago(3), ago(3)), ago(3))
    assert fresh.rolled_up is True
    assert fresh.payments == [
        m("EUR", "partially_refunded", 1, 4000),
        m("EUR", "succeeded", 1, 250),
        m("GBP", "succeeded", 1, 1500),
    ]


async def test_a_rollup_never_rolls_today(world: World) -> None:
    acme = await world.signup()
    await make_history(world, acme)
    await world.service.summary(acme)
    history = await world.generation(acme, "history")
    assert history is not None
    # Today alone: nothing to do, and nothing invalidated.
    assert await world.service.rollup(acme.tenant_id, TODAY, TODAY) == 0
    assert await world.service.rollup(acme.tenant_id, TODAY, TODAY + timedelta(days=5)) == 0
    assert await world.generation(acme, "history") == history
    assert (await world.stored(acme, TODAY, TODAY + timedelta(days=5)))[1] == set()
    # A range reaching today stops at yesterday.
    assert await world.service.rollup(acme.tenant_id, ago(2), TODAY) == 2
    assert (await world.stored(acme, ago(2), TODAY))[1] == {ago(2), ago(1)}
    assert await world.generation(acme, "history") is None  # the rollup replaced the history generation
    assert day_of(await world.service.summary(acme), TODAY).rolled_up is False


async def test_a_rollup_reports_its_progress_by_chunk(world: World) -> None:
    acme = await world.signup()
    seen: list[int] = []

    async def progress(percent: int) -> None:
        seen.append(percent)

    assert await world.service.rollup(acme.tenant_id, ago(40), ago(1), progress) == 40
    # Chunks of at most 31 days, each its own transaction.
    assert seen == [31 * 100 // 40, 100]
    assert len(world.statistics.calls) == 2
    seen.clear()
    assert await world.service.rollup(acme.tenant_id, ago(5), ago(1), progress) == 5
    assert seen == [100]


async def test_a_rollup_leaves_the_api_request_counts(world: World) -> None:
    acme = await world.signup()
    await world.tally.add({(acme.tenant_id, ago(2)): 7})
    assert await world.service.flush_requests() == 7
    await world.service.rollup(acme.tenant_id, ago(2), ago(2))
    s = await world.service.summary(acme, ago(2), ago(2))
    assert (s.totals.api_requests, s.days[0].rolled_up) == (7, True)


@pytest.mark.parametrize(
    ("start", "end", "pointer"),
    [
        (TODAY, TODAY, "#/from"),
        (ago(3), TODAY, "#/to"),
        (ago(1), ago(2), "#/from"),
        (ago(MAX_ROLLUP_DAYS + 1), ago(1), "#/from"),  # 93 days
        (date.min, ago(1), "#/from"),
    ],
)
async def test_a_rollup_request_refuses_ranges_it_cannot_take(
    world: World, start: date, end: date, pointer: str
) -> None:
    acme = await world.signup()
    with pytest.raises(InvalidRange) as caught:
        await world.service.request_rollup(acme, start, end)
    assert caught.value.pointer == pointer
    assert world.jobs.jobs == []


async def test_a_rollup_request_enqueues_a_job_for_the_tenant(world: World) -> None:
    acme = await world.signup()
    await make_history(world, acme)
    job_id = await world.service.request_rollup(acme, ago(MAX_ROLLUP_DAYS), ago(1))
    again = await world.service.request_rollup(acme, ago(MAX_ROLLUP_DAYS), ago(1))
    assert job_id != again  # each request is its own job
    uuid.UUID(job_id)
    [job, _] = world.rollup_jobs()
    assert (job.id, job.tenant_id, job.delay) == (job_id, acme.tenant_id, 0.0)
    assert job.args == {"tenant_id": str(acme.tenant_id), "from": ago(92).isoformat(), "to": ago(1).isoformat()}
    assert await world.run_rollups() == 2 * MAX_ROLLUP_DAYS


async def test_the_rollup_job_reports_days_and_progress(world: World) -> None:
    acme = await world.signup()
    spec = next(s for s in job_specs(world.service) if s.name == ROLLUP_JOB)

    @dataclass
    class Ctx:
        job_id: str = "j"
        attempt: int = 1
        progress: list[int] = field(default_factory=list)

        async def set_progress(self, percent: int) -> None:
            self.progress.append(percent)

    ctx = Ctx()
    args = {"tenant_id": str(acme.tenant_id), "from": ago(3).isoformat(), "to": ago(1).isoformat()}
    assert await spec.handler(ctx, args) == {"days": 3}
    assert ctx.progress == [100]
    assert (await world.stored(acme, ago(3), ago(1)))[1] == {ago(3), ago(2), ago(1)}


# -- the summary cache ----------------------------------------------------------------------------


async def test_a_second_summary_is_a_cache_hit(world: World) -> None:
    acme = await world.signup()
    await world.pay(acme, 100)
    first = await world.service.summary(acme, ago(6), TODAY)
    hits = world.cache.stats.hits
    calls = len(world.statistics.calls)
    second = await world.service.summary(acme, ago(6), TODAY)
    assert second == first
    assert len(world.statistics.calls) == calls
    assert world.cache.stats.hits > hits
    # Another range or currency is another entry.
    await world.service.summary(acme, ago(6), TODAY, "EUR")
    await world.service.summary(acme, ago(5), TODAY)
    assert len(world.statistics.calls) == calls + 2


async def test_summaries_are_cached_per_tenant(world: World) -> None:
    acme, globex = await world.signup("Acme"), await world.signup("Globex")
    await world.pay(acme, 100)
    assert (await world.service.summary(acme)).totals.payments == [m("EUR", "succeeded", 1, 100)]
    assert (await world.service.summary(globex)).totals.payments == []


async def test_an_event_of_today_invalidates_only_the_live_generation(world: World) -> None:
    acme = await world.signup()
    await world.relay()
    past = await world.service.summary(acme, ago(6), ago(1))
    current = await world.service.summary(acme, ago(6), TODAY)
    history, live = await world.generation(acme, "history"), await world.generation(acme, "live")
    assert history is not None
    assert live is not None

    await world.pay(acme, 100)
    # Until the event is relayed the cached summary stands (and the TTL bounds that).
    assert (await world.service.summary(acme, ago(6), TODAY)).totals.payments == []
    assert [e.type for e in await world.relay()] == ["payment.created", "payment.succeeded"]
    assert await world.generation(acme, "live") is None
    assert await world.generation(acme, "history") == history
    assert world.rollup_jobs() == []  # today is never rolled up

    calls = len(world.statistics.calls)
    assert await world.service.summary(acme, ago(6), ago(1)) == past
    assert len(world.statistics.calls) == calls  # the past-only summary stayed cached
    fresh = await world.service.summary(acme, ago(6), TODAY)
    assert fresh != current
    assert fresh.totals.payments == [m("EUR", "succeeded", 1, 100)]


async def test_an_event_of_a_closed_day_invalidates_history_and_schedules_a_rollup(world: World) -> None:
    acme = await world.signup()
    pending = await make_history(world, acme)
    await world.relay()
    world.jobs.jobs.clear()
    await world.service.rollup(acme.tenant_id, ago(3), ago(1))
    past = await world.service.summary(acme, ago(3), ago(1))
    await world.service.summary(acme, ago(3), TODAY)
    live = await world.generation(acme, "live")
    assert live is not None

    # A payment of three days ago settles now.
    await world.payments.capture(acme.tenant_id, pending.id)
    [succeeded] = await world.relay()
    assert succeeded.type == "payment.succeeded"
    assert await world.generation(acme, "history") is None
    assert await world.generation(acme, "live") == live

    window = int(NOW.timestamp()) // RECOMPUTE_AFTER
    [job] = world.rollup_jobs()
    assert job.id == rollup_job_id("late", acme.tenant_id, ago(3), window)
    assert uuid.UUID(job.id).version == 5
    assert (job.tenant_id, job.delay) == (acme.tenant_id, RECOMPUTE_AFTER)
    assert job.args == {"tenant_id": str(acme.tenant_id), "from": ago(3).isoformat(), "to": ago(3).isoformat()}

    # The day is rolled up, so the summary still shows its stored figures until the job runs ...
    assert day_of(await world.service.summary(acme, ago(3), ago(1)), ago(3)).payments == day_of(past, ago(3)).payments
    # ... and the job's rollup replaces the history generation again.
    assert await world.run_rollups() == 1
    after = day_of(await world.service.summary(acme, ago(3), ago(1)), ago(3))
    assert m("EUR", "succeeded", 1, 250) in after.payments


async def test_late_changes_share_one_rollup_per_day_and_window(world: World) -> None:
    acme, globex = await world.signup("Acme"), await world.signup("Globex")
    world.travel(NOW - timedelta(days=2))
    a1 = await world.pay(acme, 100, method=None)
    a2 = await world.pay(acme, 200, method=None)
    g1 = await world.pay(globex, 300, method=None)
    a4 = await world.pay(acme, 500, method=None)
    world.travel(NOW - timedelta(days=1))
    a3 = await world.pay(acme, 400, method=None)
    # The start of a window, so that the next 29 seconds fall in it.
    start = datetime.fromtimestamp((int(NOW.timestamp()) // RECOMPUTE_AFTER) * RECOMPUTE_AFTER, UTC)
    world.travel(start)
    await world.relay()
    world.jobs.jobs.clear()

    await world.payments.capture(acme.tenant_id, a1.id)
    assert len(await world.relay()) == 1
    world.clock.advance(seconds=RECOMPUTE_AFTER - 1)
    await world.payments.capture(acme.tenant_id, a2.id)  # same tenant, day and window
    await world.payments.capture(globex.tenant_id, g1.id)  # same day and window, another tenant
    await world.payments.capture(acme.tenant_id, a3.id)  # same tenant and window, another day
    assert len(await world.relay()) == 3
    window = int(start.timestamp()) // RECOMPUTE_AFTER
    jobs = world.rollup_jobs()
    assert [j.id for j in jobs] == [
        rollup_job_id("late", acme.tenant_id, ago(2), window),
        rollup_job_id("late", globex.tenant_id, ago(2), window),
        rollup_job_id("late", acme.tenant_id, ago(1), window),
    ]
    assert all(j.delay == RECOMPUTE_AFTER for j in jobs)

    # The next window gets a run of its own: the first one may already be running.
    world.clock.advance(seconds=1)
    await world.payments.capture(acme.tenant_id, a4.id)
    await world.relay()
    assert len(world.rollup_jobs()) == 4
    assert world.rollup_jobs()[-1].id == rollup_job_id("late", acme.tenant_id, ago(2), window + 1)


async def test_a_refund_today_of_an_older_payment_invalidates_both_generations(world: World) -> None:
    acme = await world.signup()
    world.travel(NOW - timedelta(days=5))
    paid = await world.pay(acme, 1000)
    world.travel(NOW)
    await world.relay()
    world.jobs.jobs.clear()
    await world.service.summary(acme, ago(5), TODAY)
    await world.refund(acme, paid, 400)
    events = await world.relay()
    assert [e.type for e in events] == ["refund.created", "payment.refunded"]
    assert await world.generation(acme, "live") is None
    assert await world.generation(acme, "history") is None
    # Only the payment's day is re-rolled: the refund's day is today.
    assert [j.args["from"] for j in world.rollup_jobs()] == [ago(5).isoformat()]
    s = await world.service.summary(acme, ago(5), TODAY)
    assert day_of(s, ago(5)).payments == [m("EUR", "partially_refunded", 1, 1000)]
    assert day_of(s, TODAY).refunds == [m("EUR", "succeeded", 1, 400)]


async def test_events_of_another_tenant_leave_a_tenants_cache_alone(world: World) -> None:
    acme, globex = await world.signup("Acme"), await world.signup("Globex")
    await world.relay()
    await world.service.summary(acme)
    live = await world.generation(acme, "live")
    await world.pay(globex, 100)
    await world.relay()
    assert await world.generation(acme, "live") == live


# -- nightly --------------------------------------------------------------------------------------


async def test_nightly_enqueues_a_rollup_of_the_last_two_closed_days_per_tenant(world: World) -> None:
    tenants = [await world.signup(f"T{i}") for i in range(3)]
    world.jobs.jobs.clear()
    assert await world.service.nightly() == 3
    jobs = world.rollup_jobs()
    assert {j.tenant_id for j in jobs} == {t.tenant_id for t in tenants}
    assert len(jobs) == 3
    for j in jobs:
        assert j.args == {"tenant_id": str(j.tenant_id), "from": ago(2).isoformat(), "to": ago(1).isoformat()}
        assert j.id == rollup_job_id("nightly", j.tenant_id, TODAY)
        assert j.delay == 0
    # A second scheduler (or a retried nightly job) makes the same jobs.
    assert await world.service.nightly() == 3
    assert world.rollup_jobs() == jobs
    # The next night, new ones.
    world.clock.advance(days=1)
    await world.service.nightly()
    assert len(world.rollup_jobs()) == 6
    assert {j.args["from"] for j in world.rollup_jobs()[3:]} == {ago(1).isoformat()}


async def test_nightly_visits_every_tenant_page_by_page(world: World) -> None:
    ids = sorted(uuid.UUID(int=i * 7919 + 1) for i in range(1001))
    for tenant_id in ids:
        world.accounts_state.tenants[tenant_id] = Tenant(
            id=tenant_id,
            name="T",
            config=TenantConfig(display_name="T", timezone="UTC", locale="en"),
            created_at=NOW,
            updated_at=NOW,
        )
    assert await world.service.nightly() == 1001
    assert [j.tenant_id for j in world.rollup_jobs()] == ids


async def test_nightly_with_no_tenants_does_nothing(world: World) -> None:
    assert await world.service.nightly() == 0
    assert world.jobs.jobs == []


# -- API request counts -----------------------------------------------------------------------------


async def test_flush_stores_the_tallied_requests_once(world: World) -> None:
    acme, globex = await world.signup("Acme"), await world.signup("Globex")
    counts: RequestCounts = {(acme.tenant_id, TODAY): 5, (acme.tenant_id, ago(1)): 3, (globex.tenant_id, TODAY): 2}
    await world.tally.add(counts)
    assert await world.service.flush_requests() == 10
    assert await world.tally.take() is None
    s = await world.service.summary(acme, ago(1), TODAY)
    assert [d.api_requests for d in s.days] == [3, 5]
    assert s.totals.api_requests == 8
    assert (await world.service.summary(globex, ago(1), TODAY)).totals.api_requests == 2
    # Nothing left: nothing stored.
    assert await world.service.flush_requests() == 0
    await world.tally.add({(acme.tenant_id, TODAY): 1})
    assert await world.service.flush_requests() == 1
    assert (await world.service.summary(acme, TODAY, TODAY)).totals.api_requests == 6


async def test_a_flush_whose_done_was_lost_does_not_count_twice(world: World) -> None:
    acme = await world.signup()
    await world.tally.add({(acme.tenant_id, TODAY): 5})
    world.tally.lose = 1
    with pytest.raises(ConnectionError):
        await world.service.flush_requests()
    # The counts were committed; the tally still holds the claim.
    assert (await world.service.summary(acme, TODAY, TODAY)).totals.api_requests == 5
    await world.tally.add({(acme.tenant_id, TODAY): 2})  # counted meanwhile: the next batch
    assert await world.service.flush_requests() == 0  # the same batch again: already added
    assert world.tally.done_calls[0] == world.tally.done_calls[1]
    assert await world.service.flush_requests() == 2
    assert (await world.service.summary(acme, TODAY, TODAY)).totals.api_requests == 7


async def test_a_flush_invalidates_the_generation_of_the_days_it_counts(world: World) -> None:
    acme, globex = await world.signup("Acme"), await world.signup("Globex")
    for t in (acme, globex):
        await world.service.summary(t)
    gens = {(t.tenant_id, s): await world.generation(t, s) for t in (acme, globex) for s in ("live", "history")}
    assert all(gens.values())

    await world.tally.add({(acme.tenant_id, TODAY): 1})
    await world.service.flush_requests()
    assert await world.generation(acme, "live") is None
    assert await world.generation(acme, "history") == gens[(acme.tenant_id, "history")]
    assert await world.generation(globex, "live") == gens[(globex.tenant_id, "live")]
    assert (await world.service.summary(acme)).totals.api_requests == 1

    # Counts of yesterday flushed after midnight change a closed day.
    await world.tally.add({(globex.tenant_id, ago(1)): 4})
    await world.service.flush_requests()
    assert await world.generation(globex, "history") is None
    assert await world.generation(globex, "live") == gens[(globex.tenant_id, "live")]
    assert (await world.service.summary(globex, ago(1), ago(1))).totals.api_requests == 4


async def test_a_flush_forgets_batches_older_than_a_week(world: World) -> None:
    acme = await world.signup()
    await world.tally.add({(acme.tenant_id, TODAY): 1})
    await world.service.flush_requests()
    [old] = world.analytics_state.batches
    world.clock.advance(days=7, seconds=1)
    await world.tally.add({(acme.tenant_id, TODAY + timedelta(days=7)): 1})
    await world.service.flush_requests()
    assert old not in world.analytics_state.batches
    assert len(world.analytics_state.batches) == 1


async def test_an_empty_tally_is_not_flushed(world: World) -> None:
    assert await world.service.flush_requests() == 0
    assert world.analytics_state.batches == {}
    assert world.tally.done_calls == []
