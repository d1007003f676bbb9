"""The analytics model: summaries (every day of the range, totals, the currency filter), day ranges
and runs, and which days each triggering event changes."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from keel.contexts.analytics.domain.caching import generation_key, summary_key
from keel.contexts.analytics.domain.model import (
    MONEY,
    RECOMPUTED,
    DayFigures,
    Figure,
    Figures,
    Metric,
    MoneyFigure,
    day_start,
    days_of,
    runs,
    summarize,
)
from keel.contexts.analytics.domain.services import TRIGGERS, affected_days, rollup_job_id
from keel.platform.domain.events import Event
from keel.platform.domain.ids import new_id

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
D1, D2, D3 = date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3)


def pay(day: date, currency: str, status: str, count: int, amount: int) -> Figure:
    return Figure(day=day, metric=Metric.PAYMENTS, currency=currency, status=status, count=count, amount=amount)


def ref(day: date, currency: str, status: str, count: int, amount: int) -> Figure:
    return Figure(day=day, metric=Metric.REFUNDS, currency=currency, status=status, count=count, amount=amount)


def users(day: date, count: int) -> Figure:
    return Figure(day=day, metric=Metric.NEW_USERS, count=count)


def reqs(day: date, count: int) -> Figure:
    return Figure(day=day, metric=Metric.API_REQUESTS, count=count)


def m(currency: str, status: str, count: int, amount: int) -> MoneyFigure:
    return MoneyFigure(currency=currency, status=status, count=count, amount=amount)


FIGURES = [
    pay(D1, "EUR", "succeeded", 2, 3000),
    pay(D1, "USD", "succeeded", 1, 700),
    pay(D3, "EUR", "succeeded", 1, 500),
    pay(D3, "EUR", "failed", 1, 900),
    ref(D3, "EUR", "pending", 1, 200),
    ref(D3, "USD", "succeeded", 1, 100),
    users(D1, 3),
    users(D3, 1),
    reqs(D1, 40),
    reqs(D2, 2),
]


# -- summarize ------------------------------------------------------------------------------------


def test_metric_sets() -> None:
    assert {Metric.PAYMENTS, Metric.REFUNDS, Metric.NEW_USERS} == RECOMPUTED
    assert {Metric.PAYMENTS, Metric.REFUNDS} == MONEY
    assert [m.value for m in Metric] == ["payments", "refunds", "new_users", "api_requests"]


def test_summary_has_every_day_of_the_range_empty_ones_too() -> None:
    s = summarize(FIGURES, D1, D3 + timedelta(days=1), None, {D1, D2}, NOW)
    assert (s.start, s.end, s.currency, s.generated_at) == (D1, D3 + timedelta(days=1), None, NOW)
    assert [d.day for d in s.days] == [D1, D2, D3, D3 + timedelta(days=1)]
    assert [d.rolled_up for d in s.days] == [True, True, False, False]
    assert s.days[0] == DayFigures(
        day=D1,
        rolled_up=True,
        payments=[m("EUR", "succeeded", 2, 3000), m("USD", "succeeded", 1, 700)],
        refunds=[],
        new_users=3,
        api_requests=40,
    )
    assert s.days[1] == DayFigures(day=D2, rolled_up=True, payments=[], refunds=[], new_users=0, api_requests=2)
    assert s.days[2] == DayFigures(
        day=D3,
        rolled_up=False,
        # Sorted by currency, then status.
        payments=[m("EUR", "failed", 1, 900), m("EUR", "succeeded", 1, 500)],
        refunds=[m("EUR", "pending", 1, 200), m("USD", "succeeded", 1, 100)],
        new_users=1,
        api_requests=0,
    )
    assert s.days[3] == DayFigures(
        day=D3 + timedelta(days=1), rolled_up=False, payments=[], refunds=[], new_users=0, api_requests=0
    )


def test_summary_totals_add_every_day_by_currency_and_status() -> None:
    s = summarize(FIGURES, D1, D3, None, set(), NOW)
    assert s.totals == Figures(
        payments=[m("EUR", "failed", 1, 900), m("EUR", "succeeded", 3, 3500), m("USD", "succeeded", 1, 700)],
        refunds=[m("EUR", "pending", 1, 200), m("USD", "succeeded", 1, 100)],
        new_users=4,
        api_requests=42,
    )


def test_figures_of_one_group_on_one_day_add_up() -> None:
    """Rollup rows and live rows never overlap, but a day's money figures are summed per group whatever
    their source, so a split group still reports one line."""
    s = summarize([pay(D1, "EUR", "succeeded", 1, 100), pay(D1, "EUR", "succeeded", 2, 50)], D1, D1, None, set(), NOW)
    assert s.days[0].payments == [m("EUR", "succeeded", 3, 150)]


def test_a_currency_narrows_the_money_metrics_only() -> None:
    s = summarize(FIGURES, D1, D3, "EUR", set(), NOW)
    assert s.currency == "EUR"
    assert s.totals == Figures(
        payments=[m("EUR", "failed", 1, 900), m("EUR", "succeeded", 3, 3500)],
        refunds=[m("EUR", "pending", 1, 200)],
        new_users=4,
        api_requests=42,
    )
    assert s.days[0].payments == [m("EUR", "succeeded", 2, 3000)]
    assert (s.days[0].new_users, s.days[0].api_requests) == (3, 40)
    assert s.days[2].refunds == [m("EUR", "pending", 1, 200)]
    # A currency nothing was paid in leaves the money empty and the rest whole.
    none = summarize(FIGURES, D1, D3, "GBP", set(), NOW)
    assert (none.totals.payments, none.totals.refunds) == ([], [])
    assert (none.totals.new_users, none.totals.api_requests) == (4, 42)


def test_a_summary_of_nothing_is_all_zeros() -> None:
    s = summarize([], D1, D1, None, set(), NOW)
    assert s.totals == Figures(payments=[], refunds=[], new_users=0, api_requests=0)
    assert s.days == [DayFigures(day=D1, rolled_up=False, payments=[], refunds=[], new_users=0, api_requests=0)]


# -- days ---------------------------------------------------------------------------------------


def test_days_of_includes_both_ends() -> None:
    assert days_of(D1, D1) == [D1]
    assert days_of(D1, D3) == [D1, D2, D3]
    assert days_of(D2, D1) == []
    # Across a month end and a leap day.
    assert days_of(date(2028, 2, 28), date(2028, 3, 1)) == [date(2028, 2, 28), date(2028, 2, 29), date(2028, 3, 1)]
    assert len(days_of(date(2024, 1, 1), date(2024, 12, 31))) == 366


def test_day_start_is_midnight_utc() -> None:
    assert day_start(D2) == datetime(2026, 3, 2, tzinfo=UTC)
    assert day_start(D2).utcoffset() == timedelta(0)


def test_runs_group_consecutive_days() -> None:
    assert runs([]) == []
    assert runs([D1]) == [(D1, D1)]
    assert runs([D3, D1, D2]) == [(D1, D3)]
    gap = [D1, D3, date(2026, 3, 4), date(2026, 3, 10)]
    assert runs(reversed(gap)) == [(D1, D1), (D3, date(2026, 3, 4)), (date(2026, 3, 10), date(2026, 3, 10))]
    assert runs({date(2026, 2, 28), D1}) == [(date(2026, 2, 28), D1)]


# -- affected_days --------------------------------------------------------------------------------

AT = datetime(2026, 3, 10, 9, 0, tzinfo=UTC)
CREATED = "2026-03-04T23:59:59.999999+00:00"
REFUND_CREATED = "2026-03-08T00:00:00+00:00"


def event(type_: str, **data: Any) -> Event:
    return Event(type=type_, tenant_id=new_id(), occurred_at=AT, data=data)


def test_triggers_are_the_events_that_change_figures() -> None:
    assert {
        "payment.created",
        "payment.succeeded",
        "payment.failed",
        "payment.refunded",
        "payment.refund_failed",
        "refund.created",
        "user.created",
        "user.deleted",
    } == TRIGGERS


@pytest.mark.parametrize("kind", ["payment.created", "payment.succeeded", "payment.failed"])
def test_a_payment_event_changes_the_day_the_payment_was_created(kind: str) -> None:
    assert affected_days(event(kind, payment_id=str(new_id()), created_at=CREATED)) == {date(2026, 3, 4)}


@pytest.mark.parametrize("kind", ["payment.refunded", "payment.refund_failed"])
def test_a_settled_refund_changes_the_payments_day_and_the_refunds_day(kind: str) -> None:
    e = event(kind, created_at=CREATED, refund_id=str(new_id()), refund_created_at=REFUND_CREATED)
    assert affected_days(e) == {date(2026, 3, 4), date(2026, 3, 8)}
    same_day = event(kind, created_at=CREATED, refund_id=str(new_id()), refund_created_at=CREATED)
    assert affected_days(same_day) == {date(2026, 3, 4)}


def test_refund_created_changes_only_its_own_day() -> None:
    # The payment's status does not change until the refund settles.
    e = event("refund.created", created_at=CREATED, refund_id=str(new_id()), refund_created_at=REFUND_CREATED)
    assert affected_days(e) == {AT.date()}


def test_user_created_changes_today() -> None:
    assert affected_days(event("user.created", user_id=str(new_id()))) == {AT.date()}


def test_user_deleted_changes_the_day_the_user_was_created() -> None:
    assert affected_days(event("user.deleted", user_id=str(new_id()), created_at=CREATED)) == {date(2026, 3, 4)}


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("payment.succeeded", {}),
        ("payment.failed", {"created_at": None}),
        ("payment.created", {"created_at": "not a timestamp"}),
        ("payment.refunded", {"refund_id": "r"}),
        ("payment.refund_failed", {"refund_id": "r", "created_at": 17, "refund_created_at": ""}),
        ("user.deleted", {"user_id": "u"}),
        ("user.deleted", {"created_at": "2026-13-45"}),
    ],
)
def test_events_recorded_before_the_timestamps_existed_fall_back_to_their_own_day(
    kind: str, data: dict[str, Any]
) -> None:
    assert affected_days(event(kind, **data)) == {AT.date()}


def test_a_refund_event_without_the_refund_time_still_names_the_payment_day() -> None:
    e = event("payment.refunded", created_at=CREATED, refund_id="r")
    assert affected_days(e) == {date(2026, 3, 4), AT.date()}


def test_a_naive_timestamp_is_read_as_utc() -> None:
    assert affected_days(event("payment.succeeded", created_at="2026-03-04T23:30:00")) == {date(2026, 3, 4)}


def test_a_timestamp_with_an_offset_names_its_utc_day() -> None:
    # 20:00 in New York on the 4th is 01:00 UTC on the 5th, the day the figures are grouped under.
    at = datetime(2026, 3, 4, 20, 0, tzinfo=timezone(timedelta(hours=-5))).isoformat()
    assert affected_days(event("payment.succeeded", created_at=at)) == {date(2026, 3, 5)}


# -- ids and keys -------------------------------------------------------------------------------------


def test_rollup_job_ids_follow_from_what_the_job_does() -> None:
    tenant = uuid.UUID("00000000-0000-0000-0000-000000000001")
    one = rollup_job_id("nightly", tenant, D1)
    assert one == rollup_job_id("nightly", tenant, D1)
    assert uuid.UUID(one).version == 5
    assert len({one, rollup_job_id("nightly", tenant, D2), rollup_job_id("late", tenant, D1)}) == 3
    assert rollup_job_id("nightly", new_id(), D1) != one


def test_summary_keys_name_everything_the_summary_depends_on() -> None:
    tenant = new_id()
    base = summary_key(tenant, "h1", "l1", D1, D3, None)
    variants = {
        summary_key(new_id(), "h1", "l1", D1, D3, None),
        summary_key(tenant, "h2", "l1", D1, D3, None),
        summary_key(tenant, "h1", "l2", D1, D3, None),
        summary_key(tenant, "h1", None, D1, D3, None),
        summary_key(tenant, "h1", "l1", D2, D3, None),
        summary_key(tenant, "h1", "l1", D1, D2, None),
        summary_key(tenant, "h1", "l1", D1, D3, "EUR"),
    }
    assert base not in variants
    assert len(variants) == 7
    assert generation_key(tenant, "live") != generation_key(tenant, "history")
    assert str(tenant) in generation_key(tenant, "live")
