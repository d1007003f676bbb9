from __future__ import annotations

from datetime import date, datetime

import msgspec

from keel.contexts.analytics.domain.model import DayFigures, Figures, MoneyFigure, Summary
from keel.contexts.payments.public import format_amount
from keel.platform.adapters.http.schemas import StrictInput


class RollupIn(StrictInput, frozen=True, kw_only=True, forbid_unknown_fields=True):
    start: date = msgspec.field(name="from")
    end: date = msgspec.field(name="to")


class RollupAccepted(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    status_url: str
    start: date = msgspec.field(name="from")
    end: date = msgspec.field(name="to")


class MoneyOut(msgspec.Struct, frozen=True):
    currency: str
    status: str
    count: int
    amount: int  # minor units
    amount_display: str

    @classmethod
    def of(cls, m: MoneyFigure) -> MoneyOut:
        return cls(
            currency=m.currency,
            status=m.status,
            count=m.count,
            amount=m.amount,
            amount_display=format_amount(m.amount, m.currency),
        )


class FiguresOut(msgspec.Struct, frozen=True):
    payments: list[MoneyOut]
    refunds: list[MoneyOut]
    new_users: int
    api_requests: int

    @classmethod
    def of(cls, f: Figures) -> FiguresOut:
        return cls(
            payments=[MoneyOut.of(m) for m in f.payments],
            refunds=[MoneyOut.of(m) for m in f.refunds],
            new_users=f.new_users,
            api_requests=f.api_requests,
        )


class DayOut(msgspec.Struct, frozen=True):
    date: date
    rolled_up: bool
    payments: list[MoneyOut]
    refunds: list[MoneyOut]
    new_users: int
    api_requests: int

    @classmethod
    def of(cls, d: DayFigures) -> DayOut:
        f = FiguresOut.of(d)
        return cls(
            date=d.day,
            rolled_up=d.rolled_up,
            payments=f.payments,
            refunds=f.refunds,
            new_users=f.new_users,
            api_requests=f.api_requests,
        )


class SummaryOut(msgspec.Struct, frozen=True, kw_only=True):
    start: date = msgspec.field(name="from")
    end: date = msgspec.field(name="to")
    currency: str | None
    totals: FiguresOut
    days: list[DayOut]
    generated_at: datetime

    @classmethod
    def of(cls, s: Summary) -> SummaryOut:
        return cls(
            start=s.start,
            end=s.end,
            currency=s.currency,
            totals=FiguresOut.of(s.totals),
            days=[DayOut.of(d) for d in s.days],
            generated_at=s.generated_at,
        )
