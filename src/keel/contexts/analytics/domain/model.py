"""Daily figures per tenant, and the summary computed from them.

A *figure* is one number pair (count, amount) of one metric on one UTC day: payments and refunds
per currency and status, new users, API requests. Rollups store the figures of closed days; today
is always computed live, so a summary is never older than its cache entry.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

MAX_SUMMARY_DAYS = 366  # a year, leap or not
DEFAULT_SUMMARY_DAYS = 30
MAX_ROLLUP_DAYS = 92  # one on-demand recomputation: a quarter


class Metric(enum.StrEnum):
    PAYMENTS = "payments"  # created that day, by currency and current status
    REFUNDS = "refunds"  # requested that day, by currency and current status
    NEW_USERS = "new_users"  # created that day and still there
    API_REQUESTS = "api_requests"  # authenticated requests served (counted, not recomputable)


# What a rollup recomputes from the other contexts; API requests are only ever counted.
RECOMPUTED = frozenset({Metric.PAYMENTS, Metric.REFUNDS, Metric.NEW_USERS})
MONEY = frozenset({Metric.PAYMENTS, Metric.REFUNDS})


@dataclass(frozen=True, slots=True, kw_only=True)
class Figure:
    day: date
    metric: Metric
    count: int
    amount: int = 0  # minor units of ``currency`` (money metrics only)
    currency: str = ""  # money metrics only
    status: str = ""  # money metrics only


@dataclass(frozen=True, slots=True, kw_only=True)
class MoneyFigure:
    currency: str
    status: str
    count: int
    amount: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    payments: list[MoneyFigure]
    refunds: list[MoneyFigure]
    new_users: int
    api_requests: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DayFigures(Figures):
    day: date
    rolled_up: bool  # False: computed live from the source (today, or a day no rollup has covered yet)


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    start: date
    end: date  # inclusive
    currency: str | None
    totals: Figures
    days: list[DayFigures]
    generated_at: datetime


def day_start(day: date) -> datetime:
    """Midnight UTC at the start of ``day``: a day is the half-open range [its start, the next day's)."""
    return datetime.combine(day, time.min, tzinfo=UTC)


def days_of(start: date, end: date) -> list[date]:
    """Every day from ``start`` to ``end``, both included."""
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def runs(days: Iterable[date]) -> list[tuple[date, date]]:
    """Consecutive days as (first, last) runs, so each run costs one query."""
    out: list[tuple[date, date]] = []
    for d in sorted(days):
        if out and out[-1][1] + timedelta(days=1) == d:
            out[-1] = (out[-1][0], d)
        else:
            out.append((d, d))
    return out


class _Tally:
    """Figures summed in one pass: money by (currency, status), the others as plain counts."""

    __slots__ = ("api_requests", "new_users", "payments", "refunds")

    def __init__(self) -> None:
        self.payments: dict[tuple[str, str], list[int]] = {}
        self.refunds: dict[tuple[str, str], list[int]] = {}
        self.new_users = 0
        self.api_requests = 0

    def add(self, f: Figure) -> None:
        if f.metric is Metric.NEW_USERS:
            self.new_users += f.count
        elif f.metric is Metric.API_REQUESTS:
            self.api_requests += f.count
        else:
            sums = self.payments if f.metric is Metric.PAYMENTS else self.refunds
            pair = sums.setdefault((f.currency, f.status), [0, 0])
            pair[0] += f.count
            pair[1] += f.amount

    @staticmethod
    def _money(sums: dict[tuple[str, str], list[int]]) -> list[MoneyFigure]:
        return [MoneyFigure(currency=c, status=s, count=n, amount=a) for (c, s), (n, a) in sorted(sums.items())]

    def figures(self) -> Figures:
        return Figures(
            payments=self._money(self.payments),
            refunds=self._money(self.refunds),
            new_users=self.new_users,
            api_requests=self.api_requests,
        )

    def day(self, day: date, rolled_up: bool) -> DayFigures:
        return DayFigures(
            day=day,
            rolled_up=rolled_up,
            payments=self._money(self.payments),
            refunds=self._money(self.refunds),
            new_users=self.new_users,
            api_requests=self.api_requests,
        )


def summarize(
    figures: Iterable[Figure],
    start: date,
    end: date,
    currency: str | None,
    rolled_up: set[date],
    now: datetime,
) -> Summary:
    """Day by day (every day of the range, empty ones too) and in total; ``currency`` narrows the
    money metrics only."""
    total = _Tally()
    by_day: dict[date, _Tally] = defaultdict(_Tally)
    for f in figures:
        if currency is not None and f.metric in MONEY and f.currency != currency:
            continue
        total.add(f)
        by_day[f.day].add(f)
    days = [
        by_day[d].day(d, d in rolled_up) if d in by_day else _Tally().day(d, d in rolled_up)
        for d in days_of(start, end)
    ]
    return Summary(start=start, end=end, currency=currency, totals=total.figures(), days=days, generated_at=now)
