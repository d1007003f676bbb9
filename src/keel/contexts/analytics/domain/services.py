"""Analytics use cases: daily rollups of the other contexts' activity, the cached summary that reads
them, and the bookkeeping that keeps both honest.

Closed days are rolled up (nightly, on demand, and again whenever a late event changes one); days no
rollup covers, today above all, are computed live from the other contexts' ``public`` statistics.
Every event that changes a summary's inputs replaces the tenant's cache generation (see ``caching``).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, date, datetime, timedelta

from keel.contexts.accounts.public import UserStatistics
from keel.contexts.analytics.domain import caching
from keel.contexts.analytics.domain.errors import InvalidRange
from keel.contexts.analytics.domain.model import (
    DEFAULT_SUMMARY_DAYS,
    MAX_ROLLUP_DAYS,
    MAX_SUMMARY_DAYS,
    Figure,
    Metric,
    Summary,
    day_start,
    days_of,
    runs,
    summarize,
)
from keel.contexts.analytics.ports.repositories import AnalyticsUnitOfWork
from keel.contexts.analytics.ports.tally import RequestTally
from keel.contexts.payments.public import DailyTotal, PaymentStatistics, normalize_currency
from keel.platform.cache import ReadThroughCache
from keel.platform.domain.errors import InvalidInput
from keel.platform.domain.events import Event
from keel.platform.domain.ids import new_id
from keel.platform.domain.tenancy import Principal
from keel.platform.ports.clock import Clock
from keel.platform.ports.jobs import JobQueue

ROLLUP_JOB = "analytics.rollup"
NIGHTLY_JOB = "analytics.rollup_nightly"
FLUSH_JOB = "analytics.flush_requests"

# Events that change a day's figures; each names the day (or days) it changes.
TRIGGERS = frozenset(
    {
        "payment.created",
        "payment.succeeded",
        "payment.failed",
        "payment.refunded",
        "payment.refund_failed",
        "refund.created",
        "user.created",
        "user.deleted",
    }
)
# A late change to a closed day is rolled up again after this long; changes meanwhile share the run.
RECOMPUTE_AFTER = 30
NIGHTLY_DAYS = 2  # yesterday, and the day before for schedulers east of UTC and late settlements
_TENANT_PAGE = 500
_BATCHES_KEPT = timedelta(days=7)
_JOB_NAMESPACE = uuid.UUID("6c1bd0a4-3f8e-4d0b-9f55-2f7f6f6f0a11")

Progress = Callable[[int], Awaitable[None]]


def rollup_job_id(*parts: object) -> str:
    """A job id that follows from what the job does, so two schedulers (or a replayed event) make one job."""
    return str(uuid.uuid5(_JOB_NAMESPACE, ":".join(map(str, parts))))


def _utc_day(at: datetime) -> date:
    return (at.astimezone(UTC) if at.tzinfo else at).date()


def _day_of(value: object, fallback: datetime) -> date:
    """The UTC day of an event's ISO timestamp (events recorded before the field existed: the event's own day)."""
    if isinstance(value, str):
        try:
            return _utc_day(datetime.fromisoformat(value))
        except ValueError:
            pass
    return _utc_day(fallback)


def affected_days(event: Event) -> set[date]:
    data, at = event.data, event.occurred_at
    if event.type.startswith("payment."):
        days = {_day_of(data.get("created_at"), at)}
        if "refund_id" in data:
            days.add(_day_of(data.get("refund_created_at"), at))
        return days
    if event.type == "refund.created":
        return {_utc_day(at)}  # a new pending refund; the payment's figures do not change
    if event.type == "user.deleted":
        return {_day_of(data.get("created_at"), at)}
    return {_utc_day(at)}


def _money(metric: Metric, totals: Iterable[DailyTotal]) -> list[Figure]:
    return [
        Figure(day=t.day, metric=metric, currency=t.currency, status=t.status, count=t.count, amount=t.amount)
        for t in totals
    ]


class AnalyticsService:
    def __init__(
        self,
        uow: Callable[[], AnalyticsUnitOfWork],
        payments: PaymentStatistics,
        users: UserStatistics,
        tally: RequestTally,
        jobs: JobQueue,
        cache: ReadThroughCache,
        clock: Clock,
    ) -> None:
        self._uow = uow
        self._payments = payments
        self._users = users
        self._tally = tally
        self._jobs = jobs
        self._cache = cache
        self._clock = clock

    def _today(self) -> date:
        return self._clock.now().date()

    # -- the summary ----------------------------------------------------------------------------

    async def summary(
        self, who: Principal, start: date | None = None, end: date | None = None, currency: str | None = None
    ) -> Summary:
        today = self._today()
        default_span = timedelta(days=DEFAULT_SUMMARY_DAYS - 1)
        try:
            end = end or (min(today, start + default_span) if start else today)
            start = start or end - default_span
        except OverflowError:  # a range at the very edge of the calendar
            raise InvalidRange("The range is outside the calendar.", pointer="#/from") from None
        _check_range(start, end, today, MAX_SUMMARY_DAYS, last_allowed=today)
        code = None
        if currency is not None:
            code = normalize_currency(currency)
            if code is None:
                raise InvalidInput(f"Unknown currency {currency!r}; use an ISO 4217 code.", pointer="#/currency")
        tenant = who.tenant_id
        history = await self._generation(tenant, "history")
        live = await self._generation(tenant, "live") if end >= today else None

        async def load() -> Summary:
            return await self._compute(tenant, start, end, code)

        key = caching.summary_key(tenant, history, live, start, end, code)
        summary = await self._cache.get_or_load(key, Summary, load, caching.SUMMARY_TTL)
        assert summary is not None  # the loader always returns one
        return summary

    async def _generation(self, tenant_id: uuid.UUID, scope: caching.Scope) -> str:
        async def new() -> str:
            return new_id().hex

        token = await self._cache.get_or_load(
            caching.generation_key(tenant_id, scope), str, new, caching.GENERATION_TTL
        )
        assert token is not None
        return token

    async def _compute(self, tenant_id: uuid.UUID, start: date, end: date, currency: str | None) -> Summary:
        # Generations were read before this, so a change committed from here on replaces them and
        # this result is never served as current.
        async with self._uow() as uow:
            # Days first: a rollup committing between the two reads then only adds figures this
            # computation ignores (it computes those days live), never marks a day whose figures it missed.
            rolled = await uow.rollups.rolled_up(tenant_id, start, end)
            stored = await uow.rollups.figures(tenant_id, start, end)
        figures = [f for f in stored if f.metric is Metric.API_REQUESTS or f.day in rolled]
        for first, last in runs(set(days_of(start, end)) - rolled):
            figures += await self._live(tenant_id, first, last)
        return summarize(figures, start, end, currency, rolled, self._clock.now())

    async def _live(self, tenant_id: uuid.UUID, first: date, last: date) -> list[Figure]:
        """The recomputed metrics of ``first`` to ``last``, from the other contexts."""
        since, until = day_start(first), day_start(last + timedelta(days=1))
        payments, refunds = await self._payments.daily_totals(tenant_id, since, until)
        users = await self._users.daily_new_users(tenant_id, since, until)
        return [
            *_money(Metric.PAYMENTS, payments),
            *_money(Metric.REFUNDS, refunds),
            *(Figure(day=d, metric=Metric.NEW_USERS, count=n) for d, n in users),
        ]

    # -- rollups --------------------------------------------------------------------------------

    async def request_rollup(self, who: Principal, start: date, end: date) -> str:
        """Recompute ``start`` to ``end`` (closed days) in a job; returns its id."""
        today = self._today()
        _check_range(start, end, today, MAX_ROLLUP_DAYS, last_allowed=today - timedelta(days=1))
        args = {"tenant_id": str(who.tenant_id), "from": start.isoformat(), "to": end.isoformat()}
        return await self._jobs.enqueue(ROLLUP_JOB, args, tenant_id=who.tenant_id, job_id=str(new_id()))

    async def rollup(self, tenant_id: uuid.UUID, start: date, end: date, progress: Progress | None = None) -> int:
        """Recompute and store the figures of each closed day from ``start`` to ``end``; idempotent
        (a day's figures are replaced). Returns how many days were rolled up."""
        end = min(end, self._today() - timedelta(days=1))  # today stays live
        days = days_of(start, end) if start <= end else []
        done = 0
        for first, last in runs(days):
            # A bounded chunk per transaction keeps each one short; ``MAX_ROLLUP_DAYS`` bounds the total.
            chunk_start = first
            while chunk_start <= last:
                chunk_end = min(last, chunk_start + timedelta(days=30))
                figures = await self._live(tenant_id, chunk_start, chunk_end)
                by_day: dict[date, list[Figure]] = {d: [] for d in days_of(chunk_start, chunk_end)}
                for f in figures:
                    by_day[f.day].append(f)
                now = self._clock.now()
                async with self._uow() as uow:
                    for day, day_figures in by_day.items():
                        await uow.rollups.replace_day(tenant_id, day, day_figures, now)
                    await uow.commit()
                done += len(by_day)
                if progress is not None:
                    await progress(done * 100 // len(days))
                chunk_start = chunk_end + timedelta(days=1)
        if done:
            await self._cache.invalidate(caching.generation_key(tenant_id, "history"))
        return done

    async def nightly(self) -> int:
        """Enqueue a rollup of the last closed days for every tenant; returns how many tenants."""
        today = self._today()
        start, end = today - timedelta(days=NIGHTLY_DAYS), today - timedelta(days=1)
        count, after = 0, None
        while True:
            page = await self._users.tenant_ids(after, _TENANT_PAGE)
            for tenant_id in page:
                args = {"tenant_id": str(tenant_id), "from": start.isoformat(), "to": end.isoformat()}
                job_id = rollup_job_id("nightly", tenant_id, today)
                await self._jobs.enqueue(ROLLUP_JOB, args, tenant_id=tenant_id, job_id=job_id)
            count += len(page)
            if len(page) < _TENANT_PAGE:
                return count
            after = page[-1]

    # -- events and request counts --------------------------------------------------------------

    async def on_event(self, event: Event) -> None:
        """A change to some day's figures: today's summaries go stale at once; a closed day is rolled
        up again shortly (bursts of late changes share one run)."""
        today = self._today()
        scopes: set[caching.Scope] = set()
        for day in affected_days(event):
            if day >= today:
                scopes.add("live")
                continue
            scopes.add("history")
            # One job per day per window, delayed past the window's end, so every change handled in
            # the window (all committed before it was handled) is in the run.
            window = int(self._clock.now().timestamp()) // RECOMPUTE_AFTER
            args = {"tenant_id": str(event.tenant_id), "from": day.isoformat(), "to": day.isoformat()}
            await self._jobs.enqueue(
                ROLLUP_JOB,
                args,
                tenant_id=event.tenant_id,
                delay=RECOMPUTE_AFTER,
                job_id=rollup_job_id("late", event.tenant_id, day, window),
            )
        await self._invalidate(event.tenant_id, scopes)

    async def _invalidate(self, tenant_id: uuid.UUID, scopes: Iterable[caching.Scope]) -> None:
        keys = [caching.generation_key(tenant_id, s) for s in sorted(scopes)]
        if keys:
            await self._cache.invalidate(*keys)

    async def flush_requests(self) -> int:
        """Store the request counts the API processes tallied; returns how many requests."""
        batch = await self._tally.take()
        if batch is None:
            return 0
        now = self._clock.now()
        async with self._uow() as uow:
            added = await uow.rollups.add_requests(batch.id, batch.counts, now)
            await uow.rollups.forget_batches(now - _BATCHES_KEPT)
            await uow.commit()
        await self._tally.done(batch.id)
        today = now.date()
        for tenant_id in {t for t, _ in batch.counts}:
            days = [d for t, d in batch.counts if t == tenant_id]
            await self._invalidate(tenant_id, {"live" if d >= today else "history" for d in days})
        return sum(batch.counts.values()) if added else 0


def _check_range(start: date, end: date, today: date, longest: int, *, last_allowed: date) -> None:
    if start > last_allowed:
        raise InvalidRange(
            f"`from` must not be after {last_allowed.isoformat()} (today is {today} UTC).", pointer="#/from"
        )
    if start > end:
        raise InvalidRange("`from` must not be after `to`.", pointer="#/from")
    if end > last_allowed:
        detail = (
            f"`to` must not be after {last_allowed.isoformat()} (today, {today.isoformat()} UTC, is computed live)."
            if last_allowed < today
            else f"`to` must not be after today ({today.isoformat()} UTC)."
        )
        raise InvalidRange(detail, pointer="#/to")
    if (end - start).days + 1 > longest:
        raise InvalidRange(f"The range may span at most {longest} days.", pointer="#/from")
